"""Causal self-attention with the sequence split over devices (context parallelism), inside ``shard_map``.

Each device holds a block of ``T/P`` queries. It all-gathers the keys, values and segment ids of the whole
sequence (``[B, T, G, D]``: small next to the scores with grouped-query attention) and walks them in ``P`` key
blocks with an online softmax (a ``lax.scan`` with the step rematerialised), so it never forms more than a
``[T/P, T/P]`` block of scores per head: the memory per device falls with ``P`` instead of holding
``[T/P, T]`` scores as XLA's partitioning of plain attention does. The backward reduce-scatters the key /
value gradients (the all-gather's transpose). A ring (passing key blocks with ``ppermute`` and overlapping the
transfer with the block's compute) moves the same bytes; the all-gather is chosen for simplicity, the ring is
the next step where the transfer shows in a profile.

Semantics are those of :func:`wuneng_jax.layers.attention.reference_attention` with the causal and segment
masks (a query attends to keys of its segment at or before its position), softmax in
``promote_types(q.dtype, float32)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd

from wuneng_jax.sharding import ACT_HEADS, ACT_KV_HEADS, BATCH, LENGTH


def mesh_axes_size(mesh, axes) -> int:
    """The number of devices along ``axes`` (a mesh axis name, a tuple of names, or None) of ``mesh``."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def large_negative(dtype) -> jax.Array:
    """A finite stand-in for -inf in masked logits: a fully masked row softmaxes to a uniform average, not NaN."""
    return jnp.asarray(-0.7 * min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max)), dtype)


def batch_head_axes(mesh, rules, q: jax.Array, k: jax.Array) -> tuple:
    """Mesh axes of the batch and head dims of attention inputs under the logical rules: the batch axes when
    they divide B, the head axes when query and KV heads map to the same axes and both counts divide them
    (else None each: that dim stays whole)."""
    P = jax.sharding.PartitionSpec
    batch_axes = spmd.apply_rules(P(BATCH), rules)[0]
    if q.shape[0] % mesh_axes_size(mesh, batch_axes):
        batch_axes = None
    head_axes = spmd.apply_rules(P(ACT_HEADS), rules)[0]
    n_head = mesh_axes_size(mesh, head_axes)
    if head_axes != spmd.apply_rules(P(ACT_KV_HEADS), rules)[0] or q.shape[2] % n_head or k.shape[2] % n_head:
        head_axes = None
    return batch_axes, head_axes


def _blocked_local(q, k, v, seg_q, seg_kv, *, axis, causal: bool, scale: float) -> jax.Array:
    """One device: queries ``[B, T/P, H, D]``, its blocks of k/v ``[B, T/P, G, D]`` and segment ids."""
    b, tl, h, d = q.shape
    g = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k), gather(v), gather(seg_kv)
    blocks = k_all.shape[1] // tl
    q_pos = jax.lax.axis_index(axis) * tl + jnp.arange(tl)
    qg = q.reshape(b, tl, g, h // g, d)
    split = lambda x: jnp.moveaxis(x.reshape(b, blocks, tl, *x.shape[2:]), 1, 0)
    neg = large_negative(acc)

    def step(carry, xs):
        m, l, o = carry  # [B,G,R,Tl], [B,G,R,Tl], [B,G,R,Tl,D]
        kj, vj, segj, j = xs
        logits = jnp.einsum("btgrd,bsgd->bgrts", qg, kj, preferred_element_type=acc) * jnp.asarray(scale, acc)
        mask = seg_q[:, None, None, :, None] == segj[:, None, None, None, :]
        if causal:
            mask = mask & ((j * tl + jnp.arange(tl))[None, :] <= q_pos[:, None])
        logits = jnp.where(mask, logits, neg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        o = o * corr[..., None] + jnp.einsum(
            "bgrts,bsgd->bgrtd", p.astype(v.dtype), vj, preferred_element_type=acc
        )
        return (m_new, l * corr + jnp.sum(p, axis=-1), o), None

    shape = (b, g, h // g, tl)
    init = (jnp.full(shape, neg, acc), jnp.zeros(shape, acc), jnp.zeros((*shape, d), acc))
    xs = (split(k_all), split(v_all), split(seg_all), jnp.arange(blocks))
    (_, l, o), _ = jax.lax.scan(jax.checkpoint(step), init, xs)
    out = (o / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, Tl, G, R, D]
    return out.reshape(b, tl, h, d).astype(q.dtype)


def sequence_split(q: jax.Array, k: jax.Array) -> tuple | None:
    """``(mesh, seq_axes, batch_axes, head_axes)`` when the current mesh and logical rules split the sequence
    of this self-attention (``LENGTH`` on mesh axes of size > 1 that divide ``T == S``), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules or q.shape[1] != k.shape[1]:
        return None
    seq_axes = spmd.apply_rules(jax.sharding.PartitionSpec(LENGTH), rules)[0]
    n_seq = mesh_axes_size(mesh, seq_axes)
    if n_seq <= 1 or q.shape[1] % n_seq:
        return None
    return (mesh, seq_axes, *batch_head_axes(mesh, rules, q, k))


def context_parallel_attention(q, k, v, seg_q, seg_kv, *, causal: bool, scale: float) -> jax.Array | None:
    """Self-attention (``T == S``) with the sequence split over the mesh axes the logical rules give
    ``LENGTH``; None when they do not apply (see :func:`sequence_split`), so the caller falls back to its
    plain path. q ``[B,T,H,D]``, k/v ``[B,T,G,D]``, segment ids ``[B,T]`` or None."""
    split = sequence_split(q, k)
    if split is None:
        return None
    mesh, seq_axes, batch_axes, head_axes = split
    if seg_q is None:
        seg_q = seg_kv = jnp.ones(q.shape[:2], jnp.int32)
    P = jax.sharding.PartitionSpec
    rows, ids = P(batch_axes, seq_axes, head_axes, None), P(batch_axes, seq_axes)
    local = functools.partial(_blocked_local, axis=seq_axes, causal=causal, scale=scale)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows, ids, ids), out_specs=rows, check_vma=False
    )
    return fn(q, k, v, seg_q, seg_kv)

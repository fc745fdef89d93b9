"""The one attention function: causal, segment-masked, grouped-query softmax attention.

``dot_product_attention(q [B,T,H,D], k [B,S,G,D], v [B,S,G,D], *, segment_ids_q, segment_ids_kv, causal,
impl)`` -> ``[B,T,H,D]`` in ``q.dtype``.

Semantics (every ``impl``):
* query head ``h`` uses KV head ``h // (H // G)`` (repeat-interleave GQA mapping, as Hugging Face);
* scores ``q·k / sqrt(D)`` (or ``scale``), softmax in ``promote_types(q.dtype, float32)``: float32 for
  bfloat16/float32 inputs; the ``reference`` implementation keeps float64 for float64 inputs;
* a query attends to a key only if their segment ids are equal (packed documents never attend across
  segments; padding has segment id 0 and attends only to padding) and, when ``causal``, the key is not in
  the future. With ``T != S`` the causal mask is aligned bottom-right (query ``i`` sits at key index
  ``S - T + i``), the layout of a query block appended to a key/value history;
* a query row with no visible key (impossible for causal self-attention with segment ids) gives a finite
  average, never NaN.

Implementations (``impl``):
* ``"reference"``: explicit einsums; the only one that keeps float64 softmax (x64 reference runs);
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``; under a mesh whose logical rules split
  the sequence (``mesh.sequence > 1``), blocked context-parallel attention instead
  (:mod:`wuneng_jax.layers.context_attention`);
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bfloat16/float16 only);
  the segment mask is passed as a mask (cuDNN turns it into a bias);
* ``"splash"``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu``), causal
  self-attention with ``T == S`` a multiple of 128.
  Under a mesh with logical rules it runs inside ``jax.shard_map`` over batch (and heads where they
  divide); with the sequence split (``mesh.sequence > 1``) each device runs its block of queries against
  the all-gathered keys/values (context parallelism). ``splash_interpret=True`` runs it in Pallas interpret
  mode (CPU tests);
* ``"auto"``: float64 -> reference; GPU with bf16/f16 and a cuDNN-friendly head dim -> cudnn;
  TPU with splash-friendly shapes -> splash; otherwise xla.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd

from wuneng_jax.layers.context_attention import (
    batch_head_axes,
    context_parallel_attention,
    large_negative,
    mesh_axes_size,
    sequence_split,
)
from wuneng_jax.layers.params import sharding_active

AttentionImpl = Literal["auto", "reference", "xla", "cudnn", "splash"]
IMPLS: tuple[str, ...] = ("auto", "reference", "xla", "cudnn", "splash")

_SPLASH_BLOCK = 128
#: most entries of one splash block table (2 bytes each) before the key blocks grow (see _splash_kernel)
_SPLASH_TABLE_ENTRIES = 1 << 17


def attention_mask(
    segment_ids_q: jax.Array | None, segment_ids_kv: jax.Array | None, t: int, s: int, causal: bool
) -> jax.Array | None:
    """Boolean mask ``[B|1, 1, T, S]`` (True = may attend), or None when nothing is masked."""
    mask = None
    if segment_ids_q is not None:
        mask = (segment_ids_q[:, :, None] == segment_ids_kv[:, None, :])[:, None, :, :]
    if causal:
        c = jnp.asarray(np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t))[None, None]
        mask = c if mask is None else jnp.logical_and(mask, c)
    return mask


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float
) -> jax.Array:
    """Explicit GQA softmax attention; logits and softmax in ``promote_types(q.dtype, float32)``.

    q ``[B,T,H,D]``, k/v ``[B,S,G,D]``, mask ``[B|1,1,T,S]`` bool or None -> ``[B,T,H,D]``.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=acc) * jnp.asarray(scale, acc)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, large_negative(acc))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v, preferred_element_type=acc)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _jax_nn_attention(q, k, v, seg_q, seg_kv, causal: bool, scale: float, implementation: str) -> jax.Array:
    t, s = q.shape[1], k.shape[1]
    aligned = causal and t == s  # jax's is_causal is top-left aligned: only use it when T == S
    mask = attention_mask(seg_q, seg_kv, t, s, causal and not aligned)
    if mask is not None and mask.shape[0] == 1 and q.shape[0] != 1:
        mask = jnp.broadcast_to(mask, (q.shape[0], *mask.shape[1:]))
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=aligned, implementation=implementation
    )


def splash_blocks(t: int, q_seq_shards: int = 1) -> tuple[int, int, int]:
    """Splash's (query block, key block, keys computed at a time) for a length-``t`` self-attention whose
    queries are cut into ``q_seq_shards`` blocks: 128..512 dividing ``t / q_seq_shards`` for all three, until
    long context. Splash prefetches its block tables (``[query blocks, key blocks]`` per distinct head mask, 2
    bytes an entry) into the TPU's scalar memory (1 MiB): at 1M tokens over 4 devices with 512 × 512 blocks
    they need 2 MiB. So key blocks grow first (up to 4 compute blocks: the dK/dV kernel keeps a key block's
    float32 accumulators in VMEM, and 4096-key blocks overflow its 16 MiB), then query blocks (up to 1024),
    until a table holds at most ``_SPLASH_TABLE_ENTRIES``."""
    local = t // q_seq_shards
    block = _SPLASH_BLOCK * max(1, math.gcd(local // _SPLASH_BLOCK, 4))
    q_block = kv_block = block
    while (
        (local // q_block) * (t // kv_block) > _SPLASH_TABLE_ENTRIES
        and kv_block < 4 * block
        and not t % (2 * kv_block)
    ):
        kv_block *= 2
    while (
        (local // q_block) * (t // kv_block) > _SPLASH_TABLE_ENTRIES
        and q_block < 2 * block
        and not local % (2 * q_block)
    ):
        q_block *= 2
    return q_block, kv_block, block


class _Chunk(np.ndarray):
    """A read-only mask chunk whose ``any()`` / ``all()`` (what splash's table builder asks) are precomputed."""

    def any(self, *args, **kwargs):  # noqa: D102
        known = self.__dict__.get("_any") if not args and not kwargs else None
        return np.ndarray.any(self, *args, **kwargs) if known is None else known

    def all(self, *args, **kwargs):  # noqa: D102
        known = self.__dict__.get("_all") if not args and not kwargs else None
        return np.ndarray.all(self, *args, **kwargs) if known is None else known


@functools.lru_cache(maxsize=4096)
def _causal_chunk(diagonal: int, rows: int, cols: int) -> np.ndarray:
    base = (np.arange(rows)[:, None] + diagonal) >= np.arange(cols)[None, :]
    out = base.view(_Chunk)
    out._any, out._all = bool(base.any()), bool(base.all())
    out.flags.writeable = False
    return out


@functools.cache
def _causal_mask_type():
    """``CausalMask`` whose chunks come from a cache keyed by their diagonal offset: splash builds its block
    tables on the host by evaluating every (query block, key block) chunk of the ``T × T`` mask, which at
    long context is hours of trace time (22 s at 32K, 81 s at 64K, quadratic); a causal chunk depends only on
    ``q_start - kv_start`` and its size. The same chunks, so the same tables and program
    (``tests/test_attention.py``)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam

    class CachedCausalMask(sam.CausalMask):
        def __getitem__(self, idx):
            plain = self.__dict__.get("_plain")
            if plain is None:  # checked once: no offset, queries in order
                plain = self.offset == 0 and np.array_equal(self.q_sequence, np.arange(self.shape[0]))
                self._plain = plain
            if plain and len(idx) == 2 and all(isinstance(i, slice) and (i.step or 1) == 1 for i in idx):
                q, kv = (range(*i.indices(n)) for i, n in zip(idx, self.shape, strict=True))
                return _causal_chunk(q.start - kv.start, len(q), len(kv))
            return super().__getitem__(idx)

    return CachedCausalMask


def _splash_kernel(num_heads: int, t: int, causal: bool, interpret: bool, q_seq_shards: int = 1):
    """The splash kernel for ``num_heads`` heads over a length-``t`` self-attention; with ``q_seq_shards`` > 1
    its mask tables are cut into that many query blocks (one per device of the sequence split)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    q_block, kv_block, block = splash_blocks(t, q_seq_shards)
    head_mask = _causal_mask_type()((t, t)) if causal else sa.FullMask((t, t))
    sizes = sa.BlockSizes(
        block_q=q_block,
        block_kv=kv_block,
        block_kv_compute=block,
        block_q_dkv=q_block,
        block_kv_dkv=kv_block,
        block_kv_dkv_compute=block,
        block_q_dq=q_block,
        block_kv_dq=kv_block,
    )
    return sa.make_splash_mha(
        mask=sa.MultiHeadMask([head_mask] * num_heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=q_seq_shards,
        interpret=interpret,
    )


def _splash_local(q, k, v, seg_q, seg_kv, kernel) -> jax.Array:
    """Splash on local (per-device) arrays, q pre-scaled. q ``[B,Tq,H,D]``, k/v ``[B,T,G,D]``, seg ``[B,Tq]``
    / ``[B,T]``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B,H,T,D]
    out = jax.vmap(lambda a, b_, c, sq, skv: kernel(a, b_, c, segment_ids=sa.SegmentIds(q=sq, kv=skv)))(
        qh, kh, vh, seg_q, seg_kv
    )
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _splash(q, k, v, seg_q, seg_kv, *, causal: bool, scale: float, interpret: bool) -> jax.Array:
    q = q * jnp.asarray(scale, q.dtype)
    b, t, h, _ = q.shape
    if not sharding_active():
        return _splash_local(q, k, v, seg_q, seg_kv, _splash_kernel(h, t, causal, interpret))
    # A Pallas call under a sharded jit must sit inside shard_map: shard batch, and heads where both the
    # query and KV head counts divide the head axes' size. With the sequence split (context parallelism)
    # each device keeps its block of queries and gets every key/value (an all-gather of [B,T,G,D], small
    # with grouped-query attention; its transpose reduce-scatters dK/dV); the kernel's mask tables are cut
    # per query block, so each device skips the key blocks its causal mask hides. Without a split the
    # sequence is whole on every device.
    P = jax.sharding.PartitionSpec
    split = sequence_split(q, k)
    if split is not None and (t // mesh_axes_size(split[0], split[1])) % _SPLASH_BLOCK == 0:
        mesh, seq_axes, batch_axes, head_axes = split
        n_seq = mesh_axes_size(mesh, seq_axes)
    else:
        mesh = jax.sharding.get_abstract_mesh()
        seq_axes, n_seq = None, 1
        batch_axes, head_axes = batch_head_axes(mesh, spmd.get_logical_axis_rules(), q, k)
    kernel = _splash_kernel(h // mesh_axes_size(mesh, head_axes), t, causal, interpret, n_seq)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, seq_axes)))
    qs, kvs = P(batch_axes, seq_axes, head_axes, None), P(batch_axes, None, head_axes, None)
    fn = jax.shard_map(
        _splash_local,
        mesh=mesh,
        in_specs=(qs, kvs, kvs, P(batch_axes, seq_axes), P(batch_axes, None), kernel_spec),
        out_specs=qs,
        check_vma=False,
    )
    return fn(q, k, v, seg_q, seg_kv, kernel)


def _splash_supported(q: jax.Array, k: jax.Array, causal: bool) -> bool:
    t, s = q.shape[1], k.shape[1]
    return t == s and t % _SPLASH_BLOCK == 0 and q.dtype in (jnp.float32, jnp.bfloat16)


def _cudnn_supported(q: jax.Array) -> bool:
    d = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, causal: bool) -> str:
    """The concrete implementation ``"auto"`` picks for these inputs on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    if q.dtype == jnp.float64:
        return "reference"
    backend = jax.default_backend()
    if backend == "gpu" and _cudnn_supported(q):
        return "cudnn"
    if backend == "tpu" and _splash_supported(q, k, causal):
        return "splash"
    return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids_q: jax.Array | None = None,
    segment_ids_kv: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    impl: AttentionImpl = "auto",
    splash_interpret: bool = False,
) -> jax.Array:
    """Causal, segment-masked GQA attention. q ``[B,T,H,D]``, k/v ``[B,S,G,D]`` -> ``[B,T,H,D]``.

    ``segment_ids_q`` int ``[B,T]`` / ``segment_ids_kv`` int ``[B,S]``: attention only within equal ids
    (give one for both when ``T == S``). See the module docstring for ``impl``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be [B,T,H,D]/[B,S,G,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must both be [B={b}, S, G, D={d}]")
    g = k.shape[2]
    if h % g != 0:
        raise ValueError(f"attention: {h} query heads are not a multiple of {g} KV heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them first"
        )
    s = k.shape[1]
    if (
        segment_ids_q is None
        and segment_ids_kv is not None
        or segment_ids_q is not None
        and segment_ids_kv is None
    ):
        if t != s:
            raise ValueError("attention: with T != S give both segment_ids_q and segment_ids_kv")
        segment_ids_q = segment_ids_kv = segment_ids_q if segment_ids_q is not None else segment_ids_kv
    if segment_ids_q is not None and (segment_ids_q.shape != (b, t) or segment_ids_kv.shape != (b, s)):
        raise ValueError(
            f"attention: segment ids {segment_ids_q.shape}/{segment_ids_kv.shape} must be [B,T]=({b},{t})"
            f" and [B,S]=({b},{s})"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    impl = resolve_impl(impl, q, k, causal)
    if impl == "reference":
        return reference_attention(
            q, k, v, attention_mask(segment_ids_q, segment_ids_kv, t, s, causal), scale
        )
    if impl == "xla" and sharding_active():  # the sequence split over devices: blocked, never [T/P, T] scores
        out = context_parallel_attention(q, k, v, segment_ids_q, segment_ids_kv, causal=causal, scale=scale)
        if out is not None:
            return out
    if impl in ("xla", "cudnn"):
        return _jax_nn_attention(q, k, v, segment_ids_q, segment_ids_kv, causal, scale, impl).astype(q.dtype)
    # splash
    if t != s:
        raise ValueError(f"attention impl='splash' needs self-attention (T == S); got T={t}, S={s}")
    if t % _SPLASH_BLOCK != 0:
        raise ValueError(f"attention impl='splash' needs T to be a multiple of {_SPLASH_BLOCK}; got {t}")
    if segment_ids_q is None:
        segment_ids_q = segment_ids_kv = jnp.ones((b, t), jnp.int32)
    return _splash(
        q,
        k,
        v,
        segment_ids_q.astype(jnp.int32),
        segment_ids_kv.astype(jnp.int32),
        causal=causal,
        scale=scale,
        interpret=splash_interpret,
    )

"""WuNeng's middle heads (``ARCHITECTURE.md`` §2, fusion ``gate`` / ``full``) as one Pallas kernel per direction.

Per query head ``h`` of group ``g(h)`` (``H`` heads of size ``D``, ``G`` groups, ``H/G`` heads each)::

    z_h = a_h W^a_h + n_{g(h)} W^n_h + c_h          W^a_h, W^n_h = gate_w[h, :D], gate_w[h, D:]   [D,D]
    m_h = a_h + γ_h ⊙ σ(z_h) ⊙ (n_{g(h)} - a_h)

``a`` ``[B,T,H,D]`` (the standard heads), ``n`` ``[B,T,G,D]`` (the normed state read-out). Two implementations,
one op (:func:`middle_heads`):

* ``"xla"``: the formula above in ``jnp`` (a per-head einsum), differentiated by JAX;
* ``"pallas"``: forward and backward kernels that read every activation once per pass. In XLA the per-head
  einsum (a batched matmul over the head axis) and its transpose put ``[B,T,H,D]`` activations through layout
  changes and separate elementwise passes: the TPU compiler's roofline of the 0.5B train step counted ~0.47 GB
  of HBM traffic per layer for them (``benchmarks/layer_traffic.py``), ~0.23 GB with the kernels.

Kernel layout: everything stays token-major and lane dense, ``[B,T,H·D]`` (a free reshape of ``[B,T,H,D]``),
cut into *units* of ``P = max(1, 128/D)`` heads (``U = P·D`` lanes, 128 for ``D ≤ 128``). Per unit the per-head
weights become one block-diagonal ``[U,U]`` matrix (built in XLA; its transpose keeps only the diagonal
blocks), so each grid step is ``[bt,U]×[U,U]`` MXU products plus elementwise math in float32. ``n`` is broadcast
to its query heads in XLA first (``[B,T,H·D]``); its gradient is summed back over each group there. Grid
``(units, B, T/bt)``: the forward is parallel everywhere; the backward accumulates a unit's weight gradients
over ``(B, T/bt)`` in its resident output blocks (float32).

The same kernel shape for the state→query injection (``q_h + λ_h ⊙ (r_{g(h)} W^state_h)``) was tried and gave
nothing: its token-major output must be transposed back to the head-major layout splash attention reads, which
costs what the kernel saves (the XLA einsum fuses into the query projection instead).

Platforms (``impl="pallas"``): ``tpu`` -> Mosaic; ``cuda`` -> the same unit math in ``jnp`` and its JAX gradient
(no Triton variant); ``cpu`` -> the Mosaic kernels in the Pallas interpreter (tests). Under a mesh the kernels
run in ``jax.shard_map`` over batch, units (head axes) and the sequence, as :func:`pallas_kernels.wkv7` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from pallas_kernels.wkv7 import Partition, _kernel_partition, _spec_axes
from pallas_kernels.wkv7_fused import out_struct

IMPLS = ("xla", "pallas")
LANES = 128
#: tokens per grid step (fewer when T is shorter)
BLOCK_TOKENS = 512
_HI = jax.lax.Precision.HIGHEST


def heads_per_unit(head_dim: int) -> int:
    """``P``: heads per 128-lane unit (1 for ``D >= 128``)."""
    return max(1, LANES // head_dim)


def kernel_supported(num_heads: int, head_dim: int) -> bool:
    """Whether ``impl="pallas"`` takes ``H`` heads of size ``D``: ``D`` divides 128 or is a multiple of it, and
    the heads fill whole units."""
    if head_dim < LANES:
        return LANES % head_dim == 0 and num_heads % heads_per_unit(head_dim) == 0
    return head_dim % LANES == 0


# ------------------------------------------------------------------------------------------- XLA formula


def middle_heads_xla(a, n, gate_w, gate_b, gamma) -> jax.Array:
    """The formula in ``jnp``: a ``[B,T,H,D]``, n ``[B,T,G,D]``, gate_w ``[H,2D,D]``, gate_b/gamma ``[H,D]``
    (all in the compute dtype) -> m ``[B,T,H,D]``."""
    n_h = jnp.repeat(n, a.shape[2] // n.shape[2], axis=2)
    z = jnp.einsum("bthi,hij->bthj", jnp.concatenate([a, n_h], axis=-1), gate_w) + gate_b
    return a + gamma * jax.nn.sigmoid(z) * (n_h - a)


# ------------------------------------------------------------------------------------------- kernels


def _dot(x, y, contract_x: int, contract_y: int, out):
    """2-D ``dot_general`` accumulating in ``out``; float32 operands exact (Mosaic rounds them to bf16 at the
    default precision), bf16 operands as they are (Mosaic rejects ``HIGHEST`` for them)."""
    dims = (((contract_x,), (contract_y,)), ((), ()))
    precision = _HI if jnp.dtype(x.dtype).itemsize >= 4 else None
    return jax.lax.dot_general(x, y, dims, precision=precision, preferred_element_type=out)


def _f32(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _zero_on_first_block(*refs) -> None:
    """Backward kernels: the weight-gradient blocks of a unit start at zero on its first (row, token block)."""

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _gate(a, n, wa, wn, c):
    """``σ(a W^a + n W^n + c)`` in float32 (float64 for float64 inputs) for one ``[bt,U]`` block."""
    f = _f32(a)
    z = _dot(a, wa, 1, 0, f) + _dot(n, wn, 1, 0, f) + c.astype(f)
    return 1.0 / (1.0 + jnp.exp(-z))


def _middle_fwd_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, m_ref):
    a, n = a_ref[...], n_ref[...]
    s = _gate(a, n, wa_ref[...], wn_ref[...], c_ref[...])
    af, nf = a.astype(s.dtype), n.astype(s.dtype)
    m_ref[...] = (af + g_ref[...].astype(s.dtype) * s * (nf - af)).astype(m_ref.dtype)


def _middle_bwd_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, dm_ref, *out_refs):
    da_ref, dn_ref, dwa_ref, dwn_ref, dc_ref, dg_ref = out_refs
    _zero_on_first_block(dwa_ref, dwn_ref, dc_ref, dg_ref)
    a, n, wa, wn = a_ref[...], n_ref[...], wa_ref[...], wn_ref[...]
    s = _gate(a, n, wa, wn, c_ref[...])
    f = s.dtype
    af, nf, dm, g = a.astype(f), n.astype(f), dm_ref[...].astype(f), g_ref[...].astype(f)
    gs = g * s
    dm_d = dm * (nf - af)  # ∂L/∂(γ ⊙ s)
    dz = (dm_d * g * s * (1.0 - s)).astype(a.dtype)  # MXU operand in the compute dtype
    da_ref[...] = (dm * (1.0 - gs) + _dot(dz, wa, 1, 1, f)).astype(da_ref.dtype)
    dn_ref[...] = (dm * gs + _dot(dz, wn, 1, 1, f)).astype(dn_ref.dtype)
    dwa_ref[...] += _dot(a, dz, 0, 0, dwa_ref.dtype)
    dwn_ref[...] += _dot(n, dz, 0, 0, dwn_ref.dtype)
    dc_ref[...] += jnp.sum(dz.astype(f), axis=0, keepdims=True).astype(dc_ref.dtype)
    dg_ref[...] += jnp.sum(dm_d * s, axis=0, keepdims=True).astype(dg_ref.dtype)


def _block_tokens(seq_len: int) -> int:
    return min(BLOCK_TOKENS, seq_len)


def _unit_call(
    kernel, name: str, inputs, kinds: str, outputs, products: int, backward: bool, interpret: bool
):
    """One ``pallas_call`` over grid ``(units, B, T/bt)``. ``kinds``: per input ``r`` (a ``[B,T,J·U]`` row
    block), ``m`` (a ``[J,U,U]`` unit matrix) or ``v`` (a ``[J,1,U]`` unit vector); ``outputs``: ``(shape,
    dtype, kind)``. Unit matrices and vectors among the outputs of a backward accumulate over ``(B, T/bt)``."""
    rows = next(x for x, k in zip(inputs, kinds, strict=True) if k == "r")
    bsz, seq_len, _ = rows.shape
    u = next(x for x, k in zip(inputs, kinds, strict=True) if k == "m").shape[1]
    units, bt = rows.shape[2] // u, _block_tokens(seq_len)
    spec = {
        "r": pl.BlockSpec((None, bt, u), lambda j, b, t: (b, t, j)),
        "m": pl.BlockSpec((None, u, u), lambda j, b, t: (j, 0, 0)),
        "v": pl.BlockSpec((None, 1, u), lambda j, b, t: (j, 0, 0)),
    }
    out_shape = [out_struct(shape, dtype, *inputs) for shape, dtype, _ in outputs]
    traffic = sum(x.size * jnp.dtype(x.dtype).itemsize for x in (*inputs, *out_shape))
    cost = pl.CostEstimate(
        flops=2 * products * bsz * seq_len * u * u * units,
        transcendentals=bsz * seq_len * u * units,
        bytes_accessed=int(traffic),
    )
    semantics = ("parallel", "arbitrary", "arbitrary") if backward else ("parallel",) * 3
    return pl.pallas_call(
        kernel,
        grid=(units, bsz, seq_len // bt),
        in_specs=[spec[k] for k in kinds],
        out_specs=[spec[k] for _, _, k in outputs],
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        cost_estimate=cost,
        interpret=interpret,
        name=name,
    )(*inputs)


def _middle_fwd_tpu(a, n, wa, wn, c, g, *, interpret: bool):
    outs = [(a.shape, a.dtype, "r")]
    (m,) = _unit_call(
        _middle_fwd_kernel, "middle_heads_fwd", (a, n, wa, wn, c, g), "rrmmvv", outs, 2, False, interpret
    )
    return m


def _middle_bwd_tpu(a, n, wa, wn, c, g, dm, *, interpret: bool):
    f = _f32(a)
    outs = [(a.shape, a.dtype, "r"), (n.shape, n.dtype, "r"), (wa.shape, f, "m"), (wn.shape, f, "m")]
    outs += [(c.shape, f, "v"), (g.shape, f, "v")]
    inputs = (a, n, wa, wn, c, g, dm)
    grads = _unit_call(_middle_bwd_kernel, "middle_heads_bwd", inputs, "rrmmvvr", outs, 6, True, interpret)
    return tuple(d.astype(x.dtype) for d, x in zip(grads, inputs, strict=False))


# ------------------------------------------------------------------------------------------- units + VJP


def _split(x, u: int):
    return x.reshape(*x.shape[:2], -1, u)


def _middle_units_xla(a, n, wa, wn, c, g):
    """The middle-heads kernels' math in ``jnp`` on whole arrays (``[B,T,J·U]`` rows, ``[J,U,U]`` weights)."""
    u = wa.shape[1]
    z = (
        jnp.einsum("btju,juv->btjv", _split(a, u), wa)
        + jnp.einsum("btju,juv->btjv", _split(n, u), wn)
        + c[:, 0]
    )
    m = _split(a, u) + g[:, 0] * jax.nn.sigmoid(z) * (_split(n, u) - _split(a, u))
    return m.reshape(a.shape)


def _dispatch(interpret: bool, tpu_fn, cuda_fn, *args):
    if interpret:
        return tpu_fn(*args, interpret=True)
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(tpu_fn, interpret=False),
        cuda=cuda_fn,
        default=functools.partial(tpu_fn, interpret=True),
    )


def _unit_op(tpu_fwd, tpu_bwd, formula):
    """The ``custom_vjp`` op of a kernel pair; on ``cuda`` the ``formula`` and its JAX gradient."""

    def cuda_bwd(*xs):
        return jax.vjp(formula, *xs[:-1])[1](xs[-1])

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(interpret, *xs):
        return _dispatch(interpret, tpu_fwd, formula, *xs)

    def fwd(interpret, *xs):
        return op(interpret, *xs), xs

    def bwd(interpret, xs, dy):
        return tuple(_dispatch(interpret, tpu_bwd, cuda_bwd, *xs, dy))

    op.defvjp(fwd, bwd)
    return op


_middle_units = _unit_op(_middle_fwd_tpu, _middle_bwd_tpu, _middle_units_xla)


def _block_diag(w: jax.Array, p: int) -> jax.Array:
    """``[H,D,E]`` per-head matrices -> ``[H/P, P·D, P·E]``, ``P`` consecutive heads on each diagonal."""
    hh, d, e = w.shape
    blocks = w.reshape(hh // p, p, d, e)
    return jnp.einsum("jpde,pq->jpdqe", blocks, jnp.eye(p, dtype=w.dtype)).reshape(hh // p, p * d, p * e)


def _run_units(op, x, grouped, mats, vecs, interpret: bool, partition: Partition | None):
    """``op(rows x, rows grouped-per-head, *unit matrices, *unit vectors)`` on ``x`` ``[B,T,H,D]``: the
    per-head weights ``mats`` ``[H,D,D]`` made block-diagonal per unit, ``vecs`` ``[H,D]`` per unit, ``grouped``
    ``[B,T,G,D]`` broadcast to the heads, the sequence padded to whole token blocks, and under a mesh the call
    wrapped in ``shard_map``."""
    bsz, seq_len, hh, d = x.shape
    p = heads_per_unit(d)
    units = hh // p
    flat = lambda y: y.reshape(bsz, seq_len, hh * d)
    rows = [flat(x), flat(jnp.repeat(grouped, hh // grouped.shape[2], axis=2))]
    pad = -seq_len % _block_tokens(seq_len)
    if pad:
        rows = [jnp.pad(y, ((0, 0), (0, pad), (0, 0))) for y in rows]
    weights = [_block_diag(w, p) for w in mats] + [v.reshape(units, 1, p * d) for v in vecs]
    call = functools.partial(op, interpret)
    mesh = jax.sharding.get_abstract_mesh()
    axes = None if mesh.empty else _kernel_partition(mesh, bsz, units, seq_len + pad, partition)
    if axes is not None:
        bx, hx, sx = (_spec_axes(y) for y in axes)
        row_spec, unit_spec = P(bx, sx, hx), P(hx, None, None)
        specs = (row_spec, row_spec) + (unit_spec,) * len(weights)
        call = jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=row_spec, check_vma=False)
    return call(*rows, *weights)[:, :seq_len].reshape(x.shape)


def _check(name: str, impl: str, x, grouped, mats, vecs) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{name}: unknown impl {impl!r}; choose one of {IMPLS}")
    if x.ndim != 4 or grouped.ndim != 4 or grouped.shape[:2] != x.shape[:2] or grouped.shape[3] != x.shape[3]:
        raise ValueError(
            f"{name}: expected [B,T,H,D] and [B,T,G,D] activations; got {x.shape} and {grouped.shape}"
        )
    hh, d = x.shape[2], x.shape[3]
    if hh % grouped.shape[2]:
        raise ValueError(f"{name}: the {grouped.shape[2]} groups must divide the {hh} heads")
    for label, w, shape in (*mats, *vecs):
        if w.shape != shape:
            raise ValueError(f"{name}: expected {label} of shape {shape}; got {w.shape}")
    if impl == "pallas" and not kernel_supported(hh, d):
        raise ValueError(
            f"{name}: impl='pallas' needs a head size that divides 128 (with the heads filling "
            f"128-lane units) or is a multiple of 128; got H={hh}, D={d}. Use impl='xla'."
        )


def middle_heads(
    a: jax.Array,
    n: jax.Array,
    gate_w: jax.Array,
    gate_b: jax.Array,
    gamma: jax.Array,
    *,
    impl: str = "xla",
    interpret: bool = False,
    partition: Partition | None = None,
) -> jax.Array:
    """The middle heads ``m`` ``[B,T,H,D]`` (module docstring) in ``a``'s dtype.

    Args:
      a: ``[B,T,H,D]``; n: ``[B,T,G,D]`` (``G`` divides ``H``); gate_w ``[H,2D,D]``; gate_b, gamma ``[H,D]``;
        all in one floating dtype (the compute dtype).
      impl: ``"xla"`` or ``"pallas"`` (needs :func:`kernel_supported`); interpret: run the Mosaic kernels in
        the Pallas interpreter on any platform (tests).
      partition: ``(batch_axes, head_axes[, sequence_axes])`` of ``a`` under a mesh (``impl="pallas"`` runs in a
        ``shard_map`` split that way); None: the op picks, as :func:`pallas_kernels.wkv7` does.
    """
    hh, d = a.shape[2], a.shape[-1]
    mats = [("gate_w", gate_w, (hh, 2 * d, d))]
    _check("middle_heads", impl, a, n, mats, [("gate_b", gate_b, (hh, d)), ("gamma", gamma, (hh, d))])
    if impl == "xla":
        return middle_heads_xla(a, n, gate_w, gate_b, gamma)
    return _run_units(
        _middle_units, a, n, [gate_w[:, :d], gate_w[:, d:]], [gate_b, gamma], interpret, partition
    )

"""WuNeng's middle heads (``ARCHITECTURE.md`` §2, fusion ``gate`` / ``full``) as one Pallas kernel per direction.

Per query head ``h`` of group ``g(h)`` (``H`` heads of size ``D``, ``G`` groups, ``H/G`` heads each)::

    z_h = a_h W^a_h + n_{g(h)} W^n_h + c_h          W^a_h, W^n_h = gate_w[h, :D], gate_w[h, D:]   [D,D]
    m_h = a_h + γ_h ⊙ σ(z_h) ⊙ (n_{g(h)} - a_h)

``a`` ``[B,T,H,D]`` (the standard heads), ``n`` ``[B,T,G,D]`` (the normed state read-out). Two implementations,
one op (:func:`middle_heads`):

* ``"xla"``: the formula above in ``jnp`` (a per-head einsum), differentiated by JAX;
* ``"pallas"``: forward and backward kernels that read ``a`` and ``n`` once per pass. In XLA the per-head
  einsum (a batched matmul over the head axis) and its transpose put ``[B,T,H,D]`` activations through several
  layout changes and separate elementwise passes; the TPU compiler's roofline of the 0.5B train step counted
  ~0.47 GB of HBM traffic per layer for it (``benchmarks/layer_traffic.py``).

Kernel layout: everything stays token-major and lane dense, ``[B,T,H·D]`` (a free reshape of ``[B,T,H,D]``),
cut into *units* of ``P = max(1, 128/D)`` heads (``U = P·D`` lanes, 128 for ``D ≤ 128``). Per unit the per-head
weights become one block-diagonal ``[U,U]`` matrix (built in XLA from ``gate_w``; its transpose keeps only the
diagonal blocks), so each grid step is two ``[bt,U]×[U,U]`` MXU products and elementwise math in float32.
``n`` is broadcast to its query heads in XLA first (``[B,T,H·D]``; the backward sums the per-head gradient back
over each group). Grid ``(units, B, T/bt)``: the forward is parallel everywhere; the backward accumulates the
weight gradients of a unit over ``(B, T/bt)`` in its resident output blocks (float32).

Platforms (``impl="pallas"``): ``tpu`` -> Mosaic; ``cuda`` -> the ``"xla"`` formula and its JAX gradient (no
Triton variant: the XLA GPU compiler handles this layout well enough); ``cpu`` -> the Mosaic kernel in the
Pallas interpreter (tests). Under a mesh the kernel runs in ``jax.shard_map`` over batch, units (head axes) and
the sequence, as :func:`pallas_kernels.wkv7` does.
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


def _gate(a, n, wa, wn, c):
    """``σ(a W^a + n W^n + c)`` in float32 (float64 for float64 inputs) for one ``[bt,U]`` block."""
    f = jnp.promote_types(a.dtype, jnp.float32)
    z = _dot(a, wa, 1, 0, f) + _dot(n, wn, 1, 0, f) + c.astype(f)
    return 1.0 / (1.0 + jnp.exp(-z))


def _fwd_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, m_ref):
    a, n = a_ref[...], n_ref[...]
    s = _gate(a, n, wa_ref[...], wn_ref[...], c_ref[...])
    af, nf = a.astype(s.dtype), n.astype(s.dtype)
    m_ref[...] = (af + g_ref[...].astype(s.dtype) * s * (nf - af)).astype(m_ref.dtype)


def _bwd_kernel(
    a_ref, n_ref, dm_ref, wa_ref, wn_ref, c_ref, g_ref, da_ref, dn_ref, dwa_ref, dwn_ref, dc_ref, dg_ref
):
    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in (dwa_ref, dwn_ref, dc_ref, dg_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

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


def _specs(bt: int, u: int):
    rows = pl.BlockSpec((None, bt, u), lambda j, b, t: (b, t, j))  # [bt, U] of [B, T, H·D]
    mat = pl.BlockSpec((None, u, u), lambda j, b, t: (j, 0, 0))  # [U, U] of [J, U, U]
    vec = pl.BlockSpec((None, 1, u), lambda j, b, t: (j, 0, 0))  # [1, U] of [J, 1, U]
    return rows, mat, vec


def _cost(arrays, m: int, u: int, units: int, products: int) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=2 * products * m * u * u * units,
        transcendentals=m * u * units,
        bytes_accessed=int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays)),
    )


def _fwd_tpu(a, n, wa, wn, c, g, *, interpret: bool):
    bsz, seq_len, width = a.shape
    units, u = wa.shape[0], wa.shape[1]
    bt = _block_tokens(seq_len)
    rows, mat, vec = _specs(bt, u)
    inputs = (a, n, wa, wn, c, g)
    out = out_struct(a.shape, a.dtype, *inputs)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(units, bsz, seq_len // bt),
        in_specs=[rows, rows, mat, mat, vec, vec],
        out_specs=rows,
        out_shape=out,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        cost_estimate=_cost((*inputs, out), bsz * seq_len, u, units, 2),
        interpret=interpret,
        name="middle_heads_fwd",
    )(*inputs)


def _bwd_tpu(a, n, wa, wn, c, g, dm, *, interpret: bool):
    bsz, seq_len, width = a.shape
    units, u = wa.shape[0], wa.shape[1]
    bt = _block_tokens(seq_len)
    rows, mat, vec = _specs(bt, u)
    inputs = (a, n, dm, wa, wn, c, g)
    f = jnp.promote_types(a.dtype, jnp.float32)
    outs = [
        out_struct(a.shape, a.dtype, *inputs),
        out_struct(n.shape, n.dtype, *inputs),
        out_struct(wa.shape, f, *inputs),
        out_struct(wn.shape, f, *inputs),
        out_struct(c.shape, f, *inputs),
        out_struct(g.shape, f, *inputs),
    ]
    da, dn, dwa, dwn, dc, dg = pl.pallas_call(
        _bwd_kernel,
        grid=(units, bsz, seq_len // bt),
        in_specs=[rows, rows, rows, mat, mat, vec, vec],
        out_specs=[rows, rows, mat, mat, vec, vec],
        out_shape=outs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost((*inputs, *outs), bsz * seq_len, u, units, 6),
        interpret=interpret,
        name="middle_heads_bwd",
    )(*inputs)
    return da, dn, dwa.astype(wa.dtype), dwn.astype(wn.dtype), dc.astype(c.dtype), dg.astype(g.dtype)


def _block_tokens(seq_len: int) -> int:
    return min(BLOCK_TOKENS, seq_len)


# ------------------------------------------------------------------------------------------- units + VJP


def _unit_formula(a, n, wa, wn, c, g):
    """The kernels' math in ``jnp`` on whole arrays (``[B,T,J·U]`` rows, ``[J,U,U]`` weights): the ``cuda``
    branch of ``impl="pallas"``."""
    bsz, seq_len, _ = a.shape
    units, u = wa.shape[0], wa.shape[1]
    split = lambda x: x.reshape(bsz, seq_len, units, u)
    z = jnp.einsum("btju,juv->btjv", split(a), wa) + jnp.einsum("btju,juv->btjv", split(n), wn) + c[:, 0]
    m = split(a) + g[:, 0] * jax.nn.sigmoid(z) * (split(n) - split(a))
    return m.reshape(a.shape)


def _dispatch(interpret: bool, tpu_fn, *args):
    if interpret:
        return tpu_fn(*args, interpret=True)

    def cuda(*xs):
        if tpu_fn is _fwd_tpu:
            return _unit_formula(*xs)
        out, vjp = jax.vjp(_unit_formula, *xs[:6])
        return vjp(xs[6])

    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(tpu_fn, interpret=False),
        cuda=cuda,
        default=functools.partial(tpu_fn, interpret=True),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _units(a, n, wa, wn, c, g, interpret: bool):
    return _dispatch(interpret, _fwd_tpu, a, n, wa, wn, c, g)


def _units_fwd(a, n, wa, wn, c, g, interpret):
    return _units(a, n, wa, wn, c, g, interpret), (a, n, wa, wn, c, g)


def _units_bwd(interpret, res, dm):
    return tuple(_dispatch(interpret, _bwd_tpu, *res, dm))


_units.defvjp(_units_fwd, _units_bwd)


def _block_diag(w: jax.Array, p: int) -> jax.Array:
    """``[H,D,E]`` per-head matrices -> ``[H/P, P·D, P·E]``, ``P`` consecutive heads on each diagonal."""
    hh, d, e = w.shape
    blocks = w.reshape(hh // p, p, d, e)
    return jnp.einsum("jpde,pq->jpdqe", blocks, jnp.eye(p, dtype=w.dtype)).reshape(hh // p, p * d, p * e)


def _pallas(a, n, gate_w, gate_b, gamma, interpret: bool, partition: Partition | None):
    bsz, seq_len, hh, d = a.shape
    p = heads_per_unit(d)
    units = hh // p
    flat = lambda x: x.reshape(bsz, seq_len, hh * d)
    n_h = flat(jnp.repeat(n, hh // n.shape[2], axis=2))
    wa, wn = _block_diag(gate_w[:, :d], p), _block_diag(gate_w[:, d:], p)
    vec = lambda x: x.reshape(units, 1, p * d)
    args = (flat(a), n_h, wa, wn, vec(gate_b), vec(gamma))
    bt = _block_tokens(seq_len)
    pad = -seq_len % bt
    if pad:
        args = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in args[:2]) + args[2:]
    call = functools.partial(_units, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    axes = None if mesh.empty else _kernel_partition(mesh, bsz, units, seq_len + pad, partition)
    if axes is not None:
        bx, hx, sx = (_spec_axes(x) for x in axes)
        rows, weights = P(bx, sx, hx), P(hx, None, None)
        call = jax.shard_map(
            call, mesh=mesh, in_specs=(rows, rows) + (weights,) * 4, out_specs=rows, check_vma=False
        )
    return call(*args)[:, :seq_len].reshape(a.shape)


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
      impl: ``"xla"`` or ``"pallas"`` (needs :func:`kernel_supported`); interpret: run the Mosaic kernel in the
        Pallas interpreter on any platform (tests).
      partition: ``(batch_axes, head_axes[, sequence_axes])`` of ``a`` under a mesh (``impl="pallas"`` runs in a
        ``shard_map`` split that way); None: the op picks, as :func:`pallas_kernels.wkv7` does.
    """
    if impl not in IMPLS:
        raise ValueError(f"middle_heads: unknown impl {impl!r}; choose one of {IMPLS}")
    if a.ndim != 4 or n.ndim != 4 or n.shape[:2] != a.shape[:2] or n.shape[3] != a.shape[3]:
        raise ValueError(f"middle_heads: a must be [B,T,H,D] and n [B,T,G,D]; got {a.shape} and {n.shape}")
    hh, d = a.shape[2], a.shape[3]
    if hh % n.shape[2]:
        raise ValueError(f"middle_heads: the {n.shape[2]} groups of n must divide the {hh} heads of a")
    if gate_w.shape != (hh, 2 * d, d) or gate_b.shape != (hh, d) or gamma.shape != (hh, d):
        raise ValueError(
            f"middle_heads: expected gate_w {(hh, 2 * d, d)}, gate_b and gamma {(hh, d)}; got "
            f"{gate_w.shape}, {gate_b.shape}, {gamma.shape}"
        )
    if impl == "xla":
        return middle_heads_xla(a, n, gate_w, gate_b, gamma)
    if not kernel_supported(hh, d):
        raise ValueError(
            f"middle_heads: impl='pallas' needs a head size that divides 128 (with the heads filling "
            f"128-lane units) or is a multiple of 128; got H={hh}, D={d}. Use impl='xla'."
        )
    return _pallas(a, n, gate_w, gate_b, gamma, interpret, partition)

"""Stage B of the chunked RWKV-7 form (the inter-chunk state pass) as Mosaic TPU Pallas kernels.

Per batch element ``b`` and head ``h`` (state ``S`` ``[N_v, N_k]``, value rows x key columns)::

    forward:   S_0 = S0 ;  SA_c = U_c + W_c S_cᵀ ;  S_{c+1} = S_c ⊙ g_c + SA_cᵀ B̄_c + X_c
    backward:  R_{NC-1} = ∂S_final ;  dSA_c = G_SA,c + B̄_c R_cᵀ ;  R_{c-1} = G_S,c + R_c ⊙ g_c + dSA_cᵀ W_c

(``R_c = ∂L/∂S_{c+1}``, ``G_S,c`` / ``G_SA,c`` the cotangents of the emitted ``S_c`` / ``SA_c``; the remaining
gradients are batched einsums outside, see :mod:`pallas_kernels.wkv7_state_pass`).

TPU layout (``rwkv7-and-kernels.md`` §3.5): arrays are ``[B,H,NC,...]`` so every block's last two dims are the
full ``(L, N)`` / ``(N, N)`` / ``(1, N)`` of the array (legal for any L, N). Grid ``(B, H, NC / G)``: batch and
heads ``"parallel"`` (split over megacore TensorCores), the chunk-group axis last and ``"arbitrary"``
(sequential), each grid step handling ``G = chunks_per_step`` chunks with static indices on the untiled leading
block dim. The running state lives in an f32 VMEM scratch buffer for the whole walk; it is loaded from ``S0``
(forward) / ``∂S_final`` (backward) at the first step and written out at the last. The backward walks the
chunks in reverse through its index maps. Every dot is f32 x f32 -> f32 with ``Precision.HIGHEST`` (Mosaic
rounds f32 operands to bf16 otherwise), so the state pass is f32-exact. No cumsum, dynamic_slice or
integer division inside the kernels.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_HI = jax.lax.Precision.HIGHEST
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _dot(x: jax.Array, y: jax.Array, contract_x: int, contract_y: int) -> jax.Array:
    """2-D ``dot_general`` contracting ``x``'s dim ``contract_x`` with ``y``'s ``contract_y``, exact f32."""
    dims = (((contract_x,), (contract_y,)), ((), ()))
    return jax.lax.dot_general(x, y, dims, precision=_HI, preferred_element_type=x.dtype)


def _out_struct(shape: tuple[int, ...], dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """Output type that varies over every manual mesh axis any input varies over (``shard_map`` with
    ``check_vma``); outside ``shard_map`` the set is empty."""
    mats = [jax.typeof(x).mat for x in inputs]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def _check(w: jax.Array, chunks_per_step: int) -> tuple[int, int, int, int, int]:
    bsz, heads, num_chunks, chunk, n = w.shape
    if chunks_per_step < 1 or num_chunks % chunks_per_step:
        raise ValueError(
            f"wkv7 pallas (tpu): chunks_per_step={chunks_per_step} must divide the number of chunks {num_chunks}"
        )
    return bsz, heads, num_chunks, chunk, n


def _specs(chunk: int, n: int, group: int, num_steps: int, reverse: bool):
    """BlockSpecs over ``[B,H,NC,...]`` arrays; ``reverse`` walks the chunk groups backwards."""

    def chunk_map(b, h, c):
        return (b, h, num_steps - 1 - c if reverse else c, 0, 0)

    def state_map(b, h, c):
        return (b, h, 0, 0)

    rows = pl.BlockSpec((None, None, group, chunk, n), chunk_map)  # [G, L, N]
    square = pl.BlockSpec((None, None, group, n, n), chunk_map)  # [G, N, N]
    gate = pl.BlockSpec((None, None, group, 1, n), chunk_map)  # [G, 1, N]
    state = pl.BlockSpec((None, None, n, n), state_map)  # [N, N], resident across the chunk axis
    return rows, square, gate, state


def _fwd_kernel(w_ref, u_ref, g_ref, bb_ref, x_ref, s0_ref, s_in_ref, sa_ref, s_out_ref, s_scr):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        s_scr[...] = s0_ref[...]

    s = s_scr[...]
    for j in range(w_ref.shape[0]):  # the G chunks of this grid step, static indices
        s_in_ref[j] = s
        sa = u_ref[j] + _dot(w_ref[j], s, 1, 1)  # [L, N_v] = U + W Sᵀ
        sa_ref[j] = sa
        s = s * g_ref[j] + _dot(sa, bb_ref[j], 0, 0) + x_ref[j]  # S ⊙ g + SAᵀ B̄ + X
    s_scr[...] = s

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = s


def _bwd_kernel(w_ref, g_ref, bb_ref, gs_ref, gsa_ref, gout_ref, dsa_ref, r_ref, ds0_ref, r_scr):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        r_scr[...] = gout_ref[...]

    rr = r_scr[...]
    for j in reversed(range(w_ref.shape[0])):
        r_ref[j] = rr  # R_c = ∂L/∂S_{c+1}
        dsa = gsa_ref[j] + _dot(bb_ref[j], rr, 1, 1)  # [L, N_v] = G_SA + B̄ Rᵀ
        dsa_ref[j] = dsa
        rr = gs_ref[j] + rr * g_ref[j] + _dot(dsa, w_ref[j], 0, 0)  # G_S + R ⊙ g + dSAᵀ W
    r_scr[...] = rr

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = rr


@functools.partial(jax.jit, static_argnames=("chunks_per_step", "interpret"))
def state_pass_fwd_tpu(w, u, g, bb, x, s0, *, chunks_per_step: int = 1, interpret: bool = False):
    """Forward state pass. ``w, u, bb`` ``[B,H,NC,L,N]``, ``g`` ``[B,H,NC,N]``, ``x`` ``[B,H,NC,N,N]``, ``s0``
    ``[B,H,N,N]``, one float dtype. Returns ``S_c`` ``[B,H,NC,N,N]``, ``SA`` ``[B,H,NC,L,N]``, ``S_final``."""
    bsz, heads, num_chunks, chunk, n = _check(w, chunks_per_step)
    num_steps = num_chunks // chunks_per_step
    rows, square, gate, state = _specs(chunk, n, chunks_per_step, num_steps, reverse=False)
    dtype = s0.dtype
    inputs = (w, u, g[..., None, :], bb, x, s0)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(bsz, heads, num_steps),
        in_specs=[rows, rows, gate, rows, square, state],
        out_specs=[square, rows, state],
        out_shape=[
            _out_struct((bsz, heads, num_chunks, n, n), dtype, *inputs),
            _out_struct((bsz, heads, num_chunks, chunk, n), dtype, *inputs),
            _out_struct((bsz, heads, n, n), dtype, *inputs),
        ],
        scratch_shapes=[pltpu.VMEM((n, n), dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="wkv7_state_pass_fwd",
    )(*inputs)


@functools.partial(jax.jit, static_argnames=("chunks_per_step", "interpret"))
def state_pass_bwd_tpu(w, g, bb, gs, gsa, gout, *, chunks_per_step: int = 1, interpret: bool = False):
    """Reverse state pass. ``gs`` ``[B,H,NC,N,N]`` / ``gsa`` ``[B,H,NC,L,N]`` / ``gout`` ``[B,H,N,N]`` are the
    cotangents of the forward outputs. Returns ``dSA`` ``[B,H,NC,L,N]``, ``R`` ``[B,H,NC,N,N]``
    (``R_c = ∂L/∂S_{c+1}``) and ``∂S0`` ``[B,H,N,N]``."""
    bsz, heads, num_chunks, chunk, n = _check(w, chunks_per_step)
    num_steps = num_chunks // chunks_per_step
    rows, square, gate, state = _specs(chunk, n, chunks_per_step, num_steps, reverse=True)
    dtype = gout.dtype
    inputs = (w, g[..., None, :], bb, gs, gsa, gout)
    return pl.pallas_call(
        _bwd_kernel,
        grid=(bsz, heads, num_steps),
        in_specs=[rows, gate, rows, square, rows, state],
        out_specs=[rows, square, state],
        out_shape=[
            _out_struct((bsz, heads, num_chunks, chunk, n), dtype, *inputs),
            _out_struct((bsz, heads, num_chunks, n, n), dtype, *inputs),
            _out_struct((bsz, heads, n, n), dtype, *inputs),
        ],
        scratch_shapes=[pltpu.VMEM((n, n), dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="wkv7_state_pass_bwd",
    )(*inputs)

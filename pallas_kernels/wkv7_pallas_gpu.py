"""Stage B of the chunked RWKV-7 form (the inter-chunk state pass) as Pallas Triton kernels for NVIDIA GPUs.

Same recurrences as :mod:`pallas_kernels.wkv7_pallas_tpu`::

    forward:   S_0 = S0 ;  SA_c = U_c + W_c S_cᵀ ;  S_{c+1} = S_c ⊙ g_c + SA_cᵀ B̄_c + X_c
    backward:  R_{NC-1} = ∂S_final ;  dSA_c = G_SA,c + B̄_c R_cᵀ ;  R_{c-1} = G_S,c + R_c ⊙ g_c + dSA_cᵀ W_c

GPU programs cannot carry state across grid steps, so the chunk walk is a ``fori_loop`` inside one program
(the state lives in registers), and the grid is ``(B, H, N / BV)``: value rows of the state are independent
in both recurrences (row ``i`` of ``S_{c+1}`` needs only row ``i`` of ``S_c``, column ``i`` of ``U_c`` / ``SA_c``
and row ``i`` of ``X_c``), so each program owns ``BV`` rows, which multiplies the parallelism by ``N / BV``
(fla's ``BV`` split). ``W, B̄, g`` are shared by the row blocks of a head.

The Triton backend is selected explicitly (``pallas.triton.CompilerParams``): in JAX 0.10.2 Pallas defaults to
Mosaic GPU on NVIDIA, which is Hopper-only. Triton rules respected: every loaded / stored tile has a
power-of-two size (``L``, ``N``, ``BV`` powers of two), dots have every dim >= 16 (``L``, ``BV``, ``N`` >= 16),
chunks are indexed on the leading block dim with a scalar (no ``dynamic_slice``). Dots are f32 x f32 -> f32
with ``Precision.HIGHEST``, which the Triton lowering maps to IEEE f32 (not TF32): the state pass is
f32-exact.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HI = jax.lax.Precision.HIGHEST


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


def default_block_v(n: int) -> int:
    """Value rows per program: 32 (or N when smaller), i.e. 2 row blocks per head at N = 64."""
    return min(n, 32)


def _check(w: jax.Array, block_v: int) -> tuple[int, int, int, int, int]:
    bsz, heads, num_chunks, chunk, n = w.shape
    for name, size in (("chunk_size", chunk), ("head size N", n), ("block_v", block_v)):
        if size < 16 or size & (size - 1):
            raise ValueError(
                f"wkv7 pallas (gpu/triton): {name}={size} must be a power of two >= 16 (Triton tiles are powers "
                "of two and its dots need every dim >= 16)"
            )
    if n % block_v:
        raise ValueError(f"wkv7 pallas (gpu/triton): block_v={block_v} must divide the head size N={n}")
    return bsz, heads, num_chunks, chunk, n


def _specs(num_chunks: int, chunk: int, n: int, block_v: int):
    """BlockSpecs over ``[B,H,NC,...]`` arrays for the grid ``(B, H, N / BV)``: whole chunk axis per program."""
    shared = lambda *shape: pl.BlockSpec((None, None, *shape), lambda b, h, v: (b, h) + (0,) * len(shape))
    cols = pl.BlockSpec(
        (None, None, num_chunks, chunk, block_v), lambda b, h, v: (b, h, 0, 0, v)
    )  # [NC,L,BV]
    rows = pl.BlockSpec((None, None, num_chunks, block_v, n), lambda b, h, v: (b, h, 0, v, 0))  # [NC,BV,N]
    state = pl.BlockSpec((None, None, block_v, n), lambda b, h, v: (b, h, v, 0))  # [BV, N]
    return shared(num_chunks, chunk, n), shared(num_chunks, 1, n), cols, rows, state


def _fwd_kernel(w_ref, u_ref, g_ref, bb_ref, x_ref, s0_ref, s_in_ref, sa_ref, s_out_ref):
    def body(c, s):
        s_in_ref[c] = s
        sa = u_ref[c] + _dot(w_ref[c], s, 1, 1)  # [L, BV] = U + W Sᵀ
        sa_ref[c] = sa
        return s * g_ref[c] + _dot(sa, bb_ref[c], 0, 0) + x_ref[c]  # S ⊙ g + SAᵀ B̄ + X

    s_out_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0], body, s0_ref[...])


def _bwd_kernel(w_ref, g_ref, bb_ref, gs_ref, gsa_ref, gout_ref, dsa_ref, r_ref, ds0_ref):
    num_chunks = w_ref.shape[0]

    def body(i, rr):
        c = num_chunks - 1 - i
        r_ref[c] = rr  # R_c = ∂L/∂S_{c+1}
        dsa = gsa_ref[c] + _dot(bb_ref[c], rr, 1, 1)  # [L, BV] = G_SA + B̄ Rᵀ
        dsa_ref[c] = dsa
        return gs_ref[c] + rr * g_ref[c] + _dot(dsa, w_ref[c], 0, 0)  # G_S + R ⊙ g + dSAᵀ W

    ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, gout_ref[...])


def _params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "num_stages", "interpret"))
def state_pass_fwd_gpu(
    w,
    u,
    g,
    bb,
    x,
    s0,
    *,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret=False,
):
    """Forward state pass. ``w, u, bb`` ``[B,H,NC,L,N]``, ``g`` ``[B,H,NC,N]``, ``x`` ``[B,H,NC,N,N]``, ``s0``
    ``[B,H,N,N]``, one float dtype. Returns ``S_c`` ``[B,H,NC,N,N]``, ``SA`` ``[B,H,NC,L,N]``, ``S_final``."""
    n = w.shape[-1]
    block_v = block_v or default_block_v(n)
    bsz, heads, num_chunks, chunk, n = _check(w, block_v)
    full, gate, cols, rows, state = _specs(num_chunks, chunk, n, block_v)
    dtype = s0.dtype
    inputs = (w, u, g[..., None, :], bb, x, s0)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(bsz, heads, n // block_v),
        in_specs=[full, cols, gate, full, rows, state],
        out_specs=[rows, cols, state],
        out_shape=[
            _out_struct((bsz, heads, num_chunks, n, n), dtype, *inputs),
            _out_struct((bsz, heads, num_chunks, chunk, n), dtype, *inputs),
            _out_struct((bsz, heads, n, n), dtype, *inputs),
        ],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="wkv7_state_pass_fwd",
    )(*inputs)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "num_stages", "interpret"))
def state_pass_bwd_gpu(
    w,
    g,
    bb,
    gs,
    gsa,
    gout,
    *,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret=False,
):
    """Reverse state pass. ``gs`` ``[B,H,NC,N,N]`` / ``gsa`` ``[B,H,NC,L,N]`` / ``gout`` ``[B,H,N,N]`` are the
    cotangents of the forward outputs. Returns ``dSA`` ``[B,H,NC,L,N]``, ``R`` ``[B,H,NC,N,N]``
    (``R_c = ∂L/∂S_{c+1}``) and ``∂S0`` ``[B,H,N,N]``."""
    n = w.shape[-1]
    block_v = block_v or default_block_v(n)
    bsz, heads, num_chunks, chunk, n = _check(w, block_v)
    full, gate, cols, rows, state = _specs(num_chunks, chunk, n, block_v)
    dtype = gout.dtype
    inputs = (w, g[..., None, :], bb, gs, gsa, gout)
    return pl.pallas_call(
        _bwd_kernel,
        grid=(bsz, heads, n // block_v),
        in_specs=[full, gate, full, rows, cols, state],
        out_specs=[cols, rows, state],
        out_shape=[
            _out_struct((bsz, heads, num_chunks, chunk, n), dtype, *inputs),
            _out_struct((bsz, heads, num_chunks, n, n), dtype, *inputs),
            _out_struct((bsz, heads, n, n), dtype, *inputs),
        ],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="wkv7_state_pass_bwd",
    )(*inputs)

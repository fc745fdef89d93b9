"""``wkv7(..., impl="pallas")``: the whole RWKV-7 chunk in one Pallas kernel per direction.

Forward: one program per (batch element, head) walks the chunks in order with the running ``[N,N]`` state on
chip and computes each chunk in closed form (:func:`pallas_kernels.wkv7_chunk.chunk_forward`: decayed
interaction matrices, the exact ladder inverse, WY terms, outputs, state update), so no per-chunk
intermediate ever reaches HBM. It writes ``o``, the final state, and the state entering every chunk
(``[B,H,NC,N,N]`` float32, the backward's checkpoints: ``4 N² / L`` bytes per token-head, 256 B at N = L = 64
against 2,560 B of compulsory bf16 traffic; checkpointing every k-th chunk would trade that for a second
forward walk per group, see ``pallas_kernels/README.md``).

Backward (``jax.custom_vjp``): a reverse walk carrying ``∂L/∂S`` on chip; each chunk is recomputed from its
checkpoint and differentiated in the kernel (:func:`pallas_kernels.wkv7_chunk.chunk_backward`), giving all
seven input gradients (r, log w, k, v, a, b, initial state).

Layouts: the six inputs, ``o`` and the six gradients stay ``[B,T,H,N]`` in the caller's dtype (bf16 is read and
written as bf16, the chunk math is float32): a block is one chunk of one head, ``(L, N)`` rows strided by
``H·N`` in memory, so there is no transpose or cast pass in XLA. Resets come in as ``[B,T,1]`` float32.

Platforms: ``tpu`` -> Mosaic, grid ``(B, H, NC)`` with the chunk axis ``"arbitrary"`` and the state in a VMEM
scratch buffer; ``cuda`` -> Pallas Triton, grid ``(B, H)`` with a ``fori_loop`` over chunks and the state in
registers; ``cpu`` -> the Mosaic kernel in the Pallas interpreter (tests). Chosen at lowering time
(``lax.platform_dependent``), so an AOT lowering for TPU from a CPU host gets the TPU kernel.
``FusedConfig(variant=..., interpret=True)`` forces one (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.wkv7_chunk import chunk_backward, chunk_flops, chunk_forward

VARIANTS = ("tpu", "gpu")
#: default chunk length per platform (``pallas_kernels/README.md``, "Choosing L": FLOPs grow as L log L per token,
#: grid steps as 1/L)
DEFAULT_CHUNK = {"tpu": 32, "gpu": 16}


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Static knobs of the fused kernels (hashable: a ``custom_vjp`` non-differentiable argument).

    variant: None = by lowering platform; ``"tpu"`` / ``"gpu"`` = that kernel on every platform.
    interpret: run the forced variant through the Pallas interpreter (CPU tests).
    num_warps, num_stages: GPU (Triton) launch parameters.
    """

    variant: str | None = None
    interpret: bool = False
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"FusedConfig: variant {self.variant!r} is not one of {VARIANTS} (or None)")
        if self.interpret and self.variant is None:
            raise ValueError(
                "FusedConfig: interpret=True needs variant='tpu' or 'gpu' (the kernel to interpret)"
            )


def out_struct(shape: tuple[int, ...], dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """Output type varying over every manual mesh axis an input varies over (``shard_map`` with ``check_vma``)."""
    mats = [jax.typeof(x).mat for x in inputs]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def _cost(bsz, seq_len, heads, n, chunk, arrays, backward: bool) -> pl.CostEstimate:
    """FLOPs, transcendentals and bytes of the actual block traffic (``arrays``: every operand and result)."""
    flops, exps = chunk_flops(chunk, n)
    per_chunk_flops = flops * (3 if backward else 1)  # recompute + the transposed products
    per_chunk_exps = exps * (2 if backward else 1)
    num = bsz * heads * (seq_len // chunk)
    traffic = sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays)
    return pl.CostEstimate(
        flops=int(num * per_chunk_flops),
        transcendentals=int(num * per_chunk_exps),
        bytes_accessed=int(traffic),
    )


def _fwd_outputs(o_shape, o_dtype, s0, num_chunks: int, specs, inputs, save_states: bool):
    """``(out_shape, out_specs)`` of a forward kernel: ``o``, the state entering each chunk (only when
    ``save_states``: the backward's checkpoints) and the final state. ``specs`` = (rows, per-chunk, state)."""
    bsz, heads, n, _ = s0.shape
    shapes = ((o_shape, o_dtype), ((bsz, heads, num_chunks, n, n), s0.dtype), (s0.shape, s0.dtype))
    outs = [
        (out_struct(shape, dtype, *inputs), spec) for (shape, dtype), spec in zip(shapes, specs, strict=True)
    ]
    if not save_states:
        del outs[1]
    return [o for o, _ in outs], [spec for _, spec in outs]


# ------------------------------------------------------------------------------------------- TPU (Mosaic)


def _to_head_major(refs, bufs, n: int) -> None:
    """``[L, G·N]`` lane-dense blocks (any dtype) -> float32 ``[G, L, N]`` VMEM buffers (static lane slices)."""
    for ref, buf in zip(refs, bufs, strict=True):
        for j in range(buf.shape[0]):
            buf[j] = ref[:, j * n : (j + 1) * n].astype(buf.dtype)


def _from_head_major(bufs, refs, n: int) -> None:
    for buf, ref in zip(bufs, refs, strict=True):
        for j in range(buf.shape[0]):
            ref[:, j * n : (j + 1) * n] = buf[j].astype(ref.dtype)


def _tpu_fwd_kernel(*refs, save_states: bool):
    """Refs: 6 input blocks ``[L, G·N]``, reset ``[L,1]``, S0 ``[G,N,N]``; outputs o ``[L, G·N]``, S_c
    ``[G,N,N]``, S_final ``[G,N,N]``; scratch: state ``[G,N,N]``, 6 input + 1 output f32 ``[G,L,N]`` buffers.

    The G heads of a block are a ``fori_loop`` (an unrolled loop keeps every head's temporaries alive at once
    and overflows VMEM in the backward); a dynamic index is only legal on a leading dim, so each block is moved
    once to head-major float32 buffers with static lane slices."""
    if not save_states:  # a forward-only call: no checkpoints for a backward pass
        refs = (*refs[:9], None, *refs[9:])
    in_refs, (reset_ref, s0_ref, o_ref, s_in_ref, s_out_ref, s_scr), bufs = refs[:6], refs[6:12], refs[12:]
    in_bufs, o_buf = bufs[:6], bufs[6]
    n = s_scr.shape[-1]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...]

    _to_head_major(in_refs, in_bufs, n)
    reset = reset_ref[...] > 0

    def head(j, carry):
        s = s_scr[j]
        if s_in_ref is not None:
            s_in_ref[j] = s
        o_buf[j], s_scr[j] = chunk_forward(s, *(buf[j] for buf in in_bufs), reset)
        return carry

    jax.lax.fori_loop(0, s_scr.shape[0], head, 0)
    _from_head_major([o_buf], [o_ref], n)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        s_out_ref[...] = s_scr[...]


def _tpu_bwd_kernel(*refs):
    """Refs: 6 input blocks, reset, S_c ``[G,N,N]``, dO ``[L, G·N]``, ∂S_final; outputs: 6 gradient blocks,
    ∂S0; scratch: ∂S ``[G,N,N]``, 7 input + 6 gradient f32 ``[G,L,N]`` buffers (see the forward kernel)."""
    in_refs, (reset_ref, s_in_ref, do_ref, dsf_ref), rest = refs[:6], refs[6:10], refs[10:]
    grad_refs, ds0_ref, ds_scr, bufs = rest[:6], rest[6], rest[7], rest[8:]
    in_bufs, grad_bufs = bufs[:7], bufs[7:]
    n = ds_scr.shape[-1]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        ds_scr[...] = dsf_ref[...]

    _to_head_major((*in_refs, do_ref), in_bufs, n)
    reset = reset_ref[...] > 0

    def head(j, carry):
        *rows, do = (buf[j] for buf in in_bufs)
        ds_scr[j], *grads = chunk_backward(s_in_ref[j], *rows, reset, do, ds_scr[j])
        for buf, g in zip(grad_bufs, grads, strict=True):
            buf[j] = g
        return carry

    jax.lax.fori_loop(0, ds_scr.shape[0], head, 0)
    _from_head_major(grad_bufs, grad_refs, n)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_scr[...]


def tpu_head_group(heads: int, n: int) -> int:
    """Heads per TPU program. A block of the lane-dense ``[B, T, H·N]`` view is ``(L, G·N)``, whose last dim must
    be a multiple of 128 lanes or the whole ``H·N``: the largest ``G`` with ``G·N`` in {512, 256, 128} lanes that
    divides H (more heads per grid step amortise the ~0.35 µs step overhead), else all H."""
    for lanes in (512, 256, 128):
        group = max(1, lanes // n)
        if heads % group == 0:
            return group
    return heads


def _tpu_specs(chunk: int, n: int, group: int, num_chunks: int, reverse: bool):
    def chunk_idx(c):
        return num_chunks - 1 - c if reverse else c

    rows = pl.BlockSpec((None, chunk, group * n), lambda b, h, c: (b, chunk_idx(c), h))  # [L, G·N]
    reset = pl.BlockSpec((None, chunk, 1), lambda b, h, c: (b, chunk_idx(c), 0))  # [L, 1]
    per_chunk = pl.BlockSpec((None, group, None, n, n), lambda b, h, c: (b, h, chunk_idx(c), 0, 0))  # [G,N,N]
    state = pl.BlockSpec((None, group, n, n), lambda b, h, c: (b, h, 0, 0))  # [G,N,N], resident over chunks
    return rows, reset, per_chunk, state


_TPU_PARAMS = dict(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _lane_dense(*xs: jax.Array) -> list[jax.Array]:
    """``[B,T,H,N]`` -> ``[B,T,H·N]``: the layout of the projections that produce them (a free reshape)."""
    return [x.reshape(*x.shape[:2], -1) for x in xs]


def _fwd_tpu(r, w, k, v, a, b, reset, s0, *, chunk: int, interpret: bool, save_states: bool):
    bsz, seq_len, heads, n = r.shape
    num_chunks, group = seq_len // chunk, tpu_head_group(heads, n)
    rows, reset_spec, per_chunk, state = _tpu_specs(chunk, n, group, num_chunks, reverse=False)
    inputs = (*_lane_dense(r, w, k, v, a, b), reset, s0)
    out_shape, out_specs = _fwd_outputs(
        inputs[0].shape, r.dtype, s0, num_chunks, (rows, per_chunk, state), inputs, save_states
    )
    o, *states = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, save_states=save_states),
        grid=(bsz, heads // group, num_chunks),
        in_specs=[rows] * 6 + [reset_spec, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((group, n, n), s0.dtype)] + [pltpu.VMEM((group, chunk, n), s0.dtype)] * 7,
        compiler_params=pltpu.CompilerParams(**_TPU_PARAMS),
        cost_estimate=_cost(bsz, seq_len, heads, n, chunk, (*inputs, *out_shape), backward=False),
        interpret=interpret,
        name="wkv7_fused_fwd",
    )(*inputs)
    return (o.reshape(r.shape), *states)


def _bwd_tpu(r, w, k, v, a, b, reset, s_in, do, dsf, *, chunk: int, interpret: bool):
    bsz, seq_len, heads, n = r.shape
    num_chunks, group = seq_len // chunk, tpu_head_group(heads, n)
    rows, reset_spec, per_chunk, state = _tpu_specs(chunk, n, group, num_chunks, reverse=True)
    rows_in = _lane_dense(r, w, k, v, a, b)
    inputs = (*rows_in, reset, s_in, *_lane_dense(do), dsf)
    out_shape = [out_struct(x.shape, x.dtype, *inputs) for x in rows_in]
    out_shape.append(out_struct(dsf.shape, dsf.dtype, *inputs))
    *grads, ds0 = pl.pallas_call(
        _tpu_bwd_kernel,
        grid=(bsz, heads // group, num_chunks),
        in_specs=[rows] * 6 + [reset_spec, per_chunk, rows, state],
        out_specs=[rows] * 6 + [state],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((group, n, n), dsf.dtype)]
        + [pltpu.VMEM((group, chunk, n), dsf.dtype)] * 13,
        compiler_params=pltpu.CompilerParams(**_TPU_PARAMS),
        cost_estimate=_cost(bsz, seq_len, heads, n, chunk, (*inputs, *out_shape), backward=True),
        interpret=interpret,
        name="wkv7_fused_bwd",
    )(*inputs)
    return (*(g.reshape(r.shape) for g in grads), ds0)


# ------------------------------------------------------------------------------------------- GPU (Triton)


def _gpu_fwd_kernel(*refs, num_chunks: int, save_states: bool):
    if not save_states:
        refs = (*refs[:9], None, *refs[9:])
    r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, reset_ref, s0_ref, o_ref, s_in_ref, s_out_ref = refs
    chunk = reset_ref.shape[0] // num_chunks

    def body(c, s):
        at = pl.ds(c * chunk, chunk)
        if s_in_ref is not None:
            s_in_ref[c] = s
        rows = (x[at, :].astype(s.dtype) for x in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
        y, s = chunk_forward(s, *rows, reset_ref[at, :] > 0)
        o_ref[at, :] = y.astype(o_ref.dtype)
        return s

    s_out_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _gpu_bwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, reset_ref, s_in_ref, do_ref, dsf_ref, *refs):
    *grad_refs, ds0_ref = refs
    num_chunks = s_in_ref.shape[0]
    chunk = reset_ref.shape[0] // num_chunks

    def body(i, ds):
        c = num_chunks - 1 - i
        at = pl.ds(c * chunk, chunk)
        s = s_in_ref[c]
        rows = tuple(x[at, :].astype(s.dtype) for x in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
        ds, *grads = chunk_backward(s, *rows, reset_ref[at, :] > 0, do_ref[at, :].astype(s.dtype), ds)
        for ref, g in zip(grad_refs, grads, strict=True):
            ref[at, :] = g.astype(ref.dtype)
        return ds

    ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dsf_ref[...])


def _gpu_specs(seq_len: int, n: int, num_chunks: int):
    rows = pl.BlockSpec((None, seq_len, None, n), lambda b, h: (b, 0, h, 0))  # one head, whole sequence
    reset = pl.BlockSpec((None, seq_len, 1), lambda b, h: (b, 0, 0))
    per_chunk = pl.BlockSpec((None, None, num_chunks, n, n), lambda b, h: (b, h, 0, 0, 0))
    state = pl.BlockSpec((None, None, n, n), lambda b, h: (b, h, 0, 0))
    return rows, reset, per_chunk, state


def _fwd_gpu(
    r,
    w,
    k,
    v,
    a,
    b,
    reset,
    s0,
    *,
    chunk: int,
    interpret: bool,
    num_warps: int,
    num_stages: int,
    save_states: bool,
):
    bsz, seq_len, heads, n = r.shape
    num_chunks = seq_len // chunk
    rows, reset_spec, per_chunk, state = _gpu_specs(seq_len, n, num_chunks)
    inputs = (r, w, k, v, a, b, reset, s0)
    out_shape, out_specs = _fwd_outputs(
        r.shape, r.dtype, s0, num_chunks, (rows, per_chunk, state), inputs, save_states
    )
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, num_chunks=num_chunks, save_states=save_states),
        grid=(bsz, heads),
        in_specs=[rows] * 6 + [reset_spec, state],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=_cost(bsz, seq_len, heads, n, chunk, (*inputs, *out_shape), backward=False),
        interpret=interpret,
        name="wkv7_fused_fwd",
    )(*inputs)


def _bwd_gpu(
    r, w, k, v, a, b, reset, s_in, do, dsf, *, chunk: int, interpret: bool, num_warps: int, num_stages: int
):
    bsz, seq_len, heads, n = r.shape
    num_chunks = seq_len // chunk
    rows, reset_spec, per_chunk, state = _gpu_specs(seq_len, n, num_chunks)
    inputs = (r, w, k, v, a, b, reset, s_in, do, dsf)
    out_shape = [out_struct(x.shape, x.dtype, *inputs) for x in (r, w, k, v, a, b)]
    out_shape.append(out_struct(dsf.shape, dsf.dtype, *inputs))
    return pl.pallas_call(
        _gpu_bwd_kernel,
        grid=(bsz, heads),
        in_specs=[rows] * 6 + [reset_spec, per_chunk, rows, state],
        out_specs=[rows] * 6 + [state],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=_cost(bsz, seq_len, heads, n, chunk, (*inputs, *out_shape), backward=True),
        interpret=interpret,
        name="wkv7_fused_bwd",
    )(*inputs)


# ------------------------------------------------------------------------------------------- dispatch + VJP


def _dispatch(cfg: FusedConfig, chunk: int, tpu_fn, gpu_fn, *args):
    tpu = functools.partial(tpu_fn, chunk=chunk)
    gpu = functools.partial(gpu_fn, chunk=chunk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.variant is not None:
        return (tpu if cfg.variant == "tpu" else gpu)(*args, interpret=cfg.interpret)
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(tpu, interpret=False),
        cuda=functools.partial(gpu, interpret=False),
        default=functools.partial(tpu, interpret=True),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _fused(r, w, k, v, a, b, reset, s0, chunk: int, cfg: FusedConfig):
    fwd_tpu, fwd_gpu = (functools.partial(f, save_states=False) for f in (_fwd_tpu, _fwd_gpu))
    return tuple(_dispatch(cfg, chunk, fwd_tpu, fwd_gpu, r, w, k, v, a, b, reset, s0))


def _fused_fwd(r, w, k, v, a, b, reset, s0, chunk, cfg):
    fwd_tpu, fwd_gpu = (functools.partial(f, save_states=True) for f in (_fwd_tpu, _fwd_gpu))
    o, s_in, s_final = _dispatch(cfg, chunk, fwd_tpu, fwd_gpu, r, w, k, v, a, b, reset, s0)
    return (o, s_final), (r, w, k, v, a, b, reset, s_in)


def _fused_bwd(chunk, cfg, res, cotangents):
    r, w, k, v, a, b, reset, s_in = res
    do, dsf = cotangents
    *grads, ds0 = _dispatch(cfg, chunk, _bwd_tpu, _bwd_gpu, r, w, k, v, a, b, reset, s_in, do, dsf)
    return (*grads, jnp.zeros_like(reset), ds0)


_fused.defvjp(_fused_fwd, _fused_bwd)


def wkv7_fused(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int,
    config: FusedConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[B,T,H,N]`` in their own dtype (bf16 stays bf16 in HBM), ``initial_state`` ``[B,H,N,N]`` in the
    state dtype (float32; float64 only with an interpreted kernel), ``reset`` bool ``[B,T]`` or None. Any ``T``
    (the tail is padded with identity steps: ℓ = 0, everything else 0). Returns ``o`` ``[B,T,H,N]`` in r's dtype
    and the final state."""
    chunk = int(chunk_size)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"wkv7 pallas: chunk_size={chunk} must be a power of two >= 16 (Triton dot tiles)")
    bsz, seq_len, _, _ = r.shape
    reset = jnp.zeros((bsz, seq_len), jnp.float32) if reset is None else reset.astype(jnp.float32)
    pad = -seq_len % chunk
    xs = (r, log_w, k, v, a, b)
    if pad:
        xs = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in xs)
        reset = jnp.pad(reset, ((0, 0), (0, pad)))
    o, s_final = _fused(*xs, reset[..., None], initial_state, chunk, config or FusedConfig())
    return o[:, :seq_len], s_final

"""Stage B of the chunked RWKV-7 form with a hand-written VJP, dispatched to a Pallas kernel per platform.

``state_pass(w, u, g, b_bar, x, s0, config)`` (shapes as in :func:`pallas_kernels.wkv7_chunked.state_pass_scan`)::

    S_0 = s0 ;  SA_c = U_c + W_c S_cᵀ ;  S_{c+1} = S_c ⊙ g_c + SA_cᵀ B̄_c + X_c      -> (S_c, SA_c, S_NC)

Backward (``rwkv7-and-kernels.md`` §6.2): a second kernel walks the chunks in reverse carrying
``R_c = ∂L/∂S_{c+1}``, ``dSA_c = G_SA,c + B̄_c R_cᵀ``, ``R_{c-1} = G_S,c + R_c ⊙ g_c + dSA_cᵀ W_c``; the rest are
batched einsums over all chunks: ``dU = dSA``, ``dW = dSA S_c``, ``dB̄ = SA R_c``, ``dX = R_c``,
``dg = Σ_rows R_c ⊙ S_c``, ``dS0 = R_{-1}``.

Kernel selection happens at lowering time through ``lax.platform_dependent`` (so an AOT lowering for TPU from a
CPU host gets the TPU kernel): ``tpu`` -> Mosaic kernel (:mod:`pallas_kernels.wkv7_pallas_tpu`), ``cuda`` ->
Pallas Triton kernel (:mod:`pallas_kernels.wkv7_pallas_gpu`), ``cpu`` -> the TPU kernel through the Pallas
interpreter, anything else -> the same recurrences as ``lax.scan`` (no kernel). ``StatePassConfig(variant=...)``
forces one kernel for every platform (with ``interpret=True`` to run it on CPU in tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import wkv7_pallas_gpu as gpu
from pallas_kernels import wkv7_pallas_tpu as tpu
from pallas_kernels.wkv7_chunked import state_pass_scan

_HI = jax.lax.Precision.HIGHEST
VARIANTS = ("tpu", "gpu", "scan")


@dataclasses.dataclass(frozen=True)
class StatePassConfig:
    """Static knobs of the stage-B kernels (hashable: a ``custom_vjp`` non-differentiable argument).

    variant: None = by lowering platform (see module docstring); ``"tpu"`` / ``"gpu"`` = that kernel on every
      platform; ``"scan"`` = the ``lax.scan`` form (no kernel).
    interpret: run a forced kernel variant through the Pallas interpreter (CPU tests).
    chunks_per_step: TPU, chunks handled per grid step (must divide the number of chunks).
    block_v: GPU, value rows per program (power of two >= 16 dividing N; default min(N, 32)).
    num_warps, num_stages: GPU, Triton launch parameters.
    """

    variant: str | None = None
    interpret: bool = False
    chunks_per_step: int = 1
    block_v: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"StatePassConfig: variant {self.variant!r} is not one of {VARIANTS} (or None)")
        if self.interpret and self.variant not in ("tpu", "gpu"):
            raise ValueError(
                "StatePassConfig: interpret=True needs variant='tpu' or 'gpu' (the kernel to interpret)"
            )


def _tpu_chunks_per_step(num_chunks: int, wanted: int) -> int:
    """The largest divisor of ``num_chunks`` not above ``wanted``."""
    return max(d for d in range(1, min(wanted, num_chunks) + 1) if num_chunks % d == 0)


def _fwd_impls(cfg: StatePassConfig, num_chunks: int):
    per_step = _tpu_chunks_per_step(num_chunks, cfg.chunks_per_step)
    gpu_kw = dict(block_v=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return {
        "tpu": lambda *xs, interpret=False: tpu.state_pass_fwd_tpu(
            *xs, chunks_per_step=per_step, interpret=interpret
        ),
        "gpu": lambda *xs, interpret=False: gpu.state_pass_fwd_gpu(*xs, **gpu_kw, interpret=interpret),
        "scan": lambda *xs, interpret=False: state_pass_scan(*xs),
    }


def _bwd_impls(cfg: StatePassConfig, num_chunks: int):
    per_step = _tpu_chunks_per_step(num_chunks, cfg.chunks_per_step)
    gpu_kw = dict(block_v=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return {
        "tpu": lambda *xs, interpret=False: tpu.state_pass_bwd_tpu(
            *xs, chunks_per_step=per_step, interpret=interpret
        ),
        "gpu": lambda *xs, interpret=False: gpu.state_pass_bwd_gpu(*xs, **gpu_kw, interpret=interpret),
        "scan": lambda *xs, interpret=False: state_pass_bwd_scan(*xs),
    }


def _dispatch(impls, cfg: StatePassConfig, *args):
    if cfg.variant is not None:
        return impls[cfg.variant](*args, interpret=cfg.interpret)
    return jax.lax.platform_dependent(
        *args,
        tpu=impls["tpu"],
        cuda=impls["gpu"],
        cpu=functools.partial(impls["tpu"], interpret=True),
        default=impls["scan"],
    )


def state_pass_bwd_scan(w, g, bb, gs, gsa, gout):
    """The reverse recurrence as a ``lax.scan`` (same contract as the backward kernels)."""

    def step(rr, xs):
        w_c, g_c, bb_c, gs_c, gsa_c = xs
        dsa = gsa_c + jnp.einsum("...tj,...ij->...ti", bb_c, rr, precision=_HI)
        r_prev = gs_c + rr * g_c[..., None, :] + jnp.einsum("...ti,...tj->...ij", dsa, w_c, precision=_HI)
        return r_prev, (dsa, rr)

    xs = tuple(jnp.moveaxis(t, 2, 0) for t in (w, g, bb, gs, gsa))
    ds0, (dsa, r_all) = jax.lax.scan(step, gout, xs, reverse=True)
    return jnp.moveaxis(dsa, 0, 2), jnp.moveaxis(r_all, 0, 2), ds0


def _fwd_dispatch(w, u, g, bb, x, s0, cfg):
    return _dispatch(_fwd_impls(cfg, w.shape[2]), cfg, w, u, g, bb, x, s0)


def _bwd_dispatch(w, g, bb, gs, gsa, gout, cfg):
    return _dispatch(_bwd_impls(cfg, w.shape[2]), cfg, w, g, bb, gs, gsa, gout)


# Sharding: the kernels are independent per batch element and head and need everything else whole. XLA cannot
# partition a Pallas custom call by itself (Triton: operands gathered on every device; Mosaic: an error, "wrap
# the call in a shard_map"), so off TPU each kernel call is a custom_partitioning op whose dims 0, 1 (B, H)
# keep the operands' sharding and whose other dims are replicated: each device runs the kernel on its own
# [B/.., H/.., ...] block. On one device, or inside shard_map, it is the plain kernel call. On TPU
# custom_partitioning is not wired through libtpu (jax-ml/jax#38196: "Custom emitter for
# CustomSPMDPartitioning not found"), so there the kernel is called as is and a multi-device TPU caller must
# call wkv7 inside shard_map (Mosaic's own error says so).
_FWD_RULE = "b h c l k, b h c l v, b h c k, b h c l k, b h c v k, b h v k -> b h c v k, b h c l v, b h v k"
_BWD_RULE = "b h c l k, b h c k, b h c l k, b h c v k, b h c l v, b h v k -> b h c l v, b h c v k, b h v k"
_WHOLE_DIMS = ("c", "l", "k", "v")


def _batch_head_shardings(mesh, shapes, reference):
    """NamedShardings for ``shapes``: dims 0, 1 as in ``reference``'s sharding, every other dim replicated."""
    sharding = reference.sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    lead = (tuple(spec) + (None, None))[:2]
    return tuple(NamedSharding(mesh, P(*lead, *([None] * (len(x.shape) - 2)))) for x in shapes)


def _partitioned(dispatch, rule: str):
    op = custom_partitioning(dispatch, static_argnums=(6,))

    def infer(cfg, mesh, arg_shapes, result_shape):
        return _batch_head_shardings(mesh, result_shape, arg_shapes[0])

    def partition(cfg, mesh, arg_shapes, result_shape):
        results = _batch_head_shardings(mesh, result_shape, arg_shapes[0])
        args = _batch_head_shardings(mesh, arg_shapes, arg_shapes[0])
        return mesh, lambda *xs: dispatch(*xs, cfg), results, args

    op.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        sharding_rule=rule,
        need_replication_factors=_WHOLE_DIMS,
    )
    return op


_fwd_partitioned = _partitioned(_fwd_dispatch, _FWD_RULE)
_bwd_partitioned = _partitioned(_bwd_dispatch, _BWD_RULE)


@functools.cache
def _batchable(partitioned, cfg: StatePassConfig):
    """``partitioned(..., cfg)`` with a vmap rule (custom_partitioning has none): vmapped axes fold into B."""

    @jax.custom_batching.custom_vmap
    def op(*xs):
        dispatch = partitioned.fun  # the undecorated _fwd_dispatch / _bwd_dispatch
        return tuple(
            jax.lax.platform_dependent(
                *xs, tpu=lambda *a: dispatch(*a, cfg), default=lambda *a: partitioned(*a, cfg)
            )
        )

    @op.def_vmap
    def rule(axis_size, in_batched, *xs):
        xs = [
            x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(xs, in_batched, strict=True)
        ]
        outs = op(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in xs))
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), (True,) * len(outs)

    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def state_pass(w, u, g, bb, x, s0, cfg: StatePassConfig):
    """Stage B: returns the state entering each chunk ``[B,H,NC,N,N]``, ``SA`` ``[B,H,NC,L,N]`` and the final
    state ``[B,H,N,N]``. All inputs share one float dtype (the state dtype, float32)."""
    return tuple(_batchable(_fwd_partitioned, cfg)(w, u, g, bb, x, s0))


def _state_pass_fwd(w, u, g, bb, x, s0, cfg):
    s_in, sa, s_out = state_pass(w, u, g, bb, x, s0, cfg)
    return (s_in, sa, s_out), (w, g, bb, s_in, sa)


def _state_pass_bwd(cfg, res, cotangents):
    w, g, bb, s_in, sa = res
    gs, gsa, gout = cotangents
    dsa, r_all, ds0 = _batchable(_bwd_partitioned, cfg)(w, g, bb, gs, gsa, gout)
    dw = jnp.einsum("...ti,...ij->...tj", dsa, s_in, precision=_HI)  # dSA S_c
    dbb = jnp.einsum("...ti,...ij->...tj", sa, r_all, precision=_HI)  # SA R_c
    dg = jnp.sum(r_all * s_in, axis=-2)  # Σ_rows R_c ⊙ S_c
    return dw, dsa, dg, dbb, r_all, ds0


state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)

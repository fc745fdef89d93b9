"""Public RWKV-7 recurrence op: ``wkv7(r, log_w, k, v, a, b, initial_state, *, reset, impl, ...)``.

One function, several implementations with identical semantics (``ARCHITECTURE.md`` §3):

* ``"reference"``: sequential ``lax.scan`` (:mod:`pallas_kernels.wkv7_reference`), float32 or float64;
* ``"chunked"``: chunked WY form in plain JAX (:mod:`pallas_kernels.wkv7_chunked`), the CPU default;
* ``"pallas"``: the whole chunk in one Pallas kernel per direction (:mod:`pallas_kernels.wkv7_fused`; Mosaic on
  TPU, Triton on GPU, the Pallas interpreter on CPU), exact for every decay;
* ``"auto"``: ``"pallas"`` on TPU and GPU backends; on CPU ``"chunked"`` (its gradient is the fastest there)
  except for a forward-only call (no gradient traced), which takes whichever of ``"chunked"`` and
  ``"reference"`` is faster for its length (:func:`cpu_forward_impl`).

Under a mesh (``jax.set_mesh``), ``impl="pallas"`` runs inside ``jax.shard_map``: XLA cannot partition a Mosaic
kernel (``"wrap the call in a shard_map"``), and the recurrence is independent per batch element and head, so
each device runs the kernel on its own ``[B/.., T, H/.., N]`` block. The caller says which mesh axes shard batch
and heads (``partition=(batch_axes, head_axes)``; the model library derives them from its logical axis rules);
without it, batch takes the mesh axes (of size > 1) that divide it, in mesh order, and heads the remaining ones.
With a third entry, ``sequence_axes`` (context parallelism, any implementation), each device holds a block of
the sequence: it runs the op on its block twice (a local pass and a transition pass) and one all-gather of
``[B,H,N,N]`` block summaries joins the blocks exactly (:mod:`pallas_kernels.wkv7_sequence`); no device holds
another block's activations. Without sequence axes the sequence is whole on every device. A one-device mesh,
or a call already inside ``shard_map`` over every mesh axis, is left as is.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.wkv7_chunked import wkv7_chunked
from pallas_kernels.wkv7_fused import DEFAULT_CHUNK, wkv7_fused
from pallas_kernels.wkv7_reference import wkv7_reference
from pallas_kernels.wkv7_sequence import wkv7_sequence_sharded

SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
MeshAxes = str | tuple[str, ...] | None
#: ``(batch_axes, head_axes[, sequence_axes])``: the mesh axes of the ``B``, ``H`` (and ``T``) dims of ``[B,T,H,N]``
Partition = tuple[MeshAxes, MeshAxes] | tuple[MeshAxes, MeshAxes, MeshAxes]
#: every implementation name, shared by the op and the model families' ``wkv_impl``
IMPLS = ("auto", "reference", "chunked", "pallas")


def _is_concrete(x: jax.Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate(r, log_w, k, v, a, b, initial_state, reset, impl, chunk_size) -> None:
    names = ("r", "log_w", "k", "v", "a", "b")
    arrays = (r, log_w, k, v, a, b)
    if r.ndim != 4:
        raise ValueError(f"wkv7: r must be [B,T,H,N], got shape {r.shape}")
    for name, x in zip(names, arrays, strict=True):
        if x.shape != r.shape:
            raise ValueError(
                f"wkv7: {name} has shape {x.shape} but r has {r.shape}; all of r, log_w, k, v, a, b must be "
                "[B,T,H,N] with the same shape"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"wkv7: {name} must be a floating dtype (float32/bfloat16), got {x.dtype}")
    bsz, seq_len, heads, n = r.shape
    if seq_len < 1:
        raise ValueError("wkv7: the sequence is empty (T = 0)")
    if n not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"wkv7: head size N={n} is not supported; use one of {SUPPORTED_HEAD_SIZES}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, heads, n, n):
        raise ValueError(
            f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected [B,H,N,N] = "
            f"{(bsz, heads, n, n)} (value rows x key columns)"
        )
    if reset is not None:
        if tuple(reset.shape) != (bsz, seq_len):
            raise ValueError(f"wkv7: reset has shape {tuple(reset.shape)}, expected [B,T] = {(bsz, seq_len)}")
        if reset.dtype != jnp.bool_:
            raise ValueError(f"wkv7: reset must be a bool array, got {reset.dtype}")
    if impl not in IMPLS:
        raise ValueError(f"wkv7: unknown impl {impl!r}; choose one of {IMPLS}")
    if chunk_size is not None and (not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
        raise ValueError(f"wkv7: chunk_size must be a positive int, got {chunk_size!r}")
    if _is_concrete(log_w):
        top = float(jnp.max(log_w))
        if top > 0:
            raise ValueError(
                f"wkv7: log_w must be <= 0 (it is log of a decay in (0, 1]); got max {top:g}. "
                "Pass log(w), e.g. -exp(-0.5) * sigmoid(z), not w or a raw pre-activation."
            )


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _fit_axes(axes: MeshAxes, size: int, mesh, free: set[str]) -> tuple[str, ...]:
    """The longest prefix of ``axes`` that is free (auto, unused) and whose product divides ``size``."""
    out: list[str] = []
    for ax in _as_tuple(axes):
        if ax not in free or size % (math.prod(mesh.shape[a] for a in (*out, ax))) != 0:
            break
        out.append(ax)
    return tuple(out)


def _kernel_partition(
    mesh, bsz: int, heads: int, seq_len: int, wanted: Partition | None = None
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    """Mesh axes ``(batch, heads, sequence)`` for the shard_map around the op; None = no shard_map needed.

    ``wanted``: the caller's ``(batch_axes, head_axes[, sequence_axes])``; axes that are manual already, or
    whose size does not divide the batch / head count / sequence length, are dropped (those dims are then
    whole), and so are sequence axes of size 1. None: batch over the mesh axes that divide it, heads over the
    rest, the sequence whole.
    """
    free = {a for a in mesh.axis_names if a not in mesh.manual_axes}
    if math.prod(mesh.shape[a] for a in free) <= 1:
        return None
    if wanted is None:
        order = [a for a in mesh.axis_names if a in free and mesh.shape[a] > 1]
        batch = _fit_axes(tuple(order), bsz, mesh, free)
        rest = [a for a in order if a not in batch and heads % mesh.shape[a] == 0]
        wanted = (batch, tuple(rest))
    batch = _fit_axes(wanted[0], bsz, mesh, free)
    head = _fit_axes(wanted[1], heads, mesh, free - set(batch))
    split = tuple(a for a in _as_tuple(wanted[2] if len(wanted) > 2 else None) if mesh.shape[a] > 1)
    sequence = _fit_axes(split, seq_len, mesh, free - set(batch) - set(head))
    return batch, head, sequence


def _spec_axes(axes: tuple[str, ...]) -> MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def resolve_impl(impl: str) -> str:
    """``"auto"`` -> ``"pallas"`` on TPU / GPU; on other backends it stays ``"auto"`` (:func:`_cpu_auto`)."""
    if impl == "auto" and jax.default_backend() in ("tpu", "gpu"):
        return "pallas"
    return impl


def _default_chunk(impl: str) -> int:
    if impl == "pallas":
        return DEFAULT_CHUNK["gpu" if jax.default_backend() == "gpu" else "tpu"]
    return 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _cpu_auto(r, log_w, k, v, a, b, initial_state, reset, chunk_size):
    """``impl="auto"`` off TPU/GPU: the sequential scan when no gradient is taken (a forward-only call: eval,
    prefill; on CPU the scan's forward is 2-5x faster than the chunked one), the chunked form's forward and
    backward when one is (10x faster than differentiating the scan). ``jax.custom_vjp`` makes the choice
    wherever the differentiation happens (under ``jit``, ``remat`` or ``grad``); both are exact."""
    return wkv7_reference(r, log_w, k, v, a, b, initial_state, reset > 0)


def _cpu_auto_fwd(r, log_w, k, v, a, b, initial_state, reset, chunk_size):
    chunked = lambda *xs: wkv7_chunked(*xs, reset > 0, chunk_size=chunk_size)
    out, vjp = jax.vjp(chunked, r, log_w, k, v, a, b, initial_state)
    return out, (vjp, reset)


def _cpu_auto_bwd(chunk_size, res, cotangents):
    vjp, reset = res
    return (*vjp(cotangents), jnp.zeros_like(reset))


_cpu_auto.defvjp(_cpu_auto_fwd, _cpu_auto_bwd)


def wkv7(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    reset: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    partition: Partition | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The RWKV-7 generalized delta rule over a sequence, per batch element and head.

    ``S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ``, ``o_t = S_t r_t``, ``w_t = exp(log_w_t)``;
    ``S`` is ``[N_v, N_k]`` (value rows x key columns, BlinkDL's layout).

    Args:
      r, log_w, k, v, a, b: ``[B,T,H,N]``, float32 or bfloat16. ``log_w <= 0`` (any value, -inf and 0
        included). In RWKV-7, ``a = -κ̂`` and ``b = κ̂ ⊙ α``.
      initial_state: ``[B,H,N,N]`` (zeros when None).
      reset: optional bool ``[B,T]``: True at the first token of a new document in a packed row; the state
        entering that token is zero, so a packed row gives exactly the outputs of each document run alone.
      impl: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"pallas"``.
      chunk_size: chunk length of the chunked implementations, a power of two (default 16 for
        ``"chunked"``; for ``"pallas"`` (>= 16) 32 on TPU and 16 on GPU).
      partition: ``(batch_axes, head_axes[, sequence_axes])``, the mesh axes (a name, a tuple of names, or
        None each) that shard ``B``, ``H`` (and ``T``) of the inputs; under a mesh, ``impl="pallas"`` runs in
        a ``shard_map`` split that way, and so does every implementation when sequence axes (of size > 1) are
        given: each device then runs the op on its block of the sequence and the blocks are joined exactly
        (:mod:`pallas_kernels.wkv7_sequence`; module docstring). None: batch over the mesh axes that divide it,
        heads over the rest, the sequence whole. Ignored without a mesh.

    Returns:
      ``o`` ``[B,T,H,N]`` in r's dtype, and the final state ``[B,H,N,N]`` in float32 (float64 when the
      inputs are float64 under ``jax_enable_x64``). State and accumulation are float32 whatever the inputs.
    """
    _validate(r, log_w, k, v, a, b, initial_state, reset, impl, chunk_size)
    if partition is not None and not (isinstance(partition, tuple) and len(partition) in (2, 3)):
        raise ValueError(
            f"wkv7: partition must be (batch_axes, head_axes) or (batch_axes, head_axes, sequence_axes), "
            f"got {partition!r}"
        )
    impl = resolve_impl(impl)
    chunk = chunk_size or _default_chunk(impl)
    call = functools.partial(_wkv7_jit, impl=impl, chunk_size=chunk)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and (impl == "pallas" or (partition is not None and len(partition) > 2)):
        axes = _kernel_partition(mesh, r.shape[0], r.shape[2], r.shape[1], partition)
        if axes is not None and (impl == "pallas" or axes[2]):
            return _shard_mapped(call, mesh, axes, r, log_w, k, v, a, b, initial_state, reset)
    return call(r, log_w, k, v, a, b, initial_state, reset)


def _shard_mapped(call, mesh, partition, r, log_w, k, v, a, b, initial_state, reset):
    """``call`` inside ``jax.shard_map``: batch and heads split over ``partition``; with sequence axes, each
    device holds a block of the sequence and :func:`wkv7_sequence_sharded` joins the blocks (the sequence is
    otherwise whole on every device)."""
    bx, hx, sx = (_spec_axes(axes) for axes in partition)
    act, state, rows = P(bx, sx, hx, None), P(bx, hx), P(bx, sx)
    optional = {"initial_state": (initial_state, state), "reset": (reset, rows)}
    present = [name for name, (x, _) in optional.items() if x is not None]

    def local(*xs):
        extra = dict(zip(present, xs[6:], strict=True))
        s0, resets = extra.get("initial_state"), extra.get("reset")
        if sx is None:
            return call(*xs[:6], s0, resets)
        if s0 is None:
            bsz, _, heads, n = xs[0].shape
            s0 = jnp.zeros((bsz, heads, n, n), jnp.promote_types(xs[0].dtype, jnp.float32))
        return wkv7_sequence_sharded(call, *xs[:6], s0, resets, axis_name=sx)

    in_specs = (act,) * 6 + tuple(optional[name][1] for name in present)
    args = (r, log_w, k, v, a, b, *(optional[name][0] for name in present))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(act, state), check_vma=False)
    return mapped(*args)


def _vary_like_inputs(state: jax.Array, *inputs: jax.Array) -> jax.Array:
    """Inside ``shard_map`` (``check_vma``): mark the state varying over every manual axis an input varies
    over (a zero initial state is device-invariant, the state it becomes is not; a scan carry needs one type).
    Outside ``shard_map`` the sets are empty and this is the identity."""
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    missing = tuple(sorted(varying - jax.typeof(state).mat.varying))
    return jax.lax.pcast(state, missing, to="varying") if missing else state


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _wkv7_jit(r, log_w, k, v, a, b, initial_state, reset, *, impl: str, chunk_size: int):
    """One compiled program per shape (inlined when called under an outer ``jit``)."""
    out_dtype = r.dtype
    compute = jnp.promote_types(jnp.result_type(r, log_w, k, v, a, b), jnp.float32)
    bsz, seq_len, heads, n = r.shape
    if initial_state is None:
        initial_state = jnp.zeros((bsz, heads, n, n), compute)
    initial_state = _vary_like_inputs(initial_state.astype(compute), r, log_w, k, v, a, b)
    if impl == "pallas":  # the kernel reads and writes the inputs' own dtype (bf16 stays bf16 in HBM)
        return wkv7_fused(r, log_w, k, v, a, b, initial_state, reset, chunk_size)
    r, log_w, k, v, a, b = (x.astype(compute) for x in (r, log_w, k, v, a, b))
    if impl == "auto":
        reset = jnp.zeros((bsz, seq_len), compute) if reset is None else reset.astype(compute)
        o, state = _cpu_auto(r, log_w, k, v, a, b, initial_state, reset, chunk_size)
    elif impl == "reference":
        o, state = wkv7_reference(r, log_w, k, v, a, b, initial_state, reset)
    else:
        o, state = wkv7_chunked(r, log_w, k, v, a, b, initial_state, reset, chunk_size=chunk_size)
    return o.astype(out_dtype), state

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
  of HBM traffic per layer for them (``benchmarks/layer_traffic.py``).

Kernel layout: *feature-major*, ``[B, H·D, T]`` (tokens on the 128-wide lane axis, lane dense for any head size;
the layout the TPU compiler already gives the attention output, whose ``D = 64`` minor dim would otherwise be
padded to 128 lanes, so the transposes in the wrapper are layout changes it can absorb). One grid step is one
head's ``[D, bt]`` block: ``z^T = W^{aT} a^T + W^{nT} n^T + c`` (two ``[D,D]×[D,bt]`` MXU products, the group's
``n`` block picked by the index map, no broadcast to heads), then elementwise math in float32. Grid
``(H, B, T/bt)``: the forward is parallel everywhere; the backward accumulates a head's weight gradients over
``(B, T/bt)`` in its resident output blocks (float32) and writes ``n``'s gradient per head (in ``n``'s dtype),
summed over each group in XLA (in float32).

With ``w_out`` (``fusion: full``'s low-rank ``W_Om_a`` ``[H·D, r]``) the op returns ``m W_out`` ``[B,T,r]``
instead: the forward's grid runs the heads innermost and sums each head's ``W_out[h]^T m_h^T`` into a VMEM
accumulator, the backward forms ``dm_h = W_out[h] dy`` per head and accumulates ``dW_out``, so ``m`` and its
gradient never reach HBM.

The same kernel shape for the state→query injection (``q_h + λ_h ⊙ (r_{g(h)} W^state_h)``) was tried
(token-major) and gave nothing: its output must be transposed back to the head-major layout splash attention
reads. The state query is instead one dense product in the query projection's layout
(``wuneng_jax.models.wuneng_layer.query_with_state``).

Platforms (``impl="pallas"``): ``tpu`` -> Mosaic; ``cuda`` -> the formula and its JAX gradient (no Triton
variant); ``cpu`` -> the Mosaic kernels in the Pallas interpreter (tests). Under a mesh the kernels run in
``jax.shard_map`` over batch, heads (whole groups) and the sequence, as :func:`pallas_kernels.wkv7` does.
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
#: tokens per grid step (the whole sequence when it is shorter; longer ones are padded to a multiple)
BLOCK_TOKENS = 512
#: a head's rows must fill whole (16, 128) bf16 tiles
SUBLANES = 16
_HI = jax.lax.Precision.HIGHEST


def kernel_supported(num_heads: int, head_dim: int) -> bool:
    """Whether ``impl="pallas"`` takes ``H`` heads of size ``D``: ``D`` a multiple of 16 (a head's block rows)."""
    return num_heads >= 1 and head_dim % SUBLANES == 0


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


def _gate(a, n, wa_t, wn_t, c):
    """``σ(z)^T`` for one head's ``[D, bt]`` block (``wa_t``, ``wn_t``: ``W^{aT}``, ``W^{nT}``; ``c`` ``[D,1]``)
    in float32 (float64 for float64 inputs)."""
    f = _f32(a)
    z = _dot(wa_t, a, 1, 0, f) + _dot(wn_t, n, 1, 0, f) + c.astype(f)
    return 1.0 / (1.0 + jnp.exp(-z))


def _middle(a, n, s, g):
    """``m = a + γ σ(z) (n - a)`` in float32 from the block's ``σ(z)``."""
    af, nf = a.astype(s.dtype), n.astype(s.dtype)
    return af + g.astype(s.dtype) * s * (nf - af)


def _fwd_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, m_ref):
    a, n = a_ref[...], n_ref[...]
    s = _gate(a, n, wa_ref[...], wn_ref[...], c_ref[...])
    m_ref[...] = _middle(a, n, s, g_ref[...]).astype(m_ref.dtype)


def _fwd_proj_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, wo_ref, y_ref, acc_ref):
    """Grid ``(B, T/bt, H)``: ``y^T = Σ_h W_o[h]^T m_h^T`` accumulated over the heads (innermost) in VMEM."""
    h = pl.program_id(2)

    @pl.when(h == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    a, n = a_ref[...], n_ref[...]
    m = _middle(a, n, _gate(a, n, wa_ref[...], wn_ref[...], c_ref[...]), g_ref[...])
    acc_ref[...] += _dot(wo_ref[...], m.astype(a.dtype), 0, 0, acc_ref.dtype)

    @pl.when(h == pl.num_programs(2) - 1)
    def _():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _bwd_kernel(a_ref, n_ref, wa_ref, wn_ref, c_ref, g_ref, *refs, proj: bool):
    """Grid ``(H, B, T/bt)``. Without ``proj``: ``refs`` = ``dm`` then the six gradients. With ``proj``: ``W_o``,
    ``dy`` (the gradient of ``y``) then the six gradients and ``dW_o``; ``dm = W_o dy`` per head."""
    if proj:
        wo_ref, dy_ref, da_ref, dn_ref, dwa_ref, dwn_ref, dc_ref, dg_ref, dwo_ref = refs
        acc = (dwa_ref, dwn_ref, dc_ref, dg_ref, dwo_ref)
    else:
        dm_ref, da_ref, dn_ref, dwa_ref, dwn_ref, dc_ref, dg_ref = refs
        acc = (dwa_ref, dwn_ref, dc_ref, dg_ref)

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():  # a head's weight gradients start at zero on its first (row, token block)
        for ref in acc:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    a, n, wa_t, wn_t = a_ref[...], n_ref[...], wa_ref[...], wn_ref[...]
    s = _gate(a, n, wa_t, wn_t, c_ref[...])
    f = s.dtype
    af, nf, g = a.astype(f), n.astype(f), g_ref[...].astype(f)
    if proj:
        dy = dy_ref[...]
        dm = _dot(wo_ref[...], dy, 1, 0, f)  # [D, r] x [r, bt]
        dwo_ref[...] += _dot(_middle(a, n, s, g).astype(a.dtype), dy, 1, 1, dwo_ref.dtype)
    else:
        dm = dm_ref[...].astype(f)
    gs = g * s
    dm_d = dm * (nf - af)  # ∂L/∂(γ ⊙ s)
    dz = (dm_d * g * s * (1.0 - s)).astype(a.dtype)  # MXU operand in the compute dtype
    da_ref[...] = (dm * (1.0 - gs) + _dot(wa_t, dz, 0, 0, f)).astype(da_ref.dtype)
    dn_ref[...] = (dm * gs + _dot(wn_t, dz, 0, 0, f)).astype(dn_ref.dtype)
    dwa_ref[...] += _dot(dz, a, 1, 1, dwa_ref.dtype)
    dwn_ref[...] += _dot(dz, n, 1, 1, dwn_ref.dtype)
    dc_ref[...] += jnp.sum(dz.astype(f), axis=1, keepdims=True).astype(dc_ref.dtype)
    dg_ref[...] += jnp.sum(dm_d * s, axis=1, keepdims=True).astype(dg_ref.dtype)


def _block_tokens(seq_len: int) -> int:
    return seq_len if seq_len <= BLOCK_TOKENS else BLOCK_TOKENS


def _call(
    kernel, name: str, inputs, kinds: str, outputs, products: int, backward: bool, interpret: bool, **kw
):
    """One ``pallas_call``; ``inputs`` start with ``a^T`` ``[B,H·D,T]``, ``n^T`` ``[B,G·D,T]``, ``W^{aT}``
    ``[H,D,D]``; ``kinds`` (one per input) and the outputs' ``(shape, dtype, kind)`` name the blocks: ``a`` a
    head's rows, ``n`` its group's rows, ``m`` its ``[D,D]`` matrix, ``v`` its ``[D,1]`` vector, ``o`` its
    ``[D,r]`` output projection, ``y`` the ``[r,bt]`` rows of a ``[B,r,T]`` array. Grid ``(H, B, T/bt)``, or
    ``(B, T/bt, H)`` when ``kw["heads_last"]`` (a forward that sums over the heads)."""
    a, n, wa_t = inputs[0], inputs[1], inputs[2]
    bsz, _, seq_len = a.shape
    heads, d = wa_t.shape[0], wa_t.shape[1]
    per_group = heads // (n.shape[1] // d)
    bt = _block_tokens(seq_len)
    rank = next((x.shape[2] for x, k in zip(inputs, kinds, strict=True) if k == "o"), 0)
    maps = {  # block index of (head, row, token block)
        "a": lambda h, b, t: (b, h, t),
        "n": lambda h, b, t: (b, h // per_group, t),
        "m": lambda h, b, t: (h, 0, 0),
        "v": lambda h, b, t: (h, 0, 0),
        "o": lambda h, b, t: (h, 0, 0),
        "y": lambda h, b, t: (b, 0, t),
    }
    shapes = {"a": (d, bt), "n": (d, bt), "m": (d, d), "v": (d, 1), "o": (d, rank), "y": (rank, bt)}
    heads_last = kw.pop("heads_last", False)
    order = (lambda b, t, h: (h, b, t)) if heads_last else (lambda h, b, t: (h, b, t))
    spec = {k: pl.BlockSpec((None, *shapes[k]), lambda *g, k=k: maps[k](*order(*g))) for k in shapes}
    out_shape = [out_struct(shape, dtype, *inputs) for shape, dtype, _ in outputs]
    traffic = sum(x.size * jnp.dtype(x.dtype).itemsize for x in (*inputs, *out_shape))
    cost = pl.CostEstimate(
        flops=2 * bsz * seq_len * heads * d * (products * d + (2 if backward else 1) * rank),
        transcendentals=bsz * seq_len * d * heads,
        bytes_accessed=int(traffic),
    )
    if heads_last:
        grid, semantics = (bsz, seq_len // bt, heads), ("parallel", "parallel", "arbitrary")
    else:
        grid = (heads, bsz, seq_len // bt)
        semantics = ("parallel", "arbitrary", "arbitrary") if backward else ("parallel",) * 3
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec[k] for k in kinds],
        out_specs=[spec[k] for _, _, k in outputs],
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        cost_estimate=cost,
        interpret=interpret,
        name=name,
        **kw,
    )(*inputs)


def _fwd_tpu(a, n, wa_t, wn_t, c, g, *wo, interpret: bool):
    xs = (a, n, wa_t, wn_t, c, g, *wo)
    if not wo:
        (m,) = _call(
            _fwd_kernel, "middle_heads_fwd", xs, "anmmvv", [(a.shape, a.dtype, "a")], 2, False, interpret
        )
        return m
    bsz, _, seq_len = a.shape
    rank = wo[0].shape[2]
    f = _f32(a)
    scratch = [pltpu.VMEM((rank, _block_tokens(seq_len)), f)]
    outs = [((bsz, rank, seq_len), a.dtype, "y")]
    (y,) = _call(
        _fwd_proj_kernel, "middle_heads_fwd", xs, "anmmvvo", outs, 2, False, interpret,
        heads_last=True, scratch_shapes=scratch,
    )  # fmt: skip
    return y


def _bwd_tpu(a, n, wa_t, wn_t, c, g, *rest, interpret: bool):
    """``rest`` = ``(dm,)`` or ``(W_o, dy)``."""
    proj = len(rest) == 2
    f = _f32(a)
    outs = [(a.shape, a.dtype, "a"), (a.shape, n.dtype, "a"), (wa_t.shape, f, "m"), (wn_t.shape, f, "m")]
    outs += [(c.shape, f, "v"), (g.shape, f, "v")] + ([(rest[0].shape, f, "o")] if proj else [])
    inputs = (a, n, wa_t, wn_t, c, g, *rest)
    kinds = "anmmvv" + ("oy" if proj else "a")
    kernel = functools.partial(_bwd_kernel, proj=proj)
    da, dn_h, *dw = _call(kernel, "middle_heads_bwd", inputs, kinds, outs, 6, True, interpret)
    bsz, _, seq_len = n.shape
    groups, d = n.shape[1] // wa_t.shape[1], wa_t.shape[1]
    dn_h = dn_h.reshape(bsz, groups, -1, d, seq_len).astype(f)
    dn = dn_h.sum(axis=2).reshape(n.shape)  # over each group's heads, in float32
    weights = (wa_t, wn_t, c, g, *rest[:1]) if proj else (wa_t, wn_t, c, g)
    grads = (da, dn.astype(n.dtype), *(x.astype(y.dtype) for x, y in zip(dw, weights, strict=True)))
    return grads


# ------------------------------------------------------------------------------------------- VJP + layout


def _formula_fm(a, n, wa_t, wn_t, c, g, *wo):
    """The kernels' math in ``jnp`` on whole feature-major arrays: the ``cuda`` branch."""
    bsz, _, seq_len = a.shape
    heads, d = wa_t.shape[0], wa_t.shape[1]
    a4 = a.reshape(bsz, heads, d, seq_len)
    n4 = jnp.repeat(n.reshape(bsz, -1, d, seq_len), heads // (n.shape[1] // d), axis=1)
    z = jnp.einsum("hed,bhdt->bhet", wa_t, a4) + jnp.einsum("hed,bhdt->bhet", wn_t, n4) + c
    m = a4 + g * jax.nn.sigmoid(z) * (n4 - a4)
    return jnp.einsum("hdr,bhdt->brt", wo[0], m) if wo else m.reshape(a.shape)


def _dispatch(interpret: bool, tpu_fn, cuda_fn, *args):
    if interpret:
        return tpu_fn(*args, interpret=True)
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(tpu_fn, interpret=False),
        cuda=cuda_fn,
        default=functools.partial(tpu_fn, interpret=True),
    )


def _cuda_bwd(*xs):
    return jax.vjp(_formula_fm, *xs[:-1])[1](xs[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernels(interpret, *xs):
    return _dispatch(interpret, _fwd_tpu, _formula_fm, *xs)


def _kernels_fwd(interpret, *xs):
    return _kernels(interpret, *xs), xs


def _kernels_bwd(interpret, xs, dm):
    return tuple(_dispatch(interpret, _bwd_tpu, _cuda_bwd, *xs, dm))


_kernels.defvjp(_kernels_fwd, _kernels_bwd)


def _pallas(a, n, gate_w, gate_b, gamma, w_out, interpret: bool, partition: Partition | None):
    """The kernels on the feature-major views (module docstring), the sequence padded to whole token blocks,
    under a mesh inside ``shard_map`` (a projected output summed over the head shards)."""
    bsz, seq_len, hh, d = a.shape
    fm = lambda x: x.reshape(bsz, seq_len, -1).transpose(0, 2, 1)  # [B,T,H,D] -> [B,H·D,T]
    rows = [fm(a), fm(n)]
    pad = -seq_len % _block_tokens(seq_len)
    if pad:
        rows = [jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in rows]
    t_w = lambda w: w.transpose(0, 2, 1)  # W^T per head
    weights = [t_w(gate_w[:, :d]), t_w(gate_w[:, d:]), gate_b[..., None], gamma[..., None]]
    if w_out is not None:
        weights.append(w_out.reshape(hh, d, -1))
    call = functools.partial(_kernels, interpret)
    mesh = jax.sharding.get_abstract_mesh()
    axes = None if mesh.empty else _kernel_partition(mesh, bsz, n.shape[2], seq_len + pad, partition)
    if axes is not None:  # heads split in whole groups: each device keeps its heads' groups
        bx, hx, sx = (_spec_axes(x) for x in axes)
        row_spec, head_spec = P(bx, hx, sx), P(hx, None, None)
        specs = (row_spec, row_spec) + (head_spec,) * len(weights)
        if w_out is None:
            out_spec = row_spec
        else:  # y sums over every head: a partial sum per head shard
            out_spec = P(bx, None, sx)
            if hx is not None:
                call = lambda *xs, call=call, hx=hx: jax.lax.psum(call(*xs), hx)  # noqa: E731
        call = jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)
    out = call(*rows, *weights)[:, :, :seq_len].transpose(0, 2, 1)
    return out if w_out is not None else out.reshape(a.shape)


def middle_heads(
    a: jax.Array,
    n: jax.Array,
    gate_w: jax.Array,
    gate_b: jax.Array,
    gamma: jax.Array,
    *,
    w_out: jax.Array | None = None,
    impl: str = "xla",
    interpret: bool = False,
    partition: Partition | None = None,
) -> jax.Array:
    """The middle heads ``m`` ``[B,T,H,D]`` (module docstring) in ``a``'s dtype, or with ``w_out`` their
    projection ``m W_out`` ``[B,T,r]`` (``m`` flattened to ``[B,T,H·D]``): the kernels then sum each head's
    share into the output on chip, so ``m`` is never written (nor its gradient read).

    Args:
      a: ``[B,T,H,D]``; n: ``[B,T,G,D]`` (``G`` divides ``H``); gate_w ``[H,2D,D]``; gate_b, gamma ``[H,D]``;
        w_out: optional ``[H·D, r]``; all in one floating dtype (the compute dtype).
      impl: ``"xla"`` or ``"pallas"`` (needs :func:`kernel_supported`); interpret: run the Mosaic kernels in
        the Pallas interpreter on any platform (tests).
      partition: ``(batch_axes, head_axes[, sequence_axes])`` of ``a`` under a mesh (``impl="pallas"`` runs in a
        ``shard_map`` split that way); None: the op picks, as :func:`pallas_kernels.wkv7` does.
    """
    if impl not in IMPLS:
        raise ValueError(f"middle_heads: unknown impl {impl!r}; choose one of {IMPLS}")
    if a.ndim != 4 or n.ndim != 4 or n.shape[:2] != a.shape[:2] or n.shape[3] != a.shape[3]:
        raise ValueError(f"middle_heads: expected a [B,T,H,D] and n [B,T,G,D]; got {a.shape} and {n.shape}")
    hh, d = a.shape[2], a.shape[3]
    if hh % n.shape[2]:
        raise ValueError(f"middle_heads: the {n.shape[2]} groups must divide the {hh} heads")
    for label, w, shape in (
        ("gate_w", gate_w, (hh, 2 * d, d)),
        ("gate_b", gate_b, (hh, d)),
        ("gamma", gamma, (hh, d)),
    ):
        if w.shape != shape:
            raise ValueError(f"middle_heads: expected {label} of shape {shape}; got {w.shape}")
    if w_out is not None and (w_out.ndim != 2 or w_out.shape[0] != hh * d):
        raise ValueError(f"middle_heads: expected w_out of shape [H·D, r] = [{hh * d}, r]; got {w_out.shape}")
    if impl == "xla":
        m = middle_heads_xla(a, n, gate_w, gate_b, gamma)
        return m if w_out is None else m.reshape(*a.shape[:2], -1) @ w_out
    if not kernel_supported(hh, d):
        raise ValueError(
            f"middle_heads: impl='pallas' needs a head size that is a multiple of {SUBLANES}; got D={d}. "
            "Use impl='xla'."
        )
    return _pallas(a, n, gate_w, gate_b, gamma, w_out, interpret, partition)

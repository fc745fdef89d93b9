"""The WuNeng hybrid attention layer (``ARCHITECTURE.md`` §2): Qwen2 attention plus RWKV-7 state-driven heads.

Per hybrid decoder layer, input ``h`` ``[B,T,d]``; ``H`` query heads, ``G`` KV heads, head dim ``D``; ``S`` state
heads of size ``N`` with ``S·N = G·D`` (default ``S = G``, ``N = D``; state head ``s`` covers channels
``[s·N, (s+1)·N)`` of the KV-group-major layout, so KV group ``g`` owns state heads ``g·D/N .. (g+1)·D/N - 1``)::

    u = RMSNorm(h);  u_m = u + (u_prev - u) ⊙ μ_m     (token shift; u_prev = previous token's u, 0 at doc starts)
    q, k, v = u W_{Q,K,V} + b_{Q,K,V}                  [B,T,H,D], [B,T,G,D], [B,T,G,D]   (pre-RoPE)
    r̂ = u_r W_R̂                                       [B,T,S·N]   state-derived key ("receptance")
    κ̂ = L2norm_per_state_head(u_κ W_κ)                [B,T,S·N]   removal key
    log w = -e^{-1/2} sigmoid(w0 + tanh(u_w W1) W2)    [B,T,S·N]   (w in (0.545, 1))
    α = sigmoid(a0 + (u_a A1) A2);   k̃ = k ⊙ (1 + (α - 1) ⊙ k_a);   g = sigmoid(u_g G1) G2
    v^s = v (state_value=attention_value)  or  [A_1..A_H] W_Vs (state_value=attention_output)
    S_t = S_{t-1}(diag(w_t) - κ̂_tᵀ(α_t ⊙ κ̂_t)) + v^s_t k̃_tᵀ        (pallas_kernels.wkv7, a=-κ̂, b=κ̂⊙α)
    R_t = (GroupNorm(S_t r̂_t) + (Σ r̂ ⊙ k̃ ⊙ r_k) v^s_t) ⊙ g_t            [B,T,S,N] -> R_g [B,T,G,D]
    state_query:  q_h ← q_h + λ_h ⊙ (R_{g(h)} W^state_h)                  (before RoPE; λ zero-init)
    A_h = softmax(RoPE(q_h) RoPE(k_{g(h)})ᵀ/√D + mask) v_{g(h)}
    o = F(A, R)  (fusion: concat | add | gate | full, table below);   h ← h + o;  h ← h + SwiGLU(RMSNorm(h))

Fusion (``Norm`` = per-state-head RMSNorm without scale, eps = ``rms_norm_eps``; ``N_h = Norm(R)_{g(h)}``)::

    concat: o = W_O[A] + W_Os[R]                                   W_Os zero
    add:    o = W_O[A_h + β_h ⊙ N_h]                               β [H,D] zero
    gate:   M_h = A_h + γ_h ⊙ σ(W^g_h [A_h; N_h] + c_h) ⊙ (N_h - A_h);  o = W_O[M]       γ [H,D] zero
    full:   o = W_O[A] + W_Os[β ⊙ Norm(R)] + W_Om[M]               W_Os, W_Om zero (β [S,N] ones, γ ones)

so every hybrid layer starts exactly equal to its plain attention layer (``W_Om`` is low-rank by default,
``middle_out_rank``; the init recipe is :mod:`wuneng_jax.models.wuneng_params`, the settings
:mod:`wuneng_jax.models.wuneng_config`). :func:`state_read`, :func:`query_with_state`, :func:`fuse_heads` and
:func:`hybrid_attention` are pure functions of a parameter mapping and arrays; :class:`WuNengAttention` (a
:class:`Qwen2Attention` with the new parameters beside ``q_proj``..``o_proj``, so Qwen2 weights map one to
one) holds the parameters, :class:`WuNengDecoderLayer` is the decoder layer. Recurrent state per layer
(:class:`WuNengLayerState`): the last ``u`` ``[B,d]`` and the WKV state ``[B,S,N,N]``, both float32.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import wkv7
from pallas_kernels.middle_heads import kernel_supported, middle_heads
from pallas_kernels.wkv7 import resolve_impl
from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.layers.context import KVLayer, LayerContext
from wuneng_jax.layers.linear import linear
from wuneng_jax.layers.norms import group_norm, rms_norm
from wuneng_jax.layers.packing import document_starts
from wuneng_jax.layers.params import sharded_param
from wuneng_jax.models.qwen2 import LayerOut, Qwen2Attention, Qwen2DecoderLayer
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.models.wuneng_params import hybrid_param_names, init_hybrid_params
from wuneng_jax.sharding import ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, BATCH, LENGTH, constrain

#: ``attend(q, k, v) -> (A [B,T,H,D], kv cache)`` from pre-RoPE ``q`` ``[B,T,H,D]``, ``k``/``v`` ``[B,T,G,D]``
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class WuNengLayerState(NamedTuple):
    """Recurrent state of one hybrid layer: ``shift`` ``[B,d]`` (last ``u``), ``wkv`` ``[B,S,N,N]``
    (value rows x key columns); float32 (float64 in x64 runs)."""

    shift: jax.Array
    wkv: jax.Array


class HybridCache(NamedTuple):
    """A hybrid layer's cache: the attention's :class:`KVLayer` (``None`` without a KV cache) and the
    recurrent :class:`WuNengLayerState` (``None``: start from zeros)."""

    kv: KVLayer | None
    state: WuNengLayerState | None


class HybridOut(NamedTuple):
    """:func:`hybrid_attention` result: ``o`` ``[B,T,d]`` the fused attention-block output (before the
    residual add); ``state_branch`` ``[B,T,d]`` the state-driven heads alone through the output projection,
    ``W_O [R_{g(1)} .. R_{g(H)}]`` (the student branch of the ``align`` stage); ``cache`` after the last token.
    """

    o: jax.Array
    state_branch: jax.Array
    cache: HybridCache


def _heads(x: jax.Array, n: int) -> jax.Array:
    """``[B,T,C]`` -> ``[B,T,C/n,n]`` with a sharding constraint on the head axis."""
    return constrain(ops.split_heads(x, n), (BATCH, LENGTH, ACT_KV_HEADS, None))


def _per_query_head(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B,T,G,D]`` -> ``[B,T,H,D]``: query head ``h`` gets group ``h // (H/G)`` (the GQA mapping)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def state_read(
    p: Mapping[str, jax.Array],
    u: jax.Array,
    k: jax.Array,
    v_s: jax.Array,
    *,
    cfg: WuNengConfig,
    reset: jax.Array,
    state: WuNengLayerState | None = None,
) -> tuple[jax.Array, WuNengLayerState]:
    """The state-driven heads: RWKV-7 recurrence written with the attention key, read with ``r̂``.

    Args:
      p: the hybrid parameters (``mu_* r_proj kappa_proj w0 w1 w2 a0 a1 a2 k_a g1 g2 r_k ln_x_*``).
      u: ``[B,T,d]`` normed layer input; k: ``[B,T,G,D]`` attention key (bias added, pre-RoPE);
      v_s: ``[B,T,S·N]`` the value written into the state.
      reset: bool ``[B,T]`` document starts (state and token shift restart there).
      state: the layer's state before ``u[:, 0]`` (zeros when None).
    Returns:
      ``R`` ``[B,T,G,D]`` (state heads merged per KV group, gate applied) and the new state.
    """
    dt = u.dtype
    c = lambda name: p[name].astype(dt)
    b, t, _ = u.shape
    n = cfg.state_head_size
    with jax.named_scope("state_proj"):
        # The five token-shift mixes u_m = u + (u_prev - u) ⊙ μ_m feed five projections, and
        # u_m W_m = u [(1 - μ_m) ⊙ W_m] + u_prev [μ_m ⊙ W_m]; the shift commutes with a per-token product, so
        # one product of u gives both halves and the second is shifted after it (no [B,T,d] mix or shifted
        # copy of u; the shift moves the narrow [B,T,C] half).
        heads = (
            ("r", p["r_proj"]),
            ("kappa", p["kappa_proj"]),
            ("w", p["w1"]),
            ("a", p["a1"]),
            ("g", p["g1"]),
        )
        mu = [p[f"mu_{m}"][:, None].astype(w.dtype) for m, w in heads]
        now = jnp.concatenate([(1 - m) * w for m, (_, w) in zip(mu, heads, strict=True)], axis=1).astype(dt)
        prev = jnp.concatenate([m * w for m, (_, w) in zip(mu, heads, strict=True)], axis=1).astype(dt)
        sizes = [w.shape[1] for _, w in heads]
        y_now, y_prev = jnp.split(linear(u, jnp.concatenate([now, prev], axis=1)), 2, axis=-1)
        carried = None if state is None else linear(state.shift, prev, dtype=dt)
        y = y_now + ops.token_shift(y_prev, carried, reset)
        r_hat, kappa, w_h, a_h, g_h = jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)
    with jax.named_scope("decay_lora"):  # ops.decay_log after its first product
        f32 = jnp.promote_types(dt, jnp.float32)
        z = p["w0"].astype(f32) + (jnp.tanh(w_h) @ c("w2")).astype(f32)
        log_w = -ops.E_HALF * jax.nn.sigmoid(z)  # float32 (float64 in x64 runs)
    with jax.named_scope("iclr_lora"):
        alpha = jax.nn.sigmoid(c("a0") + a_h @ c("a2"))
    with jax.named_scope("gate_lora"):
        g = jax.nn.sigmoid(g_h) @ c("g2")
    with jax.named_scope("state_keys"):
        kappa_hat = ops.l2_normalize_heads(kappa, n)
        k_tilde = ops.modify_key(k.reshape(b, t, cfg.state_size), alpha, c("k_a"))
        rh, kh, vh, kkh, ah = (_heads(x, n) for x in (r_hat, k_tilde, v_s, kappa_hat, alpha))
    with jax.named_scope("wkv7"):
        o, wkv_state = wkv7(
            rh,
            _heads(log_w, n),
            kh,
            vh,
            -kkh,
            kkh * ah,
            None if state is None else state.wkv,
            reset=reset,
            impl=cfg.wkv_impl,
            chunk_size=cfg.wkv_chunk_size,
            partition=ops.wkv7_partition(ACT_KV_HEADS),  # as _heads constrains the inputs
        )
    with jax.named_scope("state_out"):
        y = group_norm(ops.merge_heads(o), p["ln_x_scale"], p["ln_x_bias"], cfg.state_heads, ops.LN_X_EPS)
        y = y + ops.merge_heads(ops.bonus(rh, kh, vh, c("r_k")))
        r = (y * g).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        r = constrain(r, (BATCH, LENGTH, ACT_KV_HEADS, None))
    return r, WuNengLayerState(u[:, -1].astype(wkv_state.dtype), wkv_state)


def _group_to_heads(w: jax.Array, groups: int) -> jax.Array:
    """Per-query-head matrices ``w`` ``[H,D,E]`` as one ``[G·D, H·E]`` matrix acting on the grouped layout:
    block ``(g, h)`` is ``w[h]`` when query head ``h`` belongs to group ``g``, zero otherwise."""
    hh, d, e = w.shape
    own = (jnp.arange(hh) // (hh // groups))[None, :] == jnp.arange(groups)[:, None]  # [G,H]
    blocks = jnp.where(own[:, None, :, None], w.transpose(1, 0, 2)[None], jnp.zeros((), w.dtype))  # [G,D,H,E]
    return blocks.reshape(groups * d, hh * e)


def query_with_state(p: Mapping[str, jax.Array], q: jax.Array, r: jax.Array) -> jax.Array:
    """Multi-token state processing: ``q_h + λ_h ⊙ (R_{g(h)} W^state_h)`` (pre-RoPE).

    q ``[B,T,H,D]``, r ``[B,T,G,D]``; ``state_q_proj`` ``[H,D,D]``, ``state_q_scale`` (λ) ``[H,D]``. Computed
    as one dense product of the grouped read-out, ``R [W^state_h diag(λ_h)]_{(g,h)}`` (``[B,T,G·D] x
    [G·D, H·D]``, zero off each head's own group): in the token-major layout the query projection already
    has, where the per-head einsum made the TPU compiler move ``[B,T,H,D]`` activations through layout copies
    (the zero blocks cost ``G``x the minimal FLOPs, under 1 % of a layer's).
    """
    dt = q.dtype
    b, t, hh, hd = q.shape
    w = p["state_q_proj"].astype(dt) * p["state_q_scale"].astype(dt)[:, None, :]
    rq = linear(r.reshape(b, t, -1), _group_to_heads(w, r.shape[2]))
    return q + rq.reshape(b, t, hh, hd)


def _state_norm(r: jax.Array, n: int, eps: float) -> jax.Array:
    """Per-state-head RMSNorm without a scale: ``[B,T,G,D]`` normalised over each ``N`` block."""
    b, t, g, hd = r.shape
    x = r.reshape(b, t, g * hd // n, n)
    return rms_norm(x, jnp.ones((n,), r.dtype), eps).reshape(b, t, g, hd)


def fuse_heads(p: Mapping[str, jax.Array], a: jax.Array, r: jax.Array, *, cfg: WuNengConfig) -> jax.Array:
    """Cross-head interaction ``F`` and the output projection -> o ``[B,T,d]``.

    a ``[B,T,H,D]`` standard heads; r ``[B,T,G,D]`` state read-out; ``p`` holds ``o_kernel`` (``W_O``
    ``[H·D, d]``) and the fusion parameters of ``cfg.fusion`` (module docstring table).
    """
    dt = a.dtype
    c = lambda name: p[name].astype(dt)
    b, t, hh, _ = a.shape
    flat = lambda x: x.reshape(b, t, -1)
    if cfg.fusion == "concat":
        return linear(flat(a), p["o_kernel"]) + linear(flat(r), p["o_state"])
    nr = _state_norm(r, cfg.state_head_size, cfg.rms_norm_eps)
    if cfg.fusion == "add":
        return linear(flat(a + c("beta") * _per_query_head(nr, hh)), p["o_kernel"])
    # the Pallas kernels wherever the recurrence runs as one (TPU: Mosaic), for the head sizes they take
    kernel = resolve_impl(cfg.wkv_impl) == "pallas" and kernel_supported(hh, a.shape[3])
    gate = (a, nr, c("gate_w"), c("gate_b"), c("gamma"))
    kw = dict(impl="pallas" if kernel else "xla", partition=ops.wkv7_partition(ACT_HEADS))
    heads = lambda m: constrain(m, (BATCH, LENGTH, ACT_HEADS, None))
    if cfg.fusion == "gate":
        return linear(flat(heads(middle_heads(*gate, **kw))), p["o_kernel"])
    # full: standard + state-driven + middle heads; the last two share one product (one [B,T,d] output
    # fewer to write and add: both inputs are narrow with the default low-rank W_Om)
    beta_nr = c("beta").reshape(-1) * flat(nr)
    if "o_middle" in p:
        mid, w_mid = flat(heads(middle_heads(*gate, **kw))), p["o_middle"]
    else:  # low rank: the op applies W_Om_a (the kernels on chip, so M never reaches HBM)
        mid, w_mid = middle_heads(*gate, w_out=c("o_middle_a"), **kw), p["o_middle_b"]
    side = linear(jnp.concatenate([beta_nr, mid], axis=-1), jnp.concatenate([c("o_state"), w_mid.astype(dt)]))
    return linear(flat(a), p["o_kernel"]) + side


def hybrid_attention(
    p: Mapping[str, jax.Array],
    u: jax.Array,
    *,
    cfg: WuNengConfig,
    segment_ids: jax.Array,
    attend: Attend,
    state: WuNengLayerState | None = None,
) -> HybridOut:
    """The WuNeng hybrid attention block on the normed input ``u`` ``[B,T,d]`` (compute dtype ``u.dtype``).

    Args:
      p: ``q_kernel`` ``[d,H·D]``, ``q_bias``, ``k_kernel``/``v_kernel`` ``[d,G·D]``, ``k_bias``, ``v_bias``,
        ``o_kernel`` ``[H·D,d]`` (the Qwen2 attention) plus :func:`hybrid_param_names` ``(cfg)``.
      segment_ids: int ``[B,T]`` (state resets at document starts).
      attend: the standard heads ``(A [B,T,H,D], kv)`` from pre-RoPE ``q, k, v`` (RoPE, mask and any KV cache
        are the caller's: :meth:`Qwen2Attention.attend`).
      state: state before ``u[:, 0]``; ``None`` starts from zeros (and resets at t = 0), a given state
        is continued at t = 0 (later document starts in ``segment_ids`` still reset it).
    Returns:
      :class:`HybridOut`.
    """
    b, t, _ = u.shape
    hh, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = lambda x, heads: linear(u, p[f"{x}_kernel"], p[f"{x}_bias"]).reshape(b, t, heads, hd)
    with jax.named_scope("wuneng_qkv"):
        q = constrain(proj("q", hh), (BATCH, LENGTH, ACT_HEADS, None))
        k = constrain(proj("k", g), (BATCH, LENGTH, ACT_KV_HEADS, None))
        v = constrain(proj("v", g), (BATCH, LENGTH, ACT_KV_HEADS, None))
    reset = document_starts(segment_ids) if state is None else ops.segment_reset(segment_ids)
    if cfg.state_value == "attention_value":
        r, new_state = state_read(p, u, k, v.reshape(b, t, -1), cfg=cfg, reset=reset, state=state)
        if cfg.state_query:
            with jax.named_scope("state_query"):
                q = query_with_state(p, q, r)
        a, kv = attend(q, k, v)
    else:  # attention_output (validated: state_query is off)
        a, kv = attend(q, k, v)
        v_s = linear(a.reshape(b, t, -1), p["state_v_proj"])
        r, new_state = state_read(p, u, k, v_s, cfg=cfg, reset=reset, state=state)
    with jax.named_scope("fusion"):
        o = constrain(fuse_heads(p, a, r, cfg=cfg), (BATCH, LENGTH, ACT_EMBED))
    with jax.named_scope("state_branch"):
        branch = linear(_per_query_head(r, hh).reshape(b, t, -1), p["o_kernel"])
    return HybridOut(o, constrain(branch, (BATCH, LENGTH, ACT_EMBED)), HybridCache(kv, new_state))


class WuNengAttention(Qwen2Attention):
    """A Qwen2 attention (``q_proj k_proj v_proj o_proj``) plus the hybrid parameters of
    :func:`hybrid_param_names` as attributes; ``__call__`` runs :func:`hybrid_attention`."""

    def __init__(self, cfg: WuNengConfig, layer_id: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.cfg = cfg
        q_kernel, k_kernel = self.q_proj.kernel[...], self.k_proj.kernel[...]
        init = init_hybrid_params(cfg, layer_id, q_kernel=q_kernel, k_kernel=k_kernel, key=rngs.params())
        for name, (value, names) in init.items():
            setattr(self, name, sharded_param(value, names))

    def params(self) -> dict[str, jax.Array]:
        """The parameter mapping of :func:`hybrid_attention`; the Qwen2 projections in the compute dtype
        (cast like ``Linear`` casts its kernel), the hybrid parameters as stored."""
        dt = jnp.dtype(self.cfg.dtype)
        p = {f"{n}_kernel": getattr(self, f"{n}_proj").kernel[...].astype(dt) for n in "qkvo"}
        p |= {f"{n}_bias": getattr(self, f"{n}_proj").bias[...].astype(dt) for n in "qkv"}
        return p | {name: getattr(self, name)[...] for name in hybrid_param_names(self.cfg)}

    def __call__(  # type: ignore[override]
        self, u: jax.Array, ctx: LayerContext, cache: HybridCache | None = None
    ) -> HybridOut:
        """u ``[B,T,d]`` (normed) -> :class:`HybridOut`; the standard heads are :meth:`Qwen2Attention.attend`
        (over ``cache.kv`` when ``ctx.kv``), the recurrence continues ``cache.state``."""
        cache = HybridCache(None, None) if cache is None else cache
        cfg = self.cfg if ctx.wkv_impl is None else dataclasses.replace(self.cfg, wkv_impl=ctx.wkv_impl)
        attend = lambda q, k, v: self.attend(q, k, v, ctx, cache.kv)
        return hybrid_attention(
            self.params(), u, cfg=cfg, segment_ids=ctx.segment_ids, attend=attend, state=cache.state
        )


class WuNengDecoderLayer(Qwen2DecoderLayer):
    """``h + hybrid_attn(RMSNorm(h))`` then ``+ SwiGLU(RMSNorm(·))``; attribute names as Qwen2's layer."""

    def __init__(self, cfg: WuNengConfig, layer_id: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, attention=WuNengAttention(cfg, layer_id, rngs=rngs))

    def __call__(  # type: ignore[override]
        self, h: jax.Array, ctx: LayerContext, cache: HybridCache | None = None
    ) -> LayerOut:
        """h ``[B,T,d]`` -> :class:`LayerOut` (its cache a :class:`HybridCache`)."""
        out = self.self_attn(self.input_layernorm(h), ctx, cache)
        return LayerOut(self.residual(h, out.o), out.o, out.state_branch, out.cache)

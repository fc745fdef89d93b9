"""One WuNeng hybrid decoder layer against an independent float64 numpy implementation.

The reference below is written from ARCHITECTURE.md §2's formulas (plus RWKV-7's GroupNorm eps and
bonus, rwkv7-and-kernels.md §7.2), token by token with a plain loop for the state recurrence in the
paper's form ``S_t = S_{t-1}(diag(w_t) - κ̂_tᵀ(α_t ⊙ κ̂_t)) + v_t k̃_tᵀ``; it shares no code with the model.
Every parameter is random (no zero-initialised branch), inputs are packed documents, and one case
continues from a carried state.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wuneng_cases import QCFG, SEG, B, T, random_model, wcfg

from wuneng_jax.layers.context import LayerContext
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_layer import HybridCache, WuNengLayerState

GN_EPS = 64e-5  # RWKV-7 ln_x eps


def np_positions(seg: np.ndarray) -> np.ndarray:
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return pos


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_hybrid_layer(P: dict, h: np.ndarray, seg: np.ndarray, pos: np.ndarray, cfg, state0=None):
    """-> (layer output h, attention-block output o, state branch W_O[R], final WKV state, last u)."""
    bsz, t_len, d = h.shape
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    S, N = cfg.state_heads, cfg.state_head_size
    rep = H // G
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return w * x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)

    u = rms(h, P["input_layernorm.scale"])
    proj = {n: u @ P[f"self_attn.{n}_proj.kernel"] + P[f"self_attn.{n}_proj.bias"] for n in "qkv"}
    q = proj["q"].reshape(bsz, t_len, H, D).copy()
    k = proj["k"].reshape(bsz, t_len, G, D)
    v = proj["v"].reshape(bsz, t_len, G, D)

    # document starts: the state (and previous token) entering them is zero
    start = np.zeros((bsz, t_len), bool)
    prev = np.zeros_like(u)
    for b in range(bsz):
        for t in range(t_len):
            start[b, t] = (t == 0 and state0 is None) or (t > 0 and seg[b, t] != seg[b, t - 1])
            if not start[b, t]:
                prev[b, t] = u[b, t - 1] if t > 0 else state0[1][b]

    def mix(m):
        return u + (prev - u) * P[f"self_attn.mu_{m}"]

    A_ = lambda name: P[f"self_attn.{name}"]
    r_hat = (mix("r") @ A_("r_proj")).reshape(bsz, t_len, S, N)
    kap = (mix("kappa") @ A_("kappa_proj")).reshape(bsz, t_len, S, N)
    kap = kap / np.maximum(np.linalg.norm(kap, axis=-1, keepdims=True), 1e-12)
    w = np.exp(-np.exp(-0.5) * sigmoid(A_("w0") + np.tanh(mix("w") @ A_("w1")) @ A_("w2")))
    w = w.reshape(bsz, t_len, S, N)
    alpha = sigmoid(A_("a0") + (mix("a") @ A_("a1")) @ A_("a2")).reshape(bsz, t_len, S, N)
    k_tilde = k.reshape(bsz, t_len, S, N) * (1 + (alpha - 1) * A_("k_a").reshape(S, N))
    gate = (sigmoid(mix("g") @ A_("g1")) @ A_("g2")).reshape(bsz, t_len, S, N)

    def state_heads(vs):  # vs [B,T,S,N] -> R [B,T,G,D], final state [B,S,N,N]
        y = np.zeros((bsz, t_len, S, N))
        final = np.zeros((bsz, S, N, N))
        for b in range(bsz):
            for s in range(S):
                St = np.zeros((N, N)) if state0 is None else state0[0][b, s].copy()
                for t in range(t_len):
                    if start[b, t]:
                        St = np.zeros((N, N))
                    kh, a = kap[b, t, s], alpha[b, t, s]
                    St = St @ (np.diag(w[b, t, s]) - np.outer(kh, a * kh)) + np.outer(
                        vs[b, t, s], k_tilde[b, t, s]
                    )
                    y[b, t, s] = St @ r_hat[b, t, s]
                final[b, s] = St
        mean = y.mean(-1, keepdims=True)
        var = ((y - mean) ** 2).mean(-1, keepdims=True)
        gn = (y - mean) / np.sqrt(var + GN_EPS) * A_("ln_x_scale").reshape(S, N) + A_("ln_x_bias").reshape(
            S, N
        )
        bonus = np.sum(r_hat * k_tilde * A_("r_k"), -1, keepdims=True) * vs
        return ((gn + bonus) * gate).reshape(bsz, t_len, G, D), final

    def attention(qq):
        half = D // 2
        inv = cfg.rope_theta ** (-(2.0 * np.arange(half)) / D)
        ang = pos[:, :, None, None] * inv
        cos, sin = np.cos(ang), np.sin(ang)

        def rope(x):
            x1, x2 = x[..., :half], x[..., half:]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

        qr, kr = rope(qq), rope(k)
        out = np.zeros((bsz, t_len, H, D))
        for b in range(bsz):
            allowed = (seg[b][:, None] == seg[b][None, :]) & np.tri(t_len, dtype=bool)
            for hh in range(H):
                sc = np.where(allowed, qr[b, :, hh] @ kr[b, :, hh // rep].T / np.sqrt(D), -np.inf)
                e = np.exp(sc - sc.max(-1, keepdims=True))
                out[b, :, hh] = (e / e.sum(-1, keepdims=True)) @ v[b, :, hh // rep]
        return out

    if cfg.state_value == "attention_value":
        R, final = state_heads(v.reshape(bsz, t_len, S, N))
        if cfg.state_query:
            for hh in range(H):
                q[:, :, hh] += A_("state_q_scale")[hh] * (R[:, :, hh // rep] @ A_("state_q_proj")[hh])
        A = attention(q)
    else:
        A = attention(q)
        R, final = state_heads((A.reshape(bsz, t_len, H * D) @ A_("state_v_proj")).reshape(bsz, t_len, S, N))

    heads_of = [hh // rep for hh in range(H)]
    Rh = R[:, :, heads_of]
    nr = R.reshape(bsz, t_len, S, N)
    nr = (nr / np.sqrt(np.mean(nr**2, -1, keepdims=True) + eps)).reshape(bsz, t_len, G, D)
    nrh = nr[:, :, heads_of]
    WO = P["self_attn.o_proj.kernel"]
    flat = lambda x: x.reshape(bsz, t_len, -1)
    if cfg.fusion == "concat":
        o = flat(A) @ WO + flat(R) @ A_("o_state")
    elif cfg.fusion == "add":
        o = flat(A + A_("beta") * nrh) @ WO
    else:
        z = np.einsum("bthi,hij->bthj", np.concatenate([A, nrh], -1), A_("gate_w")) + A_("gate_b")
        M = A + A_("gamma") * sigmoid(z) * (nrh - A)
        if cfg.fusion == "gate":
            o = flat(M) @ WO
        else:
            w_om = A_("o_middle") if cfg.middle_out_rank is None else A_("o_middle_a") @ A_("o_middle_b")
            o = flat(A) @ WO + (A_("beta").reshape(-1) * flat(nr)) @ A_("o_state") + flat(M) @ w_om
    branch = flat(Rh) @ WO
    h1 = h + o
    n = rms(h1, P["post_attention_layernorm.scale"])
    g = n @ P["mlp.gate_proj.kernel"]
    h2 = h1 + (g * sigmoid(g) * (n @ P["mlp.up_proj.kernel"])) @ P["mlp.down_proj.kernel"]
    return h2, o, branch, final, u[:, -1]


# (id, qwen2 overrides, hybrid overrides)
CASES = [
    ("concat", {}, dict(fusion="concat")),
    ("add", {}, dict(fusion="add")),
    ("gate", {}, dict(fusion="gate")),
    ("full", {}, dict(fusion="full")),
    ("full-no-sq-attn-output", {}, dict(fusion="full", state_query=False, state_value="attention_output")),
    ("gate-attn-output", {}, dict(fusion="gate", state_query=False, state_value="attention_output")),
    ("full-rank-W_Om", {}, dict(fusion="full", middle_out_rank=None)),
    ("full-N<D", dict(head_dim=32), dict(fusion="full", state_head_size=16)),
]


def build(qover: dict, hover: dict, dtype: str, seed: int):
    cfg = wcfg(dataclasses.replace(QCFG, dtype=dtype, param_dtype=dtype, **qover), **hover)
    model = random_model(WuNeng, cfg, seed)
    layer = model.layers.view(0)
    P = {
        ".".join(map(str, p)): np.asarray(v[...], np.float64)
        for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    }
    return cfg, model, P


class LayerResult(NamedTuple):
    h: jax.Array
    o: jax.Array
    state_branch: jax.Array
    state: WuNengLayerState


def run_layer(model, h, seg, pos, state=None):
    """Hybrid layer 0 through its one call (training context; ``state`` continues the recurrence)."""
    _, _, rope = model.prepare(jnp.zeros(seg.shape, jnp.int32), jnp.asarray(seg), jnp.asarray(pos))
    dt = jnp.dtype(model.cfg.dtype)
    ctx = LayerContext(rope, jnp.asarray(seg))
    out = model.layers.view(0)(jnp.asarray(h, dt), ctx, HybridCache(None, state))
    return LayerResult(out.h, out.o, out.state_branch, out.cache.state)


def rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_matches_float64_reference(case):
    _, qover, hover = case
    with jax.enable_x64(True):
        cfg, model, P = build(qover, hover, "float64", seed=11)
        h = np.random.default_rng(1).standard_normal((B, T, cfg.hidden_size))
        pos = np_positions(SEG)
        out = run_layer(model, h, SEG, pos)
        want = np_hybrid_layer(P, h, SEG, pos, cfg)
        errs = {
            "h": rel(out.h, want[0]),
            "o": rel(out.o, want[1]),
            "state_branch": rel(out.state_branch, want[2]),
            "wkv": rel(out.state.wkv, want[3]),
            "shift": rel(out.state.shift, want[4]),
        }
    print(f"{case[0]}: max |Δ| / max |ref| = {errs}")
    assert np.asarray(out.h).dtype == np.float64
    assert float(np.abs(want[1]).max()) > 1e-2  # the fused branch is live
    assert max(errs.values()) <= 1e-11, errs


@pytest.mark.parametrize("fusion", ["full", "add"])
def test_layer_continues_from_state(fusion):
    """Run T tokens, then T more from the carried (shift, wkv) state; the reference continues its numpy
    state the same way (attention sees only the tokens of each call: no KV cache yet)."""
    with jax.enable_x64(True):
        cfg, model, P = build({}, dict(fusion=fusion), "float64", seed=12)
        h = np.random.default_rng(2).standard_normal((B, 2 * T, cfg.hidden_size))
        seg = np.ones((B, 2 * T), np.int32)
        seg[1, T + 5 :] = 2  # a document start inside the continuation still resets
        pos = np.arange(2 * T)[None].repeat(B, 0)
        first = run_layer(model, h[:, :T], seg[:, :T], pos[:, :T])
        second = run_layer(model, h[:, T:], seg[:, T:], pos[:, T:], state=first.state)
        ref1 = np_hybrid_layer(P, h[:, :T], seg[:, :T], pos[:, :T], cfg)
        ref2 = np_hybrid_layer(P, h[:, T:], seg[:, T:], pos[:, T:], cfg, state0=(ref1[3], ref1[4]))
        errs = [rel(second.h, ref2[0]), rel(second.state_branch, ref2[2]), rel(second.state.wkv, ref2[3])]
    assert max(errs) <= 1e-11, errs
    # the carried state matters: starting the second part from zeros gives a different read-out
    fresh = np_hybrid_layer(P, h[:, T:], seg[:, T:], pos[:, T:], cfg)
    assert rel(fresh[2], ref2[2]) > 1e-3


def test_float32_jit_default_kernel_close_to_float64_reference():
    """The training path: float32 compute, nnx.jit, wkv_impl auto (chunked), default fusion."""
    cfg, model, P = build({}, dict(wkv_impl="auto"), "float32", seed=13)
    h = np.random.default_rng(3).standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    pos = np_positions(SEG)

    @nnx.jit
    def fwd(m, h, seg, pos):
        return run_layer(m, h, seg, pos)

    out = fwd(model, jnp.asarray(h), jnp.asarray(SEG), jnp.asarray(pos))
    want = np_hybrid_layer(P, h.astype(np.float64), SEG, pos, cfg)
    errs = [
        rel(out.h, want[0]),
        rel(out.o, want[1]),
        rel(out.state_branch, want[2]),
        rel(out.state.wkv, want[3]),
    ]
    print(f"float32 jit (chunked wkv7): max |Δ| / max |ref| = {errs}")
    assert max(errs) <= 2e-5, errs

"""Qwen2 model: Hugging Face golden logits, an independent float64 numpy reference, causality, packing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from wuneng_jax.convert.hf_qwen2 import load_qwen2, qwen2_state_dict
from wuneng_jax.layers.context import LayerContext
from wuneng_jax.layers.packing import document_starts, positions_from_segments
from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models import build_model
from wuneng_jax.models.qwen2 import Qwen2Config
from wuneng_jax.sharding import DEFAULT_RULES

GOLDEN = Path(__file__).resolve().parent / "golden"


@nnx.jit
def _fwd(model, tokens, segment_ids, positions):
    return model(tokens, segment_ids, positions)


def forward(model, tokens, segment_ids=None, positions=None) -> np.ndarray:
    return np.asarray(_fwd(model, jnp.asarray(tokens), _opt(segment_ids), _opt(positions)))


def _opt(x):
    return None if x is None else jnp.asarray(x)


def maxabs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------------------------
# Independent float64 numpy Qwen2 (transformers semantics, rwkv7-and-kernels.md §7.3)


def np_positions(seg: np.ndarray) -> np.ndarray:
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return pos


def np_qwen2(sd: dict, cfg: Qwen2Config, tokens, seg=None, pos=None):
    """-> (logits [B,T,V], layer inputs + final hidden, attention-block outputs), all float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    b_, t_ = tokens.shape
    seg = np.ones((b_, t_), np.int64) if seg is None else np.asarray(seg)
    pos = np_positions(seg) if pos is None else np.asarray(pos)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    half = hd // 2
    inv = cfg.rope_theta ** (-(2.0 * np.arange(half)) / hd)
    ang = pos[:, :, None, None] * inv  # [B,T,1,hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # pairs (j, j + hd/2) rotate by the same angle
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.rms_norm_eps))

    x = sd["model.embed_tokens.weight"][tokens]
    hidden, attn = [x], []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        u = rms(x, sd[p + "input_layernorm.weight"])
        proj = {
            n: u @ sd[p + f"self_attn.{n}_proj.weight"].T + sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"
        }
        q = rope(proj["q"].reshape(b_, t_, nh, hd))
        k = rope(proj["k"].reshape(b_, t_, nkv, hd))
        v = proj["v"].reshape(b_, t_, nkv, hd)
        o = np.zeros((b_, t_, nh, hd))
        for b in range(b_):
            allowed = (seg[b][:, None] == seg[b][None, :]) & np.tri(t_, dtype=bool)
            for h in range(nh):
                g = h // (nh // nkv)
                s = np.where(allowed, q[b, :, h] @ k[b, :, g].T / np.sqrt(hd), -np.inf)
                e = np.exp(s - s.max(-1, keepdims=True))
                o[b, :, h] = (e / e.sum(-1, keepdims=True)) @ v[b, :, g]
        a = o.reshape(b_, t_, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        attn.append(a)
        x = x + a
        n = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = n @ sd[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + ((gate / (1.0 + np.exp(-gate))) * (n @ sd[p + "mlp.up_proj.weight"].T))
            @ sd[p + "mlp.down_proj.weight"].T
        )
        hidden.append(x)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return rms(x, sd["model.norm.weight"]) @ head.T, hidden, attn


def test_positions_and_document_starts():
    seg = np.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 1, 1, 1, 1], [0, 1, 1, 1, 2, 3, 3]], np.int32)
    pos = np.asarray(jax.jit(positions_from_segments)(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos, np_positions(seg))
    starts = np.asarray(document_starts(jnp.asarray(seg)))
    np.testing.assert_array_equal(starts, pos == 0)


# A config unlike the golden one: GQA ratio 3, head_dim != hidden/heads, rope_theta 1e4.
CFG = Qwen2Config(
    vocab_size=97,
    hidden_size=48,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=10,
    intermediate_size=72,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def randomize(model, seed: int, dtype) -> None:
    """Fill every parameter with float32-representable random values (norms ~1, biases non-zero)."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, cur in per_layer_params(model).items():  # per layer: each layer's own fan-in
        shape = cur.shape
        if path[-1] == "scale":
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "bias":
            val = 0.3 * rng.standard_normal(shape)
        elif path[-1] == "embedding":
            val = rng.standard_normal(shape)
        else:
            val = (
                rng.standard_normal(shape)
                * (1.5 if path[-2] in ("q_proj", "k_proj") else 1.0)
                / np.sqrt(shape[0])
            )
        values[path] = val.astype(np.float32).astype(dtype)
    set_per_layer_params(model, values, dtype)


def abstract(cfg: Qwen2Config):
    """``build_model(cfg)`` without running the initialisers (every parameter is set afterwards)."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def make_model(cfg: Qwen2Config, seed: int = 0):
    model = abstract(cfg)
    randomize(model, seed, jnp.dtype(cfg.param_dtype))
    return model


TOKENS = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 20)).astype(np.int32)
SEG = np.array([[1] * 8 + [2] * 7 + [3] * 5, [1] * 13 + [2] * 4 + [0] * 3], np.int32)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def own(request):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=request.param)
    model = make_model(cfg, seed=1 + request.param)
    return cfg, model, qwen2_state_dict(model, cfg)


def test_float32_matches_numpy_float64(own):
    cfg, model, sd = own
    ref, _, _ = np_qwen2(sd, cfg, TOKENS)
    out = forward(model, TOKENS)
    assert out.dtype == np.float32 and out.shape == (2, 20, cfg.vocab_size)
    scale = np.abs(ref).max()
    assert maxabs(out, ref) <= 3e-6 * scale, (maxabs(out, ref), scale)


def test_x64_matches_numpy_float64(own):
    cfg, _, sd = own
    cfg64 = dataclasses.replace(cfg, dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        model = abstract(cfg64)
        for (_, var), (_, src) in zip(  # same weights as the float32 model
            nnx.to_flat_state(nnx.state(model, nnx.Param)),
            nnx.to_flat_state(nnx.state(own[1], nnx.Param)),
            strict=True,
        ):
            var.set_value(jnp.asarray(np.asarray(src[...]), jnp.float64))
        seg, pos = SEG, np_positions(SEG)
        ref, _, _ = np_qwen2(sd, cfg, TOKENS, seg, pos)
        out = forward(model, TOKENS, seg, pos)
    assert out.dtype == np.float64
    assert maxabs(out, ref) <= 1e-10 * np.abs(ref).max(), maxabs(out, ref)


def test_packed_matches_reference_and_documents_alone(own):
    cfg, model, sd = own
    packed = forward(model, TOKENS, SEG)  # positions derived from the segment ids
    ref, _, _ = np_qwen2(sd, cfg, TOKENS, SEG)
    valid = SEG > 0
    assert maxabs(packed[valid], ref[valid]) <= 3e-6 * np.abs(ref).max()
    assert np.isfinite(packed).all()  # padding rows too
    # each document alone at the start of its own row (rest of the row: padding), one batch
    docs = [(b, np.nonzero(SEG[b] == sid)[0]) for b in range(2) for sid in (1, 2, 3) if (SEG[b] == sid).any()]
    alone_tokens = np.zeros((len(docs), SEG.shape[1]), np.int32)
    alone_seg = np.zeros_like(alone_tokens)
    for r, (b, idx) in enumerate(docs):
        alone_tokens[r, : idx.size] = TOKENS[b, idx]
        alone_seg[r, : idx.size] = 1
    alone = forward(model, alone_tokens, alone_seg)
    for r, (b, idx) in enumerate(docs):
        assert maxabs(packed[b, idx], alone[r, : idx.size]) <= 2e-5, (b, idx)
    # the same tokens without segment ids attend across documents: the test can fail
    assert maxabs(forward(model, TOKENS)[1, 13:17], packed[1, 13:17]) > 1e-3


def test_causality(own):
    _, model, _ = own
    base = forward(model, TOKENS)
    changed = TOKENS.copy()
    changed[:, 11:] = (changed[:, 11:] + 5) % CFG.vocab_size
    out = forward(model, changed)
    assert maxabs(out[:, :11], base[:, :11]) <= 1e-6
    assert maxabs(out[:, 11:], base[:, 11:]) > 1e-2


def test_intermediates_and_attention_pieces(own):
    cfg, model, sd = own
    res = nnx.jit(lambda m, t: m.forward_with_intermediates(t))(model, jnp.asarray(TOKENS))
    ref, hidden, attn = np_qwen2(sd, cfg, TOKENS)
    assert len(res.hidden_states) == cfg.num_layers + 1 and len(res.attn_outputs) == cfg.num_layers
    np.testing.assert_array_equal(np.asarray(res.logits), forward(model, TOKENS))
    for i in range(cfg.num_layers):
        assert maxabs(res.hidden_states[i], hidden[i]) <= 1e-5 * np.abs(hidden[i]).max()
        assert maxabs(res.attn_outputs[i], attn[i]) <= 1e-5 * np.abs(attn[i]).max()

    # the split attention API reproduces the block output
    @nnx.jit
    def pieces(m, tokens, h):
        seg, _, rope = m.prepare(tokens)
        layer = m.layers.view(1)
        q, k, v = layer.self_attn.project_qkv(layer.input_layernorm(h))
        a, _ = layer.self_attn.attend(q, k, v, LayerContext(rope, seg))
        return (q, k, v), layer.self_attn.out(a)

    (q, k, v), o = pieces(model, jnp.asarray(TOKENS), res.hidden_states[1])
    assert q.shape == (2, 20, 6, 10) and k.shape == v.shape == (2, 20, 2, 10)
    assert maxabs(o, res.attn_outputs[1]) <= 1e-6 * np.abs(attn[1]).max()


def test_bfloat16_compute_close(own):
    cfg, model, _ = own
    m16 = abstract(dataclasses.replace(cfg, dtype="bfloat16"))
    nnx.update(m16, nnx.state(model, nnx.Param))
    out16 = forward(m16, TOKENS)
    out32 = forward(model, TOKENS)
    assert out16.dtype == np.float32
    assert maxabs(out16, out32) <= 0.05 * np.abs(out32).max()
    assert maxabs(out16, out32) > 0  # it really ran in bfloat16


def test_input_errors():
    model = abstract(dataclasses.replace(CFG, num_layers=1))  # the checks run before any parameter is used
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array with the tokens' shape"):
        model(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="enable_x64"):
        build_model(dataclasses.replace(CFG, dtype="float64"), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------
# Hugging Face golden checkpoints and logits (tests/golden, written by tests/golden/make_golden.py)


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "qwen2_logits.npz")


@pytest.fixture(scope="module", params=["untied", "tied", "sharded"])
def hf_model(request):
    cfg, model = load_qwen2(GOLDEN / f"qwen2_tiny_{request.param}")
    return ("untied" if request.param == "sharded" else request.param), request.param, cfg, model


def test_golden_config(hf_model):
    name, which, cfg, _ = hf_model
    assert cfg.tie_word_embeddings == (name == "tied")
    assert cfg.rope_theta == (
        1e4 if name == "tied" else 1e6
    )  # sharded: transformers-4.x top-level rope_theta
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        64,
        4,
        2,
        16,
        256,
    )


def test_golden_logits_float32(hf_model, golden):
    name, _, _, model = hf_model
    out = forward(model, golden["tokens"])
    scale = np.abs(golden[f"{name}_logits_np64"]).max()
    d_hf = maxabs(out, golden[f"{name}_logits_f32"])
    d_np = maxabs(out, golden[f"{name}_logits_np64"])
    print(f"{name}: max|logit| {scale:.3f}  vs HF fp32 {d_hf:.3g}  vs float64 {d_np:.3g}")
    assert d_hf <= 3e-6 * scale and d_np <= 3e-6 * scale


def test_golden_packed(hf_model, golden):
    name, _, _, model = hf_model
    seg, pos = golden["packed_segment_ids"], golden["packed_positions"]
    out = forward(model, golden["tokens"], seg, pos)
    valid = seg > 0
    d = maxabs(out[valid], golden[f"{name}_packed_logits_f32"][valid])
    print(f"{name}: packed vs HF per-document {d:.3g}")
    assert d <= 3e-6 * np.abs(golden[f"{name}_logits_np64"]).max()


def test_golden_x64(hf_model, golden):
    name, which, _, _ = hf_model
    with jax.enable_x64(True):
        _, model = load_qwen2(GOLDEN / f"qwen2_tiny_{which}", dtype="float64", param_dtype="float64")
        out = forward(model, golden["tokens"])
    scale = np.abs(golden[f"{name}_logits_np64"]).max()
    d_np = maxabs(out, golden[f"{name}_logits_np64"])
    d_hf = maxabs(out, golden[f"{name}_logits_hf64"])
    print(f"{name}: x64 vs float64 numpy {d_np:.3g}  vs HF .double() {d_hf:.3g}")
    assert d_np <= 1e-10 * scale
    assert d_hf <= 1.5e-6 * scale  # HF's float64 model keeps RMSNorm / RoPE / softmax in float32


def test_golden_sharded_mesh(golden):
    mesh = jax.make_mesh(
        (2, 2, 2, 1), ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4
    )
    tokens = np.concatenate([golden["tokens"]] * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        _, model = load_qwen2(GOLDEN / "qwen2_tiny_untied")
        q = model.layers.view(0).self_attn.q_proj.kernel[...]
        # embed -> (fsdp, sequence): with a size-1 sequence axis that is the (fsdp, tensor) placement
        want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
        assert q.sharding.is_equivalent_to(want, 2)
        assert model.lm_head.kernel[...].sharding.is_equivalent_to(want, 2)
        out = forward(model, tokens)
    assert maxabs(out, np.concatenate([golden["untied_logits_f32"]] * 2)) <= 3e-6 * 11


def test_gradients_reach_every_parameter(own):
    cfg, model, _ = own

    def loss(m):
        logits = m(jnp.asarray(TOKENS), jnp.asarray(SEG))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = nnx.jit(nnx.grad(loss))(model)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, g in flat:
        g = np.asarray(g[...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path


def test_out_of_range_token_ids_give_nan(own):
    _, model, _ = own
    for bad_id in (CFG.vocab_size, -1):
        bad = TOKENS.copy()
        bad[0, 5] = bad_id
        out = forward(model, bad)
        # the bad row turns NaN from the bad token on (earlier ones too: 0-weight x NaN value in attention)
        assert np.isnan(out[0, 5:]).all(), bad_id
        np.testing.assert_array_equal(out[1], forward(model, TOKENS)[1])  # other rows are untouched

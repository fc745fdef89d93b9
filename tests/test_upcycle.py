"""Upcycling qwen2 -> wuneng: logits equal the source at init (every fusion mode / state setting, float32
and float64), the recipe's copies and initial values, clear errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wuneng_cases import COMBOS, HYBRID, QCFG, SEG, B, T, combo_id, maxabs, random_qwen2, tokens

from wuneng_jax.convert.upcycle import upcycle_qwen2
from wuneng_jax.models.qwen2 import Qwen2DecoderLayer
from wuneng_jax.models.wuneng_layer import WuNengDecoderLayer
from wuneng_jax.models.wuneng_params import hybrid_param_names

TOK = tokens(1, B, T)


@pytest.fixture(scope="module")
def source():
    model = random_qwen2(3)
    out = model.forward_with_intermediates(jnp.asarray(TOK), jnp.asarray(SEG))
    return model, out


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_upcycled_logits_equal_source_float32(source, combo):
    qwen, ref = source
    fusion, sq, sv = combo
    cfg, model = upcycle_qwen2(qwen, QCFG, fusion=fusion, state_query=sq, state_value=sv, **HYBRID)
    out = model.forward_with_intermediates(jnp.asarray(TOK), jnp.asarray(SEG))
    scale = float(np.abs(ref.logits).max())
    assert maxabs(out.logits, ref.logits) <= 1e-6 * scale
    for a, b in zip(out.attn_outputs, ref.attn_outputs, strict=True):
        assert maxabs(a, b) <= 1e-6 * float(np.abs(b).max())
    # The state branch is live (non-zero), only its contribution to the output is switched off.
    assert all(float(np.abs(s).max()) > 0 for s in out.state_outputs)


@pytest.mark.parametrize("fusion", ["concat", "add", "gate", "full"])
def test_upcycled_logits_equal_source_float64(fusion):
    sq, sv = (False, "attention_output") if fusion == "gate" else (True, "attention_value")
    with jax.enable_x64(True):
        qcfg = dataclasses.replace(QCFG, dtype="float64", param_dtype="float64")
        qwen = random_qwen2(4, qcfg)
        ref = np.asarray(qwen(jnp.asarray(TOK), jnp.asarray(SEG)))
        assert ref.dtype == np.float64
        _, model = upcycle_qwen2(qwen, qcfg, fusion=fusion, state_query=sq, state_value=sv, **HYBRID)
        got = np.asarray(model(jnp.asarray(TOK), jnp.asarray(SEG)))
    assert maxabs(got, ref) <= 1e-13 * float(np.abs(ref).max())


def test_upcycled_tied_head_and_layer_subset():
    qcfg = dataclasses.replace(QCFG, tie_word_embeddings=True, num_layers=3)
    qwen = random_qwen2(5, qcfg)
    ref = np.asarray(qwen(jnp.asarray(TOK), jnp.asarray(SEG)))
    cfg, model = upcycle_qwen2(qwen, qcfg, hybrid_layers=[0, 2], **HYBRID)
    assert model.lm_head is None and cfg.hybrid_layer_ids == (0, 2)
    got = np.asarray(model(jnp.asarray(TOK), jnp.asarray(SEG)))
    assert maxabs(got, ref) <= 1e-6 * float(np.abs(ref).max())


def test_recipe_copies_and_initial_values(source):
    qwen, _ = source
    cfg, model = upcycle_qwen2(qwen, QCFG, fusion="full", **HYBRID)
    src = dict(nnx.to_flat_state(nnx.state(qwen, nnx.Param)))
    dst = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in src.items():  # every Qwen2 parameter copied bit for bit, same path
        np.testing.assert_array_equal(np.asarray(dst[path][...]), np.asarray(var[...]))
    d, hh, g, hd = QCFG.hidden_size, QCFG.num_heads, QCFG.num_kv_heads, QCFG.head_dim
    n_layers = QCFG.num_layers
    for i in range(n_layers):
        a, qa = model.layers.view(i).self_attn, qwen.layers.view(i).self_attn
        wq = np.asarray(qa.q_proj.kernel[...], np.float64)
        want_r = np.stack([wq[:, (j * (hh // g)) * hd : (j + 1) * (hh // g) * hd] for j in range(g)])
        want_r = want_r.reshape(g, d, hh // g, hd).mean(axis=2).transpose(1, 0, 2).reshape(d, g * hd)
        np.testing.assert_allclose(np.asarray(a.r_proj[...]), want_r, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(a.kappa_proj[...]), np.asarray(qa.k_proj.kernel[...]))
        # RWKV-7 recipe (rwkv7-and-kernels.md §1.5), written out independently.
        r1 = 1 - i / n_layers
        r0 = i / (n_layers - 1)
        ddd = np.arange(d) / d
        np.testing.assert_allclose(np.asarray(a.mu_r[...]), 1 - ddd ** (0.2 * r1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(a.mu_w[...]), 1 - ddd ** (0.9 * r1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(a.mu_kappa[...]), 1 - ddd ** (0.7 * r1), rtol=1e-6)
        c, n = cfg.state_size, cfg.state_head_size
        zz = ((np.arange(c) % n) - (n - 1) / 2) / ((n - 1) / 2)
        zz = zz * np.abs(zz)
        www = -6 + 6 * (np.arange(c) / (c - 1)) ** (1 + r0**0.3)
        np.testing.assert_allclose(np.asarray(a.w0[...]), www + 0.5 + 2.5 * zz, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a.ln_x_scale[...]), ((i + 1) / n_layers) ** 0.7, rtol=1e-6)
        for name in ("w1", "a1", "g1", "o_state", "o_middle_b", "state_q_scale", "gate_w", "gate_b"):
            assert not np.any(np.asarray(getattr(a, name)[...])), name
        for name in ("w2", "a2", "g2", "o_middle_a"):  # orthogonal, non-zero
            assert np.abs(np.asarray(getattr(a, name)[...])).max() > 0, name
        np.testing.assert_array_equal(np.asarray(a.beta[...]), 1.0)
        np.testing.assert_array_equal(np.asarray(a.gamma[...]), 1.0)
        np.testing.assert_array_equal(
            np.asarray(a.state_q_proj[...]), np.broadcast_to(np.eye(hd), (hh, hd, hd))
        )


@pytest.mark.parametrize(
    "fusion, zero",
    [("concat", ["o_state"]), ("add", ["beta"]), ("gate", ["gamma"])],
    ids=["concat", "add", "gate"],
)
def test_table_zero_inits(source, fusion, zero):
    qwen, _ = source
    _, model = upcycle_qwen2(qwen, QCFG, fusion=fusion, **HYBRID)
    for name in zero:
        assert not np.any(np.asarray(getattr(model.layers.view(0).self_attn, name)[...]))


def test_attention_output_value_projection_is_group_mean(source):
    qwen, _ = source
    _, model = upcycle_qwen2(qwen, QCFG, state_query=False, state_value="attention_output", **HYBRID)
    w = np.asarray(model.layers.view(1).self_attn.state_v_proj[...])
    hh, g, hd = QCFG.num_heads, QCFG.num_kv_heads, QCFG.head_dim
    a = np.random.default_rng(0).standard_normal((hh, hd))
    got = (a.reshape(-1) @ w).reshape(g, hd)
    np.testing.assert_allclose(got, a.reshape(g, hh // g, hd).mean(axis=1), rtol=1e-6, atol=1e-7)


def test_hybrid_layer_subset_and_seed(source):
    qwen, _ = source
    cfg, model = upcycle_qwen2(qwen, QCFG, hybrid_layers=[1], seed=7, **HYBRID)
    assert isinstance(model.layers.view(0), Qwen2DecoderLayer) and not isinstance(
        model.layers.view(0), WuNengDecoderLayer
    )
    assert isinstance(model.layers.view(1), WuNengDecoderLayer)
    names = set(hybrid_param_names(cfg))
    assert not any(p[-1] in names for p, _ in nnx.to_flat_state(nnx.state(model.layers.view(0), nnx.Param)))
    _, other = upcycle_qwen2(qwen, QCFG, hybrid_layers=[1], seed=8, **HYBRID)
    w2a, w2b = (np.asarray(m.layers.view(1).self_attn.w2[...]) for m in (model, other))
    assert not np.array_equal(w2a, w2b)  # the seed drives the random parts


def test_upcycle_errors(source):
    qwen, _ = source
    with pytest.raises(ValueError, match="unknown WuNengConfig field"):
        upcycle_qwen2(qwen, QCFG, fusions="add")
    with pytest.raises(ValueError, match="qwen2_cfg differs"):
        upcycle_qwen2(qwen, dataclasses.replace(QCFG, rope_theta=1e6))
    with pytest.raises(ValueError, match="expected a Qwen2 model"):
        upcycle_qwen2(object(), QCFG)
    with pytest.raises(ValueError, match="state_value='attention_output' together with state_query"):
        upcycle_qwen2(qwen, QCFG, state_value="attention_output", **HYBRID)

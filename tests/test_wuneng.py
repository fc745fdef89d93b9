"""wuneng family: config validation and loading, hybrid layer selection, perturbed branches change the
output and get gradients, causality, packed documents == documents alone, state API, sharding."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType
from wuneng_cases import (
    HYBRID,
    QCFG,
    SEG,
    B,
    T,
    maxabs,
    new_params,
    perturb_new,
    random_model,
    random_qwen2,
    tokens,
    wcfg,
)

from wuneng_jax import sharding as S
from wuneng_jax.config import config_from_dict, config_to_dict, load_model_config, preset
from wuneng_jax.convert.upcycle import upcycle_qwen2
from wuneng_jax.layers.context import LayerContext
from wuneng_jax.layers.stack import unstack_model_flat
from wuneng_jax.models import build_model
from wuneng_jax.models.qwen2 import Qwen2DecoderLayer
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.models.wuneng_layer import WuNengDecoderLayer
from wuneng_jax.models.wuneng_params import hybrid_param_names

REPO = Path(__file__).resolve().parents[1]
TOK = tokens(2, B, T)


def rank_formula(c: int, f: float) -> int:  # BlinkDL's suggestion, written out here
    return max(32, int(round(f * math.sqrt(c) / 32) * 32))


# ------------------------------------------------------------------------------------------------
# Config


def test_defaults_resolved():
    cfg = WuNengConfig(**{f.name: getattr(QCFG, f.name) for f in dataclasses.fields(QCFG)})
    assert (cfg.fusion, cfg.state_query, cfg.state_value, cfg.hybrid_layers) == (
        "full",
        True,
        "attention_value",
        "all",
    )
    assert (cfg.state_heads, cfg.state_head_size) == (QCFG.num_kv_heads, QCFG.head_dim)
    c = cfg.state_size
    assert (cfg.decay_lora_rank, cfg.iclr_lora_rank, cfg.gate_lora_rank) == (
        rank_formula(c, 2.5),
        rank_formula(c, 2.5),
        rank_formula(c, 5),
    )
    big = preset("wuneng-7b")
    assert (big.state_heads, big.state_head_size, big.state_size) == (4, 128, 512)
    assert (big.decay_lora_rank, big.iclr_lora_rank, big.gate_lora_rank) == (64, 64, 128)
    assert big.to_qwen2() == preset("qwen2.5-7b")
    split = dataclasses.replace(big, state_head_size=64, state_heads=None)
    assert (split.state_heads, split.state_size) == (8, 512)
    assert wcfg(dataclasses.replace(QCFG, head_dim=48), state_head_size=None).state_head_size == 16
    assert wcfg(dataclasses.replace(QCFG, num_layers=5), hybrid_layers={"every": 2}).hybrid_layers == (
        0,
        2,
        4,
    )
    assert wcfg(
        dataclasses.replace(QCFG, num_layers=5), hybrid_layers={"every": 2, "offset": 1}
    ).hybrid_layers == (
        1,
        3,
    )
    assert wcfg(hybrid_layers=[1]).hybrid_layer_ids == (1,)
    assert hash(wcfg(hybrid_layers=[0, 1])) == hash(wcfg(hybrid_layers=(0, 1)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(state_head_size=24), r"state_head_size=24 does not divide head_dim=16"),
        (dict(state_head_size=8), r"state_head_size=8 is not supported by the wkv7 kernel"),
        (dict(fusion="sum"), r"fusion='sum' is unknown; choose one of \['concat', 'add', 'gate', 'full'\]"),
        (dict(state_value="attention_output"), r"sequential over tokens.*state_query: false"),
        (dict(state_value="output"), r"state_value='output' is unknown"),
        (dict(state_query="yes"), r"state_query='yes': must be true/false"),
        (dict(hybrid_layers=[0, 2]), r"layer id\(s\) \[2\] out of range; num_layers=2 allows 0..1"),
        (dict(hybrid_layers=[-1]), r"out of range"),
        (dict(hybrid_layers=[1, 1]), r"repeat"),
        (dict(hybrid_layers=[]), r"hybrid_layers is empty"),
        (dict(hybrid_layers="some"), r"hybrid_layers='some': use 'all'"),
        (dict(hybrid_layers={"every": 0}), r"hybrid_layers.every=0: must be a positive integer"),
        (dict(hybrid_layers={"each": 2}), r"must be \{every: k\}"),
        (
            dict(state_heads=3),
            r"state_heads=3: .* must be num_kv_heads\*head_dim/state_head_size = 2\*16/16 = 2",
        ),
        (dict(decay_lora_rank=0), r"decay_lora_rank=0: must be a positive integer"),
        (dict(middle_out_rank=0), r"middle_out_rank=0"),
        (dict(wkv_impl="pallas2"), r"wkv_impl='pallas2' is unknown"),
        (dict(wkv_chunk_size=-4), r"wkv_chunk_size=-4"),
        (dict(num_kv_heads=3), r"WuNengConfig.num_kv_heads=3 does not divide num_heads=4"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        wcfg(**overrides)


def test_head_dim_without_kernel_size():
    with pytest.raises(ValueError, match=r"head_dim=10 has no divisor in the kernel's head sizes"):
        wcfg(dataclasses.replace(QCFG, head_dim=10), state_head_size=None)


@pytest.mark.parametrize("name", ["wuneng_tiny", "wuneng-0.5b", "wuneng-1.5b", "wuneng-7b"])
def test_yaml_configs_equal_presets(name):
    path = REPO / "configs" / "models" / f"{name.replace('-', '_')}.yaml"
    assert load_model_config(path) == preset(name)


def test_config_dict_round_trip_and_yaml_errors():
    cfg = load_model_config(
        {"family": "wuneng", "preset": "wuneng_tiny", "fusion": "add", "hybrid_layers": {"every": 2}}
    )
    assert isinstance(cfg, WuNengConfig) and cfg.fusion == "add" and cfg.hybrid_layers == (0,)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="state_query: expected true/false"):
        load_model_config({"family": "wuneng", "preset": "wuneng_tiny", "state_query": "on"})
    with pytest.raises(ValueError, match="unknown key"):
        load_model_config({"family": "wuneng", "preset": "wuneng_tiny", "fusions": "add"})
    assert isinstance(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), WuNeng)


def test_flops_dims_for_training_metrics():
    from train.metrics import flops_dims

    cfg = wcfg(dataclasses.replace(QCFG, num_layers=5), hybrid_layers=[1, 3])
    dims = flops_dims(cfg, 1000)
    assert (dims.attn_layers, dims.state_layers, dims.state_heads, dims.state_dim) == (5, 2, 2, 16)


# ------------------------------------------------------------------------------------------------
# Structure


def test_hybrid_layer_selection_and_logical_names():
    cfg = wcfg(dataclasses.replace(QCFG, num_layers=3), hybrid_layers={"every": 2})
    model = nnx.eval_shape(lambda: WuNeng(cfg, rngs=nnx.Rngs(0)))
    kinds = [type(layer) for layer in model.layers.views()]
    assert kinds == [WuNengDecoderLayer, Qwen2DecoderLayer, WuNengDecoderLayer]
    names = set(hybrid_param_names(cfg))
    plain = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model.layers.view(1), nnx.Param))}
    assert not plain & names
    for i in (0, 2):
        got = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model.layers.view(i).self_attn, nnx.Param))}
        assert names <= got
    known = {v for k, v in vars(S).items() if k.isupper() and isinstance(v, str)}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
        assert all(a is None or a in known for a in axes), (path, axes)
    a = model.layers.view(0).self_attn
    assert a.r_proj.get_metadata()["out_sharding"] == (S.EMBED, S.STATE_HEADS)
    assert a.w1.get_metadata()["out_sharding"] == (S.EMBED, S.LORA)
    assert a.o_state.get_metadata()["out_sharding"] == (S.STATE_HEADS, S.EMBED)


# ------------------------------------------------------------------------------------------------
# Behaviour of the new branches (eager, shared shapes: see wuneng_cases)


@pytest.fixture(scope="module")
def qwen():
    return random_qwen2(21)


def perturbed(qwen, seed=0, **overrides):
    cfg, model = upcycle_qwen2(qwen, QCFG, **{**HYBRID, **overrides})
    perturb_new(model, cfg, seed)
    return cfg, model


GRAD_CASES = [
    dict(fusion="full"),
    dict(fusion="full", middle_out_rank=None),
    dict(fusion="concat"),
    dict(fusion="add", state_query=False),
    dict(fusion="gate", state_query=False, state_value="attention_output"),
]


@pytest.mark.parametrize("overrides", GRAD_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_perturbed_branches_change_output_and_get_gradients(qwen, overrides):
    tok, seg = jnp.asarray(TOK), jnp.asarray(SEG)
    base = np.asarray(qwen(tok, seg))
    cfg, model = perturbed(qwen, 1, **overrides)
    out = np.asarray(model(tok, seg))
    assert maxabs(out, base) > 1e-2 * np.abs(base).max()
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(base.shape), jnp.float32)

    def loss(m):
        return jnp.sum(m(tok, seg) * weights)

    grads = nnx.grad(loss)(model)
    stacked = {tuple(p): g.get_value() for p, g in nnx.to_flat_state(grads)}
    flat = {".".join(map(str, p)): np.asarray(g) for p, g in unstack_model_flat(model, stacked).items()}
    new = new_params(model, cfg)
    assert len(new) == len(hybrid_param_names(cfg)) * QCFG.num_layers
    for name in flat:  # every parameter, new and Qwen2 alike
        assert np.isfinite(flat[name]).all() and np.abs(flat[name]).max() > 0, name
    assert set(new) <= set(flat)


@pytest.mark.parametrize(
    "overrides",
    [dict(fusion=f) for f in ("concat", "add", "gate", "full")]
    + [
        dict(fusion=f, state_query=False, state_value="attention_output")
        for f in ("concat", "add", "gate", "full")
    ],
    ids=lambda o: f"{o['fusion']}-{'ao' if 'state_value' in o else 'sq'}",
)
def test_causality_and_packing(qwen, overrides):
    _, model = perturbed(qwen, 2, **overrides)
    tok = TOK.copy()
    out = np.asarray(model(jnp.asarray(tok), jnp.asarray(SEG)))
    # causality: changing tokens from position 11 on leaves every earlier logit unchanged
    changed = tok.copy()
    changed[:, 11:] = (changed[:, 11:] + 1) % QCFG.vocab_size
    out2 = np.asarray(model(jnp.asarray(changed), jnp.asarray(SEG)))
    scale = np.abs(out).max()
    assert maxabs(out2[:, :11], out[:, :11]) <= 1e-6 * scale
    assert maxabs(out2[:, 11:], out[:, 11:]) > 1e-3 * scale
    # packing: every document of the packed rows equals that document run alone (at the start of its own
    # row; what follows it cannot matter, by causality)
    docs = []
    for b in range(B):
        for s in np.unique(SEG[b]):
            idx = np.nonzero(SEG[b] == s)[0]
            docs.append((b, idx))
    for i in range(0, len(docs), B):
        rows = np.asarray(tokens(9, B, T))
        for j, (b, idx) in enumerate(docs[i : i + B]):
            rows[j, : len(idx)] = tok[b, idx]
        alone = np.asarray(model(jnp.asarray(rows)))
        for j, (b, idx) in enumerate(docs[i : i + B]):
            assert maxabs(alone[j, : len(idx)], out[b, idx]) <= 2e-6 * scale, (b, idx)


def test_intermediates_and_state_api(qwen):
    cfg, model = perturbed(qwen, 3, hybrid_layers=[1])
    tok, seg = jnp.asarray(TOK), jnp.asarray(SEG)
    out = model.forward_with_intermediates(tok, seg)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(model(tok, seg)))
    assert len(out.hidden_states) == 3 and len(out.attn_outputs) == 2
    assert out.state_outputs[0] is None and out.state[0] is None
    assert out.state_outputs[1].shape == (B, T, QCFG.hidden_size)
    # the state branch is W_O applied to the state read-out: it lies in W_O's column space
    wo = np.asarray(model.layers.view(1).self_attn.o_proj.kernel[...], np.float64)
    br = np.asarray(out.state_outputs[1], np.float64).reshape(-1, QCFG.hidden_size)
    coef, *_ = np.linalg.lstsq(wo.T, br.T, rcond=None)
    assert maxabs(coef.T @ wo, br) <= 1e-4 * np.abs(br).max()
    # layer i's input + attention output + MLP = layer i+1's input
    h1 = out.hidden_states[0] + out.attn_outputs[0]
    mlp = model.layers.view(0).mlp(model.layers.view(0).post_attention_layernorm(h1))
    assert maxabs(h1 + mlp, out.hidden_states[1]) <= 1e-5
    logits, state = model(tok, seg, return_state=True)
    zero = model.init_state(B)
    assert zero[0] is None and jax.tree.map(jnp.shape, zero[1]) == jax.tree.map(jnp.shape, state[1])
    assert state[1].wkv.dtype == jnp.float32 and state[1].shift.dtype == jnp.float32
    cont = model(tok, seg, state=state)  # continues the recurrence (the attention sees this call only)
    assert maxabs(cont, logits) > 0
    np.testing.assert_array_equal(np.asarray(model(tok, seg, state=zero)), np.asarray(logits))
    with pytest.raises(ValueError, match="state shapes"):
        model(tok, seg, state=model.init_state(B + 1))
    with pytest.raises(ValueError, match="plain attention layer"):
        model(tok, seg, state=(zero[1], zero[1]))


def test_bfloat16_compute_close_to_float32():
    """One hybrid layer in bfloat16 compute (float32 parameters, default wkv7 kernel) vs float32."""
    cfg32 = wcfg(wkv_impl="auto")
    m32 = random_model(WuNeng, cfg32, 4)
    m16 = nnx.eval_shape(lambda: WuNeng(dataclasses.replace(cfg32, dtype="bfloat16"), rngs=nnx.Rngs(0)))
    nnx.update(m16, nnx.state(m32))
    h = np.random.default_rng(5).standard_normal((B, T, QCFG.hidden_size)).astype(np.float32)

    def layer(m, h):
        _, _, rope = m.prepare(jnp.asarray(TOK), jnp.asarray(SEG))
        return m.layers.view(0)(h.astype(m.cfg.dtype), LayerContext(rope, jnp.asarray(SEG)))

    a = layer(m32, jnp.asarray(h))
    b = nnx.jit(layer)(m16, jnp.asarray(h))
    assert b.h.dtype == jnp.bfloat16 and b.cache.state.wkv.dtype == jnp.float32
    pairs = ((b.h, a.h), (b.o, a.o), (b.state_branch, a.state_branch), (b.cache.state.wkv, a.cache.state.wkv))
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        # bfloat16 keeps ~3 significant digits; every weight here is random at unit scale
        assert 0 < np.abs(x - y).max() <= 0.08 * np.abs(y).max()
        assert np.median(np.abs(x - y)) <= 0.02 * np.median(np.abs(y))


def test_sharded_mesh_matches_single_device(qwen):
    tok, seg = jnp.asarray(TOK), jnp.asarray(SEG)
    _, ref_model = upcycle_qwen2(qwen, QCFG, **HYBRID)
    ref = ref_model.forward_with_intermediates(tok, seg)
    mesh = jax.make_mesh(
        (1, 2, 2, 1),
        ("data", "fsdp", "tensor", "sequence"),
        axis_types=(AxisType.Auto,) * 4,
        devices=jax.devices()[:4],
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(S.DEFAULT_RULES):
        _, model = upcycle_qwen2(qwen, QCFG, **HYBRID)
        a = model.layers.view(0).self_attn
        want = spmd.apply_rules(jax.sharding.PartitionSpec(S.EMBED, S.STATE_HEADS), S.DEFAULT_RULES)
        assert want == jax.sharding.PartitionSpec(("fsdp", "sequence"), "tensor")
        assert a.r_proj[...].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), 2)
        assert a.w2[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
        out = nnx.jit(lambda m, t, s: m.forward_with_intermediates(t, s))(model, tok, seg)
    assert maxabs(out.logits, ref.logits) <= 2e-6 * np.abs(ref.logits).max()
    for x, y in zip(out.state_outputs, ref.state_outputs, strict=True):
        assert maxabs(x, y) <= 2e-5 * np.abs(y).max()


def test_scanned_groups_match_layer_by_layer(qwen):
    """The scanned stack (groups of a repeating pattern) computes what calling each layer in turn does."""
    cfg = wcfg(dataclasses.replace(QCFG, num_layers=5), hybrid_layers={"every": 2})
    model = random_model(WuNeng, cfg, 7)
    perturb_new(model, cfg, 8)
    assert [tuple(g) for g in model.layers.groups] == [(0, 2, 2), (4, 1, 1)]
    tok, seg = jnp.asarray(TOK), jnp.asarray(SEG)
    seg_ids, _, rope = model.prepare(tok, seg)
    ctx = LayerContext(rope, seg_ids)
    h = model.embed(tok)
    for layer in model.layers.views():
        h = layer(h, ctx).h
    want = np.asarray(model.head(h))
    got = np.asarray(model(tok, seg))
    assert maxabs(got, want) <= 1e-5 * np.abs(want).max()

"""WuNeng export / reload as a Hugging Face style directory: bitwise round trip, file layout, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wuneng_cases import HYBRID, QCFG, SEG, TOK_SHAPE, maxabs, perturb_new, random_qwen2, tokens

from wuneng_jax.convert.hf_qwen2 import hf_param_map, load_qwen2
from wuneng_jax.convert.hf_wuneng import HYBRID_KEYS, load_wuneng, save_wuneng, wuneng_config_from_hf
from wuneng_jax.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from wuneng_jax.convert.upcycle import upcycle_qwen2
from wuneng_jax.layers.stack import per_layer_params
from wuneng_jax.models.wuneng_params import hybrid_param_names

TOK = tokens(4, *TOK_SHAPE)


def flat(model) -> dict:
    """Every parameter by per-layer name (``layers.1.self_attn.q_proj.kernel``): models stack layers in
    different groups, their layers compare one by one."""
    return {".".join(map(str, p)): np.asarray(v) for p, v in per_layer_params(model).items()}


@pytest.fixture(scope="module")
def models():
    qwen = random_qwen2(31)
    out = {}
    for name, over in {
        "full": dict(fusion="full"),
        "gate-ao-subset": dict(
            fusion="gate", state_query=False, state_value="attention_output", hybrid_layers=[1]
        ),
        "full-rank": dict(fusion="full", middle_out_rank=None, hybrid_layers={"every": 2}),
    }.items():
        cfg, model = upcycle_qwen2(qwen, QCFG, **{**HYBRID, **over})
        perturb_new(model, cfg, 5)
        out[name] = (cfg, model)
    return out


@pytest.mark.parametrize("name", ["full", "gate-ao-subset", "full-rank"])
def test_round_trip_bitwise(models, tmp_path, name):
    cfg, model = models[name]
    path = save_wuneng(model, cfg, tmp_path / "ckpt")
    cfg2, model2 = load_wuneng(path, wkv_impl="reference")
    assert cfg2 == cfg
    a, b = flat(model), flat(model2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    tok, seg = jnp.asarray(TOK), jnp.asarray(SEG)
    np.testing.assert_array_equal(np.asarray(model2(tok, seg)), np.asarray(model(tok, seg)))


def test_file_layout(models, tmp_path):
    cfg, model = models["gate-ao-subset"]
    path = save_wuneng(model, cfg, tmp_path / "ckpt")
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "wuneng" and hf["architectures"] == ["WuNengForCausalLM"]
    assert (hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]) == (64, 4, 2)
    assert {k: hf[k] for k in HYBRID_KEYS} == {
        "fusion": "gate",
        "state_query": False,
        "state_value": "attention_output",
        "hybrid_layers": [1],
        "state_heads": 2,
        "state_head_size": 16,
        "decay_lora_rank": 8,
        "iclr_lora_rank": 6,
        "gate_lora_rank": 12,
        "middle_out_rank": 5,
    }
    tensors = read_safetensors_dir(path)
    # The Qwen2 part under Hugging Face names and layout ([out, in] linear weights) ...
    qmap = hf_param_map(cfg.to_qwen2())
    w = tensors["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(w, np.asarray(model.layers.view(1).self_attn.q_proj.kernel[...]).T)
    # ... and the new parameters of hybrid layer 1 only, in this library's layout.
    new = {f"model.layers.1.self_attn.{n}" for n in hybrid_param_names(cfg)}
    assert set(tensors) == set(qmap) | new
    np.testing.assert_array_equal(
        tensors["model.layers.1.self_attn.state_v_proj"],
        np.asarray(model.layers.view(1).self_attn.state_v_proj[...]),
    )
    # The Qwen2 tensors alone form a loadable Qwen2 checkpoint equal to the base model.
    qdir = tmp_path / "qwen2"
    qdir.mkdir()
    (qdir / "config.json").write_text(json.dumps({**hf, "model_type": "qwen2"}))
    write_safetensors_dir(qdir, {k: tensors[k] for k in qmap})
    _, qwen = load_qwen2(qdir)
    for k, v in flat(qwen).items():
        np.testing.assert_array_equal(v, flat(model)[k])


def test_bfloat16_storage_and_shards(models, tmp_path):
    cfg, model = models["full"]
    path = save_wuneng(model, cfg, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=40_000)
    assert (path / "model.safetensors.index.json").is_file()
    cfg2, model2 = load_wuneng(path, param_dtype="bfloat16")
    assert cfg2 == dataclasses.replace(cfg, param_dtype="bfloat16", wkv_impl="auto")
    path2 = save_wuneng(model2, cfg2, tmp_path / "bf16b")
    a, b = read_safetensors_dir(path), read_safetensors_dir(path2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    m32 = flat(model)
    for k, v in flat(model2).items():
        assert v.dtype == jnp.bfloat16
        assert maxabs(v, m32[k]) <= 2**-8 * max(1.0, float(np.abs(m32[k]).max()))


def test_errors(models, tmp_path):
    cfg, model = models["full"]
    path = save_wuneng(model, cfg, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_wuneng(model, cfg, path)
    save_wuneng(model, cfg, path, overwrite=True)
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='qwen2', expected 'wuneng'"):
        wuneng_config_from_hf({**hf, "model_type": "qwen2"})
    with pytest.raises(ValueError, match=r"missing WuNeng key\(s\) \['fusion'\]"):
        wuneng_config_from_hf({k: v for k, v in hf.items() if k != "fusion"})
    with pytest.raises(ValueError, match="fusion='mix' is unknown"):
        wuneng_config_from_hf({**hf, "fusion": "mix"})
    with pytest.raises(ValueError, match="unknown override"):
        load_wuneng(path, hidden_size=8)
    tensors = dict(read_safetensors_dir(path))
    del tensors["model.layers.0.self_attn.w1"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(hf))
    write_safetensors_dir(broken, tensors)
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): \['model.layers.0.self_attn.w1'\]"):
        load_wuneng(broken)
    (broken / "config.json").write_text(json.dumps({**hf, "decay_lora_rank": 4}))
    tensors["model.layers.0.self_attn.w1"] = np.zeros((64, 8), np.float32)
    write_safetensors_dir(broken, tensors)
    with pytest.raises(
        ValueError, match=r"'model.layers.0.self_attn.w1' has shape \(64, 8\), the config expects \(64, 4\)"
    ):
        load_wuneng(broken)
    assert jax.tree.leaves(model)  # the source model is untouched

"""Hugging Face Qwen2 checkpoint IO: config parsing, loading errors, exact save/load round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from wuneng_jax.convert.hf_qwen2 import (
    load_qwen2,
    qwen2_config_from_hf,
    qwen2_config_to_hf,
    qwen2_state_dict,
    save_qwen2,
)
from wuneng_jax.convert.safetensors_io import (
    read_safetensors,
    read_safetensors_dir,
    write_safetensors,
    write_safetensors_dir,
)

GOLDEN = Path(__file__).resolve().parent / "golden"


def golden_tensors(name: str) -> dict[str, np.ndarray]:
    """The golden checkpoint's tensors read by the safetensors package (not by this library)."""
    d = GOLDEN / f"qwen2_tiny_{name}"
    if (d / "model.safetensors").exists():
        return load_file(d / "model.safetensors")
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def copy_ckpt(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(GOLDEN / f"qwen2_tiny_{name}", dst)
    return dst


def bitwise_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


# ------------------------------------------------------------------------------------------------
# safetensors IO


def test_safetensors_roundtrip_and_compat(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    write_safetensors(tmp_path / "x.safetensors", t, {"format": "pt"})
    assert bitwise_equal(read_safetensors(tmp_path / "x.safetensors"), t)
    lib = load_file(tmp_path / "x.safetensors")  # the safetensors package reads our files
    assert bitwise_equal({k: lib[k] for k in ("a.weight", "c")}, {k: t[k] for k in ("a.weight", "c")})
    # and we read the package's sharded directories
    sharded = read_safetensors_dir(GOLDEN / "qwen2_tiny_sharded")
    assert bitwise_equal(sharded, golden_tensors("sharded"))


def test_sharded_write(tmp_path):
    rng = np.random.default_rng(1)
    t = {f"w{i}": rng.standard_normal((16, 16)).astype(np.float32) for i in range(5)}
    files = write_safetensors_dir(tmp_path, t, max_shard_bytes=2500)
    assert "model.safetensors.index.json" in files and len(files) == 4  # 1024-byte tensors, 2 per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert bitwise_equal(read_safetensors_dir(tmp_path), t)


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        read_safetensors_dir(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
    d = copy_ckpt("sharded", tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shard 'model-00002-of-00003.safetensors'"):
        read_safetensors_dir(d)


# ------------------------------------------------------------------------------------------------
# config.json


def test_config_both_rope_layouts():
    v5 = json.loads((GOLDEN / "qwen2_tiny_untied" / "config.json").read_text())
    v4 = json.loads((GOLDEN / "qwen2_tiny_sharded" / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    assert "rope_theta" in v4 and "rope_parameters" not in v4
    assert qwen2_config_from_hf(v5) == qwen2_config_from_hf(v4)
    assert qwen2_config_from_hf(v5).rope_theta == 1e6
    cfg = qwen2_config_from_hf(v5)
    assert qwen2_config_from_hf(qwen2_config_to_hf(cfg)) == cfg


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="llama"), "model_type='llama'"),
        (dict(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn"}), "rope_type='yarn' is not supported"),
        (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(num_key_value_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
    ],
)
def test_config_errors(change, match):
    hf = json.loads((GOLDEN / "qwen2_tiny_untied" / "config.json").read_text())
    with pytest.raises(ValueError, match=match):
        qwen2_config_from_hf({**hf, **change})
    hf.pop("vocab_size")
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['vocab_size'\]"):
        qwen2_config_from_hf(hf)


# ------------------------------------------------------------------------------------------------
# load / save


@pytest.mark.parametrize("name", ["untied", "tied", "sharded"])
def test_load_save_roundtrip_bitwise(name, tmp_path):
    cfg, model = load_qwen2(GOLDEN / f"qwen2_tiny_{name}")
    src = golden_tensors(name)
    assert bitwise_equal(qwen2_state_dict(model, cfg), src)
    out = save_qwen2(model, cfg, tmp_path / "out", source_dir=GOLDEN / f"qwen2_tiny_{name}")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    written = load_file(out / "model.safetensors")
    assert bitwise_equal(written, src)
    assert ("lm_head.weight" in written) == (name != "tied")
    cfg2, model2 = load_qwen2(out)
    assert cfg2 == cfg
    assert bitwise_equal(qwen2_state_dict(model2, cfg2), src)
    hf = json.loads((out / "config.json").read_text())
    assert hf["rope_parameters"]["rope_theta"] == hf["rope_theta"] == cfg.rope_theta
    assert "eos_token_id" in hf  # kept from the source config.json


def test_save_sharded_bf16_and_overwrite(tmp_path):
    cfg, model = load_qwen2(GOLDEN / "qwen2_tiny_untied")
    src = golden_tensors("untied")
    out = save_qwen2(model, cfg, tmp_path / "out", dtype="bfloat16", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    # golden weights are bfloat16-exact, so bf16 storage is lossless
    back = read_safetensors_dir(out)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in back.values())
    assert bitwise_equal({k: v.astype(np.float32) for k, v in back.items()}, src)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, model2 = load_qwen2(out)
    assert bitwise_equal(qwen2_state_dict(model2, cfg2), src)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_qwen2(model, cfg, out)
    save_qwen2(model, cfg, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_qwen2(tmp_path)

    d = copy_ckpt("untied", tmp_path)
    t = golden_tensors("untied")

    def rewrite(tensors):
        write_safetensors(d / "model.safetensors", tensors)

    rewrite({k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(
        ValueError, match=r"missing 1 tensor\(s\) \(config.json says tie_word_embeddings=false\)"
    ):
        load_qwen2(d)
    rewrite({k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.bias"):
        load_qwen2(d)
    rewrite({**t, "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.2.mlp.up_proj.weight'\]"):
        load_qwen2(d)
    rewrite(
        {**t, "model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"][:, :32]}
    )
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(64, 32\), the config expects \(64, 64\)",
    ):
        load_qwen2(d)

    tied = copy_ckpt("tied", tmp_path)
    tt = golden_tensors("tied")
    write_safetensors(
        tied / "model.safetensors", {**tt, "lm_head.weight": tt["model.embed_tokens.weight"] * 2}
    )
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_qwen2(tied)
    # an lm_head equal to the embedding is accepted for a tied config
    write_safetensors(tied / "model.safetensors", {**tt, "lm_head.weight": tt["model.embed_tokens.weight"]})
    cfg, model = load_qwen2(tied)
    assert cfg.tie_word_embeddings and model.lm_head is None


def test_load_overrides_dtype():
    cfg, model = load_qwen2(GOLDEN / "qwen2_tiny_tied", dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    emb = model.embed_tokens.embedding[...]
    assert emb.dtype == jnp.bfloat16
    ref = golden_tensors("tied")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(emb, np.float32), ref)

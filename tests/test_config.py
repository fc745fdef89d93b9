"""Model config machinery: registry, YAML loading, presets, validation, parameter counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wuneng_jax import config as C
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

TINY = dict(
    family="qwen2",
    vocab_size=100,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return p


def test_registry_and_family_lookup():
    fam = C.get_family("qwen2")
    assert fam.config_cls is Qwen2Config and fam.model_cls is Qwen2
    assert C.family_of(C.preset("qwen2_tiny")) == "qwen2"
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        C.get_family("llama")


def test_yaml_load_with_coercion(tmp_path):
    p = _write(
        tmp_path,
        "family: qwen2\nvocab_size: 100\nhidden_size: 32\nnum_layers: 1\nnum_heads: 4\nnum_kv_heads: 2\n"
        "intermediate_size: 48\nrope_theta: 1e6\nrms_norm_eps: 1e-5\ntie_word_embeddings: true\n",
    )
    cfg = C.load_model_config(p)
    assert isinstance(cfg, Qwen2Config)
    assert cfg.rope_theta == 1e6 and isinstance(cfg.rope_theta, float)  # YAML reads "1e6" as a string
    assert cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings is True
    assert cfg.head_dim == 8  # default hidden // heads


def test_unknown_keys_list_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_heads'\].*valid keys.*num_heads"):
        C.load_model_config({**TINY, "n_heads": 4})
    p = _write(tmp_path, "family: qwen2\nhidden: 3\n")
    with pytest.raises(ValueError, match=r"m\.yaml: unknown key\(s\) \['hidden'\]"):
        C.load_model_config(p)


def test_missing_family_and_required_keys():
    with pytest.raises(ValueError, match="no 'family' key"):
        C.load_model_config({k: v for k, v in TINY.items() if k != "family"})
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['intermediate_size'\]"):
        C.load_model_config({k: v for k, v in TINY.items() if k != "intermediate_size"})


def test_type_errors_name_the_field():
    with pytest.raises(ValueError, match=r"Qwen2Config\.num_heads: expected an integer"):
        C.load_model_config({**TINY, "num_heads": 4.0})
    with pytest.raises(ValueError, match=r"Qwen2Config\.tie_word_embeddings: expected true/false"):
        C.load_model_config({**TINY, "tie_word_embeddings": "yes"})
    with pytest.raises(ValueError, match=r"Qwen2Config\.rope_theta: expected a number"):
        C.load_model_config({**TINY, "rope_theta": "big"})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_heads=5), r"num_heads=5 does not divide hidden_size=32.*set head_dim"),
        (dict(num_kv_heads=3), r"num_kv_heads=3 does not divide num_heads=4"),
        (dict(head_dim=7), r"head_dim=7: RoPE .* even"),
        (dict(num_layers=0), r"num_layers=0: must be a positive integer"),
        (dict(dtype="float16"), r"dtype='float16': must be one of"),
        (dict(attention_impl="flash"), r"attention_impl='flash'"),
        (dict(rms_norm_eps=0.0), r"rms_norm_eps=0.0: must be a positive number"),
    ],
)
def test_validation_errors(change, match):
    with pytest.raises(ValueError, match=match):
        C.load_model_config({**TINY, **change})
    base = C.load_model_config(TINY)
    with pytest.raises(ValueError, match=match):  # also via the dataclass itself
        dataclasses.replace(base, **{"head_dim": None, **change})


def test_explicit_head_dim_allowed():
    cfg = C.load_model_config({**TINY, "num_heads": 6, "num_kv_heads": 3, "head_dim": 10})
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size) == (10, 60, 30)


def test_preset_and_overrides(tmp_path):
    p = _write(tmp_path, "family: qwen2\npreset: qwen2.5-0.5b\ndtype: bfloat16\n")
    cfg = C.load_model_config(p)
    assert cfg == dataclasses.replace(C.preset("qwen2.5-0.5b"), dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown preset 'qwen9'.*available presets"):
        C.preset("qwen9")
    assert {"qwen2_tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"} <= set(C.list_presets())
    assert C.load_model_config("qwen2_tiny") == C.preset("qwen2_tiny")
    with pytest.raises(FileNotFoundError, match="no such file"):
        C.load_model_config(str(tmp_path / "nope.yaml"))


def test_dict_roundtrip_and_save(tmp_path):
    cfg = C.preset("qwen2.5-7b")
    assert C.config_from_dict(C.config_to_dict(cfg)) == cfg
    C.save_model_config(cfg, tmp_path / "c.yaml")
    assert C.load_model_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", ["qwen2_tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_config_files_equal_presets(name):
    assert C.load_model_config(CONFIG_DIR / f"{name}.yaml") == C.preset(name)


def _hf_count(cfg: Qwen2Config) -> int:
    """Parameter count of HF Qwen2ForCausalLM, from the formula (independent of the model code)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = (
        d * cfg.num_heads * hd + cfg.num_heads * hd + 2 * (d * cfg.num_kv_heads * hd + cfg.num_kv_heads * hd)
    )
    attn += cfg.num_heads * hd * d
    layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.num_layers * layer + d + head


@pytest.mark.parametrize(
    "name, expected",
    [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512)],
)
def test_count_params_matches_hf(name, expected):
    cfg = C.preset(name)
    assert _hf_count(cfg) == expected
    assert C.count_params(cfg) == expected


def test_count_params_untied_tiny():
    cfg = C.load_model_config({**TINY, "num_heads": 6, "num_kv_heads": 3, "head_dim": 10})
    assert C.count_params(cfg) == _hf_count(cfg)
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert C.count_params(cfg) - C.count_params(tied) == cfg.vocab_size * cfg.hidden_size

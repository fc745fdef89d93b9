"""WuNeng models <-> a Hugging Face style directory (``config.json`` + safetensors); ``docs/wuneng_format.md``.

* ``config.json``: the Qwen2 fields exactly as :func:`wuneng_jax.convert.hf_qwen2.qwen2_config_to_hf`
  writes them, with ``model_type: "wuneng"``, ``architectures: ["WuNengForCausalLM"]`` and the hybrid
  settings as top-level keys (``fusion``, ``state_query``, ``state_value``, ``hybrid_layers`` ("all" or a
  list), ``state_heads``, ``state_head_size``, ``decay_lora_rank``, ``iclr_lora_rank``, ``gate_lora_rank``,
  ``middle_out_rank``).
* Tensors: the Qwen2 part under Hugging Face Qwen2 names and layout (:func:`hf_param_map`; linear weights
  ``[out, in]``); every new parameter of hybrid layer ``i`` as ``model.layers.{i}.self_attn.{name}`` with
  ``name`` from :func:`wuneng_jax.models.wuneng_params.hybrid_param_names` in this library's layout (no transpose;
  ``y = x @ W`` for matrices).

Saving then loading float32 (or bfloat16 saved as bfloat16) parameters round-trips bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from wuneng_jax.convert.hf_qwen2 import (
    _config_of,
    collect_state_dict,
    fill_from_state_dict,
    hf_param_map,
    qwen2_config_from_hf,
    qwen2_config_to_hf,
)
from wuneng_jax.convert.safetensors_io import read_safetensors_dir, write_safetensors_dir
from wuneng_jax.models.qwen2 import Qwen2Config
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.models.wuneng_params import hybrid_param_names

CONFIG_FILE = "config.json"
MODEL_TYPE = "wuneng"
#: The hybrid settings stored in config.json (top-level keys, WuNengConfig field names).
HYBRID_KEYS = (
    "fusion",
    "state_query",
    "state_value",
    "hybrid_layers",
    "state_heads",
    "state_head_size",
    "decay_lora_rank",
    "iclr_lora_rank",
    "gate_lora_rank",
    "middle_out_rank",
)
#: Runtime settings that config.json does not carry (pass them to ``load_wuneng`` as overrides).
RUNTIME_KEYS = ("dtype", "param_dtype", "attention_impl", "wkv_impl", "wkv_chunk_size")


def wuneng_config_to_hf(cfg: WuNengConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` mapping of ``cfg``."""
    out = qwen2_config_to_hf(cfg.to_qwen2(), torch_dtype=torch_dtype)
    out["architectures"] = ["WuNengForCausalLM"]
    out["model_type"] = MODEL_TYPE
    for key in HYBRID_KEYS:
        value = getattr(cfg, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def wuneng_config_from_hf(hf: dict[str, Any], **overrides: Any) -> WuNengConfig:
    """A :class:`WuNengConfig` from a ``config.json`` mapping written by :func:`wuneng_config_to_hf`."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"config.json: model_type={model_type!r}, expected {MODEL_TYPE!r} (for a Qwen2 checkpoint use "
            "load_qwen2, then upcycle_qwen2)"
        )
    missing = [k for k in HYBRID_KEYS if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing WuNeng key(s) {missing}")
    base = qwen2_config_from_hf({**hf, "model_type": "qwen2"})
    fields = {k: hf[k] for k in HYBRID_KEYS}
    if isinstance(fields["hybrid_layers"], list):
        fields["hybrid_layers"] = tuple(fields["hybrid_layers"])
    unknown = sorted(set(overrides) - set(RUNTIME_KEYS) - set(HYBRID_KEYS))
    if unknown:
        raise ValueError(f"load_wuneng: unknown override(s) {unknown}; allowed: {list(RUNTIME_KEYS)}")
    try:
        return WuNengConfig(
            **{
                **{f.name: getattr(base, f.name) for f in dataclasses.fields(Qwen2Config)},
                **fields,
                **overrides,
            }
        )
    except TypeError as e:
        raise ValueError(f"config.json: {e}") from None


def wuneng_param_map(cfg: WuNengConfig) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """Tensor name -> (attribute path in :class:`WuNeng`, transposed?) for every parameter of ``cfg``."""
    m = hf_param_map(cfg.to_qwen2())
    for i in cfg.hybrid_layer_ids:
        for name in hybrid_param_names(cfg):
            m[f"model.layers.{i}.self_attn.{name}"] = (("layers", i, "self_attn", name), False)
    return m


def wuneng_state_dict(model: WuNeng, cfg: WuNengConfig, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of ``model`` under their file names (numpy); ``dtype`` casts (default: keep)."""
    return collect_state_dict(model, wuneng_param_map(cfg), dtype=dtype)


def save_wuneng(
    model: WuNeng,
    cfg: WuNengConfig,
    path: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a WuNeng directory (``config.json`` + ``model.safetensors`` or shards + index).

    ``dtype``: storage dtype (default: the parameters'). Written to a temporary sibling and renamed into
    place; an existing ``path`` needs ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = wuneng_state_dict(model, cfg, dtype=dtype)
    torch_dtype = str(next(iter(tensors.values())).dtype)
    hf_cfg = wuneng_config_to_hf(cfg, torch_dtype=torch_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(hf_cfg, f, indent=2)
        write_safetensors_dir(tmp, tensors, max_shard_bytes=max_shard_bytes, metadata={"wuneng_format": "1"})
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_wuneng(path: str | Path, **overrides: Any) -> tuple[WuNengConfig, WuNeng]:
    """Load a directory written by :func:`save_wuneng` -> ``(cfg, model)``.

    ``overrides``: runtime fields not stored in ``config.json`` (``dtype``, ``param_dtype`` (default
    float32), ``attention_impl``, ``wkv_impl``, ``wkv_chunk_size``). Weights are cast to ``param_dtype``.
    """
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a WuNeng checkpoint directory)")
    cfg = _config_of(cfg_path, wuneng_config_from_hf, overrides)
    tensors = read_safetensors_dir(path)
    pmap = wuneng_param_map(cfg)
    missing = sorted(set(pmap) - set(tensors))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {missing[:12]}")
    unexpected = sorted(set(tensors) - set(pmap))
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has {len(unexpected)} tensor(s) this config.json's model does not use: "
            f"{unexpected[:12]}"
        )
    model = nnx.eval_shape(lambda: WuNeng(cfg, rngs=nnx.Rngs(0)))
    fill_from_state_dict(model, tensors, pmap, cfg.param_dtype, path)
    return cfg, model


__all__ = [
    "HYBRID_KEYS",
    "load_wuneng",
    "save_wuneng",
    "wuneng_config_from_hf",
    "wuneng_config_to_hf",
    "wuneng_param_map",
    "wuneng_state_dict",
]

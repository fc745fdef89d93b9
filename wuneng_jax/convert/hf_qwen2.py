"""Hugging Face Qwen2 checkpoints (local directory) <-> ``wuneng_jax.models.qwen2.Qwen2``.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). ``config.json`` may give ``rope_theta`` at top level (transformers 4.x)
or inside ``rope_parameters: {rope_theta, rope_type}`` (5.x). A tied checkpoint
(``tie_word_embeddings: true``) has no ``lm_head.weight``. Torch ``Linear`` weights are ``[out, in]``; this
library's kernels are ``[in, out]``, so linear weights are transposed both ways. Loading and saving
float32 (or bfloat16 saved as bfloat16) round-trips bit for bit.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from wuneng_jax.convert.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    read_safetensors_dir,
    write_safetensors_dir,
)
from wuneng_jax.files import FileFormatError, read_json
from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config

CONFIG_FILE = "config.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def qwen2_config_from_hf(hf: dict[str, Any], **overrides: Any) -> Qwen2Config:
    """``Qwen2Config`` from a Hugging Face Qwen2 ``config.json`` mapping (both rope layouts).

    ``overrides`` set fields the HF config does not carry (``dtype``, ``param_dtype``, ``attention_impl``).
    """
    model_type = hf.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ValueError(
            f"config.json: model_type={model_type!r}, but this loader reads Qwen2 ('qwen2') only"
        )
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing required key(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (Qwen2 uses 'silu')")
    if hf.get("use_sliding_window", False):
        raise ValueError(
            "config.json: use_sliding_window=true is not supported; set it to false (full attention)"
        )
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"config.json: layer_types {sorted(set(layer_types))} are not supported (full_attention only)"
        )

    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters")
    if isinstance(rope_params, dict):
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"config.json: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')"
            )
        if "rope_theta" in rope_params:
            if rope_theta is not None and float(rope_theta) != float(rope_params["rope_theta"]):
                raise ValueError(
                    f"config.json: rope_theta={rope_theta} and rope_parameters.rope_theta="
                    f"{rope_params['rope_theta']} disagree"
                )
            rope_theta = rope_params["rope_theta"]
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope_scaling={scaling} is not supported (only default RoPE)")
    if rope_theta is None:
        rope_theta = 10000.0  # transformers' Qwen2Config default

    num_heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads if kv_heads is None else kv_heads,
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    try:
        return Qwen2Config(**fields)
    except TypeError as e:
        raise ValueError(f"qwen2_config_from_hf: {e}") from None


def qwen2_config_to_hf(cfg: Qwen2Config, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """A Hugging Face ``config.json`` mapping for ``cfg`` (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def hf_param_map(cfg: Qwen2Config) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """HF tensor name -> (attribute path in ``Qwen2``, transposed?) for every parameter of ``cfg``."""
    m: dict[str, tuple[tuple[str | int, ...], bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "scale"), False),
    }
    for i in range(cfg.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        m[p + "input_layernorm.weight"] = ((*layer, "input_layernorm", "scale"), False)
        m[p + "post_attention_layernorm.weight"] = ((*layer, "post_attention_layernorm", "scale"), False)
        for n in ("q", "k", "v"):
            m[p + f"self_attn.{n}_proj.weight"] = ((*layer, "self_attn", f"{n}_proj", "kernel"), True)
            m[p + f"self_attn.{n}_proj.bias"] = ((*layer, "self_attn", f"{n}_proj", "bias"), False)
        m[p + "self_attn.o_proj.weight"] = ((*layer, "self_attn", "o_proj", "kernel"), True)
        for n in ("gate", "up", "down"):
            m[p + f"mlp.{n}_proj.weight"] = ((*layer, "mlp", f"{n}_proj", "kernel"), True)
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), True)
    return m


def _list_keys(keys: list[str], limit: int = 12) -> str:
    return str(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _config_of(cfg_path: Path, from_hf: Any, overrides: dict[str, Any]) -> Any:
    """The model config of a checkpoint's ``config.json``; a malformed or incomplete file is a
    ``ValueError`` naming the file."""
    hf = read_json(cfg_path)
    if not isinstance(hf, dict):
        raise FileFormatError(f"{cfg_path}: expected a JSON object of model settings")
    try:
        return from_hf(hf, **overrides)
    except ValueError as e:
        problem = str(e).removeprefix(CONFIG_FILE + ": ")
        raise ValueError(
            f"{cfg_path}: {problem}; copy the complete config.json from the model's source"
        ) from None


def load_qwen2(path: str | Path, **overrides: Any) -> tuple[Qwen2Config, Qwen2]:
    """Load a local Hugging Face Qwen2 checkpoint directory -> ``(cfg, model)``.

    ``overrides`` set config fields not stored in ``config.json`` (``dtype``, ``param_dtype`` (default
    float32), ``attention_impl``). Weights are cast to ``param_dtype``; under a mesh with logical rules
    they are placed with their parameters' shardings.
    """
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_FILE} (expected a Hugging Face Qwen2 checkpoint directory)"
        )
    cfg = _config_of(cfg_path, qwen2_config_from_hf, overrides)
    tensors = {k: v for k, v in read_safetensors_dir(path).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        lm, emb = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
        if emb is None or lm.shape != emb.shape or not np.array_equal(lm, emb):
            raise ValueError(
                f"{path}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                "set tie_word_embeddings to false in config.json to load an untied head"
            )
        del tensors["lm_head.weight"]
    pmap = hf_param_map(cfg)
    missing = sorted(set(pmap) - set(tensors), key=_key_order)
    if missing:
        hint = " (config.json says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise ValueError(
            f"{path}: checkpoint is missing {len(missing)} tensor(s){hint}: {_list_keys(missing)}"
        )
    unexpected = sorted(set(tensors) - set(pmap), key=_key_order)
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has {len(unexpected)} tensor(s) a Qwen2 model of this config.json does not use: "
            f"{_list_keys(unexpected)}"
        )
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    fill_from_state_dict(model, tensors, pmap, cfg.param_dtype, path)
    return cfg, model


def _key_order(key: str) -> tuple:
    parts = key.split(".")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def qwen2_state_dict(model: Qwen2, cfg: Qwen2Config, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF-layout tensors (numpy, ``[out, in]`` linear weights) of ``model``; ``dtype`` casts (default: keep)."""
    return collect_state_dict(model, hf_param_map(cfg), dtype=dtype)


def fill_from_state_dict(
    model: nnx.Module,
    tensors: dict[str, np.ndarray],
    param_map: dict[str, tuple[tuple[str | int, ...], bool]],
    param_dtype: str,
    path: str | Path,
) -> None:
    """Set every parameter of ``model`` from ``tensors`` (the inverse of :func:`collect_state_dict`),
    checking shapes; ``path`` names the checkpoint in errors. Attribute paths are per layer
    (``("layers", i, ...)``); stacked layers are filled a whole group at a time."""
    current = per_layer_params(model)
    values = {}
    for key, (attr, transposed) in param_map.items():
        var = current[tuple(attr)]
        want = tuple(var.shape[::-1]) if transposed else tuple(var.shape)
        arr = tensors[key]
        if tuple(arr.shape) != want:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(arr.shape)}, the config expects {want}"
            )
        values[tuple(attr)] = arr.T if transposed else arr
    set_per_layer_params(model, values, param_dtype, where=str(path))


def collect_state_dict(
    model: nnx.Module, param_map: dict[str, tuple[tuple[str | int, ...], bool]], *, dtype: str | None = None
) -> dict[str, np.ndarray]:
    """Tensors of ``model`` by file key: ``param_map`` maps each key to (per-layer attribute path, transposed)."""
    current = per_layer_params(model)
    out = {}
    for key, (attr, transposed) in param_map.items():
        if tuple(attr) not in current:
            raise ValueError(f"model has no parameter for {key!r} (expected at {'.'.join(map(str, attr))})")
        arr = np.asarray(jax.device_get(current[tuple(attr)]))
        if transposed:
            arr = np.ascontiguousarray(arr.T)
        if dtype is not None:
            arr = arr.astype(jax.numpy.dtype(dtype))
        out[key] = arr
    return out


def save_qwen2(
    model: Qwen2,
    cfg: Qwen2Config,
    path: str | Path,
    *,
    dtype: str | None = None,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face Qwen2 checkpoint directory (``config.json`` + safetensors).

    ``dtype``: storage dtype of the tensors (default: the parameters' dtype). ``source_dir``: a checkpoint
    directory whose ``config.json`` supplies the fields this library does not model (token ids ...) and whose
    other non-weight files (tokenizer, generation config) are copied. The directory is written to a
    temporary sibling and renamed into place; an existing ``path`` needs ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = qwen2_state_dict(model, cfg, dtype=dtype)
    torch_dtype = str(next(iter(tensors.values())).dtype)
    hf_cfg = qwen2_config_to_hf(cfg, torch_dtype=torch_dtype)
    if source_dir is not None:
        with open(Path(source_dir) / CONFIG_FILE) as f:
            hf_cfg = {**json.load(f), **hf_cfg}
        hf_cfg.pop("rope_scaling", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                is_weights = f.suffix == ".safetensors" or f.name in (INDEX_FILE, SINGLE_FILE, CONFIG_FILE)
                if f.is_file() and not is_weights and f.suffix not in (".bin", ".pt", ".pth"):
                    shutil.copy2(f, tmp / f.name)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(hf_cfg, f, indent=2)
        write_safetensors_dir(tmp, tensors, max_shard_bytes=max_shard_bytes)
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


__all__ = [
    "hf_param_map",
    "load_qwen2",
    "qwen2_config_from_hf",
    "qwen2_config_to_hf",
    "qwen2_state_dict",
    "save_qwen2",
]

"""Shared helpers of the wuneng tests: tiny configs, random (non-trivial) parameters, perturbation.

Most wuneng tests run the models eagerly (op by op): every config then reuses the same small compiled
primitives (and the jitted wkv7 kernel per shape), which is much faster than compiling one program per
fusion mode on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.models.wuneng_params import hybrid_param_names

# GQA ratio 2, head_dim 16, distinct LoRA ranks (swapped ranks would fail shape checks), T not a
# multiple of the chunk size.
QCFG = Qwen2Config(
    vocab_size=96,  # divisible by the test meshes' axes
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=96,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
)
HYBRID = dict(
    state_head_size=16,
    decay_lora_rank=8,
    iclr_lora_rank=6,
    gate_lora_rank=12,
    middle_out_rank=5,
    wkv_impl="reference",
)

#: The one input shape of the eager tests (compiled primitives are cached per shape, across test files).
B, T = 2, 19
TOK_SHAPE = (B, T)
#: Packed rows: two and three documents.
SEG = np.array([[1] * 7 + [2] * 12, [1] * 4 + [2] * 9 + [3] * 6], np.int32)

#: (fusion, state_query, state_value): every valid combination.
COMBOS: tuple[tuple[str, bool, str], ...] = tuple(
    (f, sq, sv)
    for f in ("concat", "add", "gate", "full")
    for sq, sv in ((True, "attention_value"), (False, "attention_value"), (False, "attention_output"))
)


def combo_id(c: tuple[str, bool, str]) -> str:
    return f"{c[0]}-sq{int(c[1])}-{c[2].split('_')[1]}"


def wcfg(qcfg: Qwen2Config = QCFG, **overrides: Any) -> WuNengConfig:
    base = {f.name: getattr(qcfg, f.name) for f in dataclasses.fields(Qwen2Config)}
    return WuNengConfig(**{**base, **HYBRID, **overrides})


def randomize(model: nnx.Module, seed: int, only: set[str] | None = None, scale: float = 1.0) -> None:
    """Fill parameters with random values (norm scales ~1, biases non-zero, matrices ~1/sqrt(fan-in)).

    ``only``: restrict to parameters whose name (last path entry) is in this set; those get
    ``value + scale * noise`` (so zero-initialised ones become random) instead of fresh values.
    """
    rng = np.random.default_rng(seed)
    values = {}
    for path, cur in per_layer_params(model).items():  # per layer: fan-in of the layer's own matrices
        name = path[-1]
        shape = cur.shape
        if only is not None:
            if name not in only:
                continue
            fan = shape[-2] if len(shape) >= 2 else 1
            noise = rng.standard_normal(shape) / np.sqrt(fan)
            values[path] = (np.asarray(cur, np.float64) + scale * noise).astype(cur.dtype)
            continue
        if name == "scale":
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "bias":
            val = 0.3 * rng.standard_normal(shape)
        elif name == "embedding":
            val = rng.standard_normal(shape)
        else:
            val = rng.standard_normal(shape) / np.sqrt(shape[0])
        values[path] = val.astype(np.float32)
    set_per_layer_params(model, values)


def random_model(cls: type, cfg: Any, seed: int) -> nnx.Module:
    """``cls(cfg)`` with every parameter random; built abstractly then filled (no eager init ops)."""
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed)))
    randomize(model, seed)
    return model


def random_qwen2(seed: int = 0, qcfg: Qwen2Config = QCFG) -> Qwen2:
    return random_model(Qwen2, qcfg, seed)


def perturb_new(model: WuNeng, cfg: WuNengConfig, seed: int, scale: float = 0.5) -> None:
    """Random values added to every new (hybrid) parameter, so zero-initialised branches are live."""
    randomize(model, seed, only=set(hybrid_param_names(cfg)), scale=scale)


def new_params(model: WuNeng, cfg: WuNengConfig) -> dict[str, Any]:
    """``{"layer.name": value}`` for every hybrid parameter of ``model``."""
    names = set(hybrid_param_names(cfg))
    out = {}
    for path, value in per_layer_params(model).items():
        if path[-1] in names and "self_attn" in path:
            out[".".join(map(str, path))] = value
    return out


def tokens(seed: int, b: int, t: int, vocab: int = QCFG.vocab_size) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


def maxabs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

"""Upcycling: a ``qwen2`` model -> a ``wuneng`` model that computes exactly the same logits at step 0.

The recipe of ``ARCHITECTURE.md`` §2: embeddings, norms, ``W_Q, W_K, W_V, W_O``, biases, MLP and head are
copied; every hybrid layer's new parameters come from :func:`wuneng_jax.models.wuneng_params.init_hybrid_params`
(``W_R̂`` = group-mean of the query projection, ``W_κ`` = the key projection, RWKV-7 LoRAs / decay biases /
lerps from RWKV-7's init recipe, every fusion / λ parameter at the value that makes the layer equal to the
plain attention layer). Nothing of the size of the base model is allocated twice: the WuNeng model is
built abstractly and filled in.

Usage::

    from wuneng_jax.convert.hf_qwen2 import load_qwen2
    from wuneng_jax.convert.upcycle import upcycle_qwen2

    qcfg, qwen = load_qwen2("path/to/Qwen2.5-1.5B")
    cfg, model = upcycle_qwen2(qwen, qcfg, fusion="full", state_query=True)
    logits = model(tokens)            # == qwen(tokens) at init
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_config import WuNengConfig, wuneng_config_from_qwen2
from wuneng_jax.models.wuneng_params import init_hybrid_params


def upcycle_qwen2(
    qwen2_model: Qwen2, qwen2_cfg: Qwen2Config, *, seed: int = 0, **wuneng_overrides: Any
) -> tuple[WuNengConfig, WuNeng]:
    """Upcycle ``qwen2_model`` (config ``qwen2_cfg``) into a :class:`WuNeng` model.

    Args:
      qwen2_model: a :class:`Qwen2` (concrete parameters).
      qwen2_cfg: its config.
      seed: PRNG seed of the random parts of the recipe (orthogonal LoRA second factors, ``W_Om``'s first
        factor); layer ``i`` uses ``fold_in(PRNGKey(seed), i)``.
      **wuneng_overrides: :class:`WuNengConfig` fields (``fusion``, ``state_query``, ``state_value``,
        ``hybrid_layers``, ``state_head_size``, LoRA ranks, ``dtype`` ...).
    Returns:
      ``(cfg, model)``; parameters are cast to ``cfg.param_dtype`` and, under a mesh with logical rules,
      placed with their shardings.
    """
    if type(qwen2_model) is not Qwen2:  # a WuNeng is a Qwen2 subclass, not a source
        raise ValueError(f"upcycle_qwen2: expected a Qwen2 model, got {type(qwen2_model).__name__}")
    if not isinstance(qwen2_cfg, Qwen2Config) or isinstance(qwen2_cfg, WuNengConfig):
        raise ValueError(f"upcycle_qwen2: expected a Qwen2Config, got {type(qwen2_cfg).__name__}")
    if qwen2_model.cfg != qwen2_cfg:
        raise ValueError(
            "upcycle_qwen2: qwen2_cfg differs from the model's own config (qwen2_model.cfg); pass the config "
            "the model was built or loaded with"
        )
    cfg = wuneng_config_from_qwen2(qwen2_cfg, **wuneng_overrides)
    model = nnx.eval_shape(lambda: WuNeng(cfg, rngs=nnx.Rngs(seed)))

    src = per_layer_params(qwen2_model)
    dst = per_layer_params(model)
    values = {}
    for path, value in src.items():
        name = ".".join(map(str, path))
        if path not in dst:
            raise ValueError(f"upcycle_qwen2: the WuNeng model has no parameter at {name}")
        if tuple(value.shape) != tuple(dst[path].shape):
            raise ValueError(
                f"upcycle_qwen2: {name} has shape {tuple(value.shape)}, the WuNeng config "
                f"expects {tuple(dst[path].shape)}"
            )
        values[path] = value

    base_key = jax.random.PRNGKey(seed)
    for i in cfg.hybrid_layer_ids:
        attn = ("layers", i, "self_attn")
        init = init_hybrid_params(
            cfg,
            i,
            q_kernel=src[(*attn, "q_proj", "kernel")],
            k_kernel=src[(*attn, "k_proj", "kernel")],
            key=jax.random.fold_in(base_key, i),
        )
        values |= {(*attn, name): value for name, (value, _) in init.items()}
    set_per_layer_params(model, values, cfg.param_dtype, where="upcycle_qwen2")

    leftover = [
        ".".join(map(str, p))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if isinstance(v[...], jax.ShapeDtypeStruct)
    ]
    if leftover:  # a parameter the recipe does not cover (a bug, not a user error)
        raise RuntimeError(f"upcycle_qwen2: parameters left uninitialised: {leftover}")
    return cfg, model


__all__ = ["upcycle_qwen2"]

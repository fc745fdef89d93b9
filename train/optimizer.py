"""AdamW with global-norm clipping, learning-rate schedules and a weight-decay mask.

The optimizer is the optax chain ``clip_by_global_norm -> scale_by_adam -> add_decayed_weights(mask)
-> scale_by_learning_rate(schedule)``, i.e. decoupled AdamW (decay multiplied by the learning rate,
as ``optax.adamw``) on float32 master parameters; its moments are float32 and inherit the
parameters' shardings (they are ``tree_map``s of the parameter ``State``, metadata included).

Weight decay applies to *large matrices* only: a parameter decays when its logical axis names
(``wuneng_jax.sharding``) contain at least two "width" axes (embed, mlp, vocab, heads, kv_heads,
state_heads) and no ``norm``/``lora`` axis. So norms, biases, scalars and vectors never decay, nor do
per-head vectors like RWKV-7's ``r_k`` ``[H, N]`` or WuNeng's ``λ_h``/``β_h``, nor RWKV-7's LoRA
factors (BlinkDL's recipe decays only the big ``*.weight`` matrices). Parameters without logical
names fall back to "at least two non-trivial dimensions".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.config import OptimizerConfig
from wuneng_jax import sharding as S

Schedule = Callable[[jax.Array | int], jax.Array]

MATRIX_AXES = frozenset({S.EMBED, S.MLP, S.VOCAB, S.HEADS, S.KV_HEADS, S.STATE_HEADS})
NEVER_DECAY_AXES = frozenset({S.NORM, S.LORA})


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> Schedule:
    """Learning rate as a function of the update count (0-based).

    Warmup is linear from ``lr / warmup_steps`` (update 0) to ``lr`` (update ``warmup_steps - 1``),
    so the first update is not wasted. Then ``cosine`` decays to ``min_lr_ratio * lr`` at the last
    update; ``wsd`` holds ``lr`` and decays linearly over the last ``decay_fraction`` of the updates
    to ``min_lr_ratio * lr``; ``constant`` holds ``lr``.
    """
    peak = float(cfg.lr)
    floor = peak * float(cfg.min_lr_ratio)
    warmup = int(cfg.warmup_steps)
    total = max(int(total_steps), 1)

    def warm(count: jax.Array) -> jax.Array:
        return peak * (count + 1.0) / max(warmup, 1)

    if cfg.schedule == "constant":

        def after(count: jax.Array) -> jax.Array:
            return jnp.full_like(count, peak)

    elif cfg.schedule == "cosine":
        span = max(total - warmup - 1, 1)

        def after(count: jax.Array) -> jax.Array:
            progress = jnp.clip((count - warmup) / span, 0.0, 1.0)
            return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    elif cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        decay_start = max(total - decay_steps, warmup)

        def after(count: jax.Array) -> jax.Array:
            progress = jnp.clip((count - decay_start + 1.0) / decay_steps, 0.0, 1.0)
            return jnp.where(count < decay_start, peak, peak + (floor - peak) * progress)

    else:
        raise ValueError(f"optimizer.schedule: unknown schedule {cfg.schedule!r}")

    def schedule(count: jax.Array | int) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        return jnp.where(count < warmup, warm(count), after(count))

    return schedule


def _logical_names(var: Any) -> tuple[str | None, ...] | None:
    if not isinstance(var, nnx.Variable):
        return None
    meta = var.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(p for p in parts if p != "value")


def should_decay(
    path: str, shape: tuple[int, ...], names: tuple[str | None, ...] | None, cfg: OptimizerConfig
) -> bool:
    """The weight-decay rule for one parameter (see the module docstring)."""
    if any(re.search(p, path) for p in cfg.no_decay_patterns):
        return False
    if names is not None:
        named = set(names)
        if named & NEVER_DECAY_AXES:
            return False
        if not cfg.decay_embeddings and S.VOCAB in named:
            return False
        return sum(n in MATRIX_AXES for n in names) >= 2
    return sum(d > 1 for d in shape) >= 2


def decay_mask(params: Any, cfg: OptimizerConfig) -> Any:
    """Boolean tree like ``params`` (an ``nnx.State`` of ``Param``s or a plain tree): True = decay."""

    def leaf(path: tuple[Any, ...], var: Any) -> Any:
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        decay = should_decay(_path_str(path), tuple(jnp.shape(value)), _logical_names(var), cfg)
        return var.replace(decay) if isinstance(var, nnx.Variable) else decay

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
    """The AdamW chain and its schedule (the schedule is also used to report the learning rate)."""
    schedule = make_schedule(cfg, total_steps)
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg)))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


def update_count(opt_state: Any) -> jax.Array:
    """Number of updates applied so far (the schedule's counter; skipped steps do not count)."""
    found = [
        s.count
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByScheduleState in the optimizer state, found {len(found)}")
    return found[0]

"""Checkpoints written before the layers were stacked: detected from their metadata and restored by
restacking every per-layer array of the saved state (parameters and optimizer moments alike).

Run directories written before the scanned layer stack (:mod:`wuneng_jax.layers.stack`) hold one array
per layer (``layers/3/self_attn/q_proj/kernel``); the model now holds one ``[n, ...]`` array per stacked
group (``layers/blocks/<g>/<j>/self_attn/q_proj/kernel``). :func:`is_per_layer` tells the two apart from
the checkpoint's ``param_shapes``; :func:`restore_per_layer` reads the old arrays (no target tree: the
saved structure) and fills the current state layout, each leaf stacked from its layers and placed with
its sharding. The next save writes the stacked layout, so a run converts itself by resuming once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.layers.stack import LayerStack, per_layer_params

_PER_LAYER = re.compile(r"^(layers|blocks)/\d+/")
_STACKED = re.compile(r"^(layers|blocks)/blocks/\d+/\d+/")


def is_per_layer(saved_shapes: Mapping[str, Any], expected_shapes: Mapping[str, Any]) -> bool:
    """True when the checkpoint's parameter names are per layer and the model's are stacked."""
    return any(_PER_LAYER.match(k) for k in saved_shapes) and any(_STACKED.match(k) for k in expected_shapes)


def abstract_model(layout: Any) -> nnx.Module:
    """The model of ``layout`` with abstract (shape-only) variables."""
    return nnx.merge(layout.graphdef, layout.abstract.params, layout.abstract.rest)


def per_layer_shapes(model: nnx.Module) -> dict[str, list[int]]:
    """``param_shapes`` of ``model`` as a checkpoint written before stacking would name them."""
    return {"/".join(map(str, p)) + "/value": list(v.shape) for p, v in per_layer_params(model).items()}


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _normalised(path: tuple) -> tuple[str, ...]:
    return tuple(_key(e) for e in path)


def _sources(path: tuple[str, ...], stacks: Mapping[str, LayerStack]) -> list[tuple[str, ...]] | None:
    """The per-layer paths a stacked leaf path is made of (None for a leaf outside the stacks)."""
    for k in range(len(path) - 3):
        stack = stacks.get(path[k])
        if stack is not None and path[k + 1] == "blocks" and path[k + 2].isdigit() and path[k + 3].isdigit():
            grp = stack.groups[int(path[k + 2])]
            return [(*path[:k], path[k], str(i), *path[k + 4 :]) for i in grp.ids(int(path[k + 3]))]
    return None


def restore_per_layer(
    read_saved: Callable[[], Any], layout: Any, model: nnx.Module, where: str
) -> dict[str, Any]:
    """The state dict (``TrainState.as_dict`` layout of ``layout``) from a per-layer checkpoint.

    ``read_saved()`` restores the saved state item without a target (its own structure, host arrays).
    Raises ValueError naming the first array the checkpoint lacks.
    """
    saved_leaves, _ = jax.tree_util.tree_flatten_with_path(read_saved())
    saved = {_normalised(p): v for p, v in saved_leaves}
    stacks = {name: v for name, v in vars(model).items() if isinstance(v, LayerStack)}
    target = layout.abstract.as_dict()
    shardings = jax.tree_util.tree_leaves(layout.shardings.as_dict())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for (path, leaf), sharding in zip(leaves, shardings, strict=True):
        norm = _normalised(path)
        sources = _sources(norm, stacks) or [norm]
        missing = [s for s in sources if s not in saved]
        if missing:
            raise ValueError(f"{where}: the checkpoint has no array at {'/'.join(missing[0])}")
        parts = [np.asarray(saved[s]) for s in sources]
        value = np.stack(parts) if len(sources) > 1 or sources[0] != norm else parts[0]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{where}: {'/'.join(norm)} restacks to shape {tuple(value.shape)}, the model expects "
                f"{tuple(leaf.shape)}"
            )
        out.append(jax.device_put(jnp.asarray(value, leaf.dtype), sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["abstract_model", "is_per_layer", "per_layer_shapes", "restore_per_layer"]

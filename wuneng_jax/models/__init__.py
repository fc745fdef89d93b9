"""Model families and the dispatch that builds one from its config.

``build_model(cfg, *, rngs) -> nnx.Module`` with the shared interface::

    logits = model(tokens, segment_ids=None, positions=None)   # int32 [B,T] -> float32 [B,T,V]

The families register themselves in :mod:`wuneng_jax.models.registry`; ``wuneng_jax.config`` (YAML,
presets) builds on this package, never the other way round.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from wuneng_jax.models.registry import family_of, get_family


def build_model(cfg: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model of ``cfg``'s family (``Qwen2Config`` -> ``Qwen2`` ...)."""
    # A config instance's module has been imported, so its family is registered.
    fam = get_family(family_of(cfg))
    return fam.model_cls(cfg, rngs=rngs)


def abstract_model(cfg: Any) -> nnx.Module:
    """``build_model(cfg)`` with ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: Any) -> int:
    """Total number of ``nnx.Param`` elements of ``build_model(cfg)``, from shapes only."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)))

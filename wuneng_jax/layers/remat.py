"""Per-layer rematerialisation: the named ``jax.checkpoint`` policies and a wrapper for layer calls.

``remat`` config values (model configs and the training config's ``remat``):

- ``none``: keep every activation for the backward pass;
- ``full``: keep only each layer's input, recompute the layer in the backward pass (least memory);
- ``dots_saveable``: keep the outputs of matmuls, recompute the elementwise work;
- ``dots_with_no_batch_dims_saveable``: keep the outputs of matmuls without batch dimensions (the
  weight projections), recompute attention scores and the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

F = TypeVar("F", bound=Callable[..., Any])

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(owner: str, remat: str) -> None:
    """ValueError naming ``owner`` (e.g. ``Qwen2Config.remat``) unless ``remat`` is a known policy."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{owner}={remat!r} is unknown; choose one of {list(REMAT_POLICIES)}")


def remat_layer(fn: F, remat: str) -> F:
    """``fn(layer_module, *args)`` rematerialised with the named policy (``fn`` itself for ``none``).

    The layer's parameters are arguments of the checkpointed function, so the backward pass stores
    only the layer's inputs (and what the policy saves) and recomputes the rest.
    """
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[remat], prevent_cse=True)

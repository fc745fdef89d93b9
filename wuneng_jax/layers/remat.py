"""Per-layer rematerialisation: the named ``jax.checkpoint`` policies (applied to each layer call inside
the scanned layer stack, :mod:`wuneng_jax.layers.stack`).

``remat`` config values (model configs and the training config's ``remat``):

- ``none``: keep every activation for the backward pass;
- ``full``: keep only each layer's input, recompute the layer in the backward pass (least memory);
- ``dots_saveable``: keep the outputs of matmuls, recompute the elementwise work;
- ``dots_with_no_batch_dims_saveable``: keep the outputs of matmuls without batch dimensions (the
  weight projections), recompute attention scores and the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

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

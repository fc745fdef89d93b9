"""Packed sequences: segment ids, positions within documents and document starts.

A packed row holds several documents; ``segment_ids`` int ``[B,T]`` gives each token's document id
within its row (>= 1), 0 marks padding. A new document starts wherever the id changes (and at t = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """bool ``[B,T]``: True at the first token of each document (t = 0 or the id differs from t-1).

    This is the ``reset`` mask of recurrent layers: the state entering such a token is zero.
    """
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """int32 ``[B,T]``: each token's position within its document (0 at each document start)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    start = jax.lax.cummax(jnp.where(document_starts(segment_ids), idx, 0), axis=1)
    return idx - start


def resolve_segments(
    tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Validated ``(segment_ids, positions)`` int32 ``[B,T]`` for ``tokens`` int ``[B,T]``.

    Missing segment ids mean one document per row (all ones); missing positions are derived from the
    segment ids (``arange`` when both are missing).
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [B,T]; got {tokens.dtype} {tokens.shape}")
    for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
        if arr is not None and (arr.shape != tokens.shape or not jnp.issubdtype(arr.dtype, jnp.integer)):
            raise ValueError(
                f"{name} must be an integer array with the tokens' shape {tokens.shape}; got {arr.dtype} {arr.shape}"
            )
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    positions = positions_from_segments(segment_ids) if positions is None else positions.astype(jnp.int32)
    return segment_ids, positions

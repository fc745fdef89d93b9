"""Rotary position embedding, rotate-half layout (Hugging Face Llama/Qwen2 convention).

``inv_freq_j = theta^(-2j/D)`` for ``j < D/2``; the table for position ``p`` is
``cos/sin(p * [inv_freq, inv_freq])`` (the two halves concatenated), and
``rope(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = concat(-x[D/2:], x[:D/2])``.
This is NOT the interleaved-pairs layout.

Tables are built in ``promote_types(dtype, float32)`` (float32 for float32/bfloat16 models, as Hugging
Face does; float64 in x64 reference runs) and cast to the activation dtype before they multiply it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RopeTables(NamedTuple):
    """cos, sin ``[B,T,D]`` (float32, or float64 in x64 reference runs)."""

    cos: jax.Array
    sin: jax.Array


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(-2j/D)`` for ``j < D/2``, float64 ``[D/2]`` (a static constant)."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype | str = jnp.float32
) -> RopeTables:
    """cos/sin tables for integer ``positions`` ``[B,T]`` -> ``RopeTables`` of ``[B,T,head_dim]``.

    The tables are computed in ``promote_types(dtype, float32)``.
    """
    table_dtype = jnp.promote_types(jnp.dtype(dtype), jnp.float32)
    inv = jnp.asarray(rope_inv_freq(head_dim, theta), table_dtype)
    freqs = positions.astype(table_dtype)[..., None] * inv  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B,T,D]
    return RopeTables(jnp.cos(emb), jnp.sin(emb))


def rotate_half(x: jax.Array) -> jax.Array:
    """``concat(-x[..., D/2:], x[..., :D/2])``."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, tables: RopeTables) -> jax.Array:
    """Rotate ``x`` ``[B,T,H,D]`` by ``tables`` (``[B,T,D]``); computed and returned in ``x.dtype``."""
    cos = tables.cos.astype(x.dtype)[:, :, None, :]
    sin = tables.sin.astype(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin

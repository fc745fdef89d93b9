"""Token embedding ``[V, d]`` (VOCAB, EMBED) and the logits head (tied or untied)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.params import init_param
from wuneng_jax.sharding import EMBED, VOCAB


def embed_lookup(table: jax.Array, tokens: jax.Array, *, dtype=None) -> jax.Array:
    """table ``[V,d]``, tokens int ``[B,T]`` -> ``[B,T,d]`` in ``dtype`` (default table's).

    Ids outside ``[0, V)`` (negative ones included) give NaN rows, so a bad id shows up in the loss
    instead of silently reading another token's row (a jitted model cannot raise on values).
    """
    tokens = jnp.where(tokens < 0, table.shape[0], tokens)
    out = jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)
    return out if dtype is None else out.astype(dtype)


def logits_from_hidden(x: jax.Array, weight: jax.Array, *, transposed: bool) -> jax.Array:
    """Float32 (or float64) logits ``[B,T,V]`` from ``x`` ``[B,T,d]``.

    ``weight`` is ``[V,d]`` when ``transposed`` (a tied embedding table) or ``[d,V]`` (an lm_head kernel).
    The product runs in ``x.dtype`` with float32 accumulation and a float32 (or wider) result.
    """
    out_dtype = jnp.promote_types(x.dtype, jnp.float32)
    w = weight.astype(x.dtype)
    spec = "btd,vd->btv" if transposed else "btd,dv->btv"
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


class Embed(nnx.Module):
    """``embedding [V, d]`` with logical names ``(VOCAB, EMBED)``."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        dtype: str | jnp.dtype = jnp.float32,
        param_dtype: str | jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        self.embedding = init_param(
            rngs, nnx.initializers.normal(init_std), (vocab_size, dim), (VOCAB, EMBED), param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return embed_lookup(self.embedding[...], tokens, dtype=self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied head: ``x [B,T,d] @ embeddingᵀ`` -> float32 logits ``[B,T,V]``."""
        return logits_from_hidden(x, self.embedding[...], transposed=True)

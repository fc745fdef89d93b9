"""A small sampler for the end of a training run (the demo prints one sample).

It re-runs the full forward pass over a fixed ``[1, window]`` buffer per new token (one compiled
program, no cache), which is fine for a tiny model and a few hundred tokens. Real inference (KV cache
and recurrent state, prefill + decode) lives with the inference tools, not here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(
    graphdef: Any,
    params: Any,
    rest: Any,
    prompt: list[int],
    num_tokens: int,
    *,
    window: int,
    temperature: float = 0.8,
    seed: int = 0,
    pad_id: int = 0,
    vocab_limit: int | None = None,
) -> list[int]:
    """Continue ``prompt`` by ``num_tokens`` ids (temperature sampling; 0 = greedy).

    ``vocab_limit``: only ids below it are sampled (the model's vocabulary may be padded beyond the
    tokenizer's)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")

    @jax.jit
    def next_token(params, rest, buf, length, key):
        model = nnx.merge(graphdef, params, rest)
        logits = model(buf)[0, length - 1].astype(jnp.float32)
        if vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if temperature > 0:
            return jax.random.categorical(key, logits / temperature)
        return jnp.argmax(logits)

    ids = list(prompt) or [pad_id]
    key = jax.random.PRNGKey(seed)
    out: list[int] = []
    for _ in range(num_tokens):
        ctx = ids[-window:]
        buf = np.full((1, window), pad_id, np.int32)
        buf[0, : len(ctx)] = ctx
        key, sub = jax.random.split(key)
        tok = int(next_token(params, rest, jnp.asarray(buf), len(ctx), sub))
        ids.append(tok)
        out.append(tok)
    return out

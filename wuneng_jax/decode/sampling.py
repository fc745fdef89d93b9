"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded per row and step.

Order (as Hugging Face ``generate``): logits / temperature -> keep the top-k -> keep the smallest set
of tokens whose probability reaches top-p -> sample. ``temperature == 0`` is greedy (argmax).

Randomness is a pure function of ``(seed, step, row)``: row ``b`` at step ``i`` draws with
``fold_in(fold_in(PRNGKey(seed), i), b)``, so a run is reproducible for the same seed and batch layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature-scaled logits ``[..., V]`` with the tokens outside top-k / top-p set to ``-inf``."""
    x = logits.astype(jnp.float32) / jnp.float32(cfg.temperature if cfg.temperature > 0 else 1.0)
    neg = jnp.float32(-jnp.inf)
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if cfg.top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
        keep = before < cfg.top_p  # always keeps the best token
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        x = jnp.where(x < threshold, neg, x)
    return x


def row_keys(key: jax.Array, step: jax.Array | int, batch_size: int) -> jax.Array:
    """Per-row keys ``[B]`` of step ``step``: ``fold_in(fold_in(key, step), row)``."""
    k = jax.random.fold_in(key, step)
    return jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(batch_size))


def sample(
    logits: jax.Array,
    cfg: SamplingConfig,
    key: jax.Array,
    step: jax.Array | int,
    *,
    vocab_limit: int | None = None,
) -> jax.Array:
    """Next tokens int32 ``[B]`` from logits ``[B,V]``.

    ``vocab_limit``: only ids below it can be drawn (a model's vocabulary may be padded beyond the
    tokenizer's).
    """
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, cfg)
    keys = row_keys(key, step, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

"""Log-likelihood scoring of continuations: the core of perplexity, multiple choice and lm-eval.

A request is ``(context ids, continuation ids)``; its score is ``Σ log p(continuation_i | prefix)`` over
the continuation tokens, plus whether greedy decoding would produce the continuation (every
continuation token is the argmax). Requests are packed into fixed-shape batches::

    row = (context + continuation)[-(max_length + 1):]   (context truncated on the left)
    tokens  = row[:-1]   targets = row[1:]   right-padded (segment id 0) to a bucketed length

so one compiled program serves every batch of the same length bucket. Batches are formed from
requests sorted by length (longest first) and the results returned in the original order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.decode.state import bucket_length
from wuneng_jax.layers import vocab_tiling


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log p(targets)`` float32 ``[B,T]`` from logits ``[B,T,V]`` (log-softmax in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def score_tokens(
    model: nnx.Module,
    tokens: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    vocab_tile: int = vocab_tiling.DEFAULT_VOCAB_TILE,
) -> tuple[jax.Array, jax.Array]:
    """Summed ``log p(targets)`` over ``mask`` ``[B]`` float32, and ``is_greedy`` bool ``[B]`` (every
    masked target is the argmax). All inputs ``[B,T]``; ``mask`` selects the scored positions.
    ``vocab_tile``: ids per vocabulary tile (``wuneng_jax.layers.vocab_tiling``; 0 = full logits)."""
    mask = mask.astype(jnp.bool_)
    if vocab_tiling.tiles_for(model, vocab_tile):
        x, weight, transposed = vocab_tiling.model_head(model, tokens, segment_ids=segment_ids)
        st = vocab_tiling.greedy_stats(x, weight, targets, transposed=transposed, tile=vocab_tile)
        lp, argmax = (st.target - st.lse).astype(jnp.float32), st.argmax
    else:
        logits = model(tokens, segment_ids=segment_ids)
        lp, argmax = token_logprobs(logits, targets), jnp.argmax(logits, axis=-1)
    total = jnp.sum(jnp.where(mask, lp, 0.0), axis=-1)
    greedy = jnp.all(jnp.where(mask, argmax == targets, True), axis=-1)
    return total, greedy


class Score(NamedTuple):
    logprob: float
    is_greedy: bool


class LoglikelihoodScorer:
    """Scores ``(context, continuation)`` token-id pairs with ``model`` in jitted, fixed-shape batches.

    Args:
      model: any ``wuneng_jax`` model (``model(tokens, segment_ids=...)`` -> logits).
      batch_size: rows per compiled batch (the last batch is filled with empty rows).
      max_length: longest model input; longer requests keep the end of their context (default: the
        config's ``max_position_embeddings``, or 2048).
      length_bucket: input lengths are rounded up to a multiple of it (fewer compiles).
      vocab_tile: ids per vocabulary tile of the scoring (``wuneng_jax.layers.vocab_tiling``; 0 = full
        logits).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        length_bucket: int = 64,
        vocab_tile: int = vocab_tiling.DEFAULT_VOCAB_TILE,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or getattr(model.cfg, "max_position_embeddings", 2048))
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1")
        self.length_bucket = int(length_bucket)
        self.vocab_size = int(model.cfg.vocab_size)
        self.graphdef, self.params = nnx.split(model)

        def run(params, tokens, segment_ids, targets, mask):
            model = nnx.merge(self.graphdef, params)
            return score_tokens(model, tokens, segment_ids, targets, mask, vocab_tile)

        self._run = jax.jit(run)

    def _row(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[np.ndarray, int]:
        if len(continuation) == 0:
            raise ValueError("a continuation is empty: there is nothing to score")
        if len(context) == 0:
            raise ValueError(
                "a context is empty: the first continuation token has nothing to condition on; start the "
                "context with a BOS/EOS token"
            )
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}"
            )
        row = np.asarray([*context, *continuation], np.int64)[-(self.max_length + 1) :]
        if row.min() < 0 or row.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
        return row, len(continuation)

    def score(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        progress: bool = False,
        desc: str = "scoring",
    ) -> list[Score]:
        """``[(logprob, is_greedy)]`` for each ``(context, continuation)`` request, in order."""
        rows = [self._row(c, x) for c, x in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[Score | None] = [None] * len(rows)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in _progress(batches, progress, desc):
            longest = max(len(rows[i][0]) - 1 for i in idx)  # <= max_length (rows are truncated)
            t = min(bucket_length(longest, self.length_bucket), self.max_length)
            arrays = [np.zeros((self.batch_size, t), np.int32) for _ in range(4)]
            tokens, seg, targets, mask = arrays
            for r, i in enumerate(idx):
                row, n_cont = rows[i]
                n = len(row) - 1
                tokens[r, :n], targets[r, :n], seg[r, :n] = row[:-1], row[1:], 1
                mask[r, n - n_cont : n] = 1
            total, greedy = jax.device_get(self._run(self.params, tokens, seg, targets, mask))
            for r, i in enumerate(idx):
                out[i] = Score(float(total[r]), bool(greedy[r]))
        return out  # type: ignore[return-value]

    def rolling(self, tokens: Sequence[int], prefix_token: int) -> float:
        """Total ``log p(tokens)`` of a whole sequence conditioned on ``prefix_token`` (lm-eval's
        ``loglikelihood_rolling``): disjoint prediction windows of up to ``max_length`` tokens, each with
        as much preceding context as fits."""
        return sum(s.logprob for s in self.score(rolling_requests(tokens, prefix_token, self.max_length)))


def rolling_requests(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` windows covering ``tokens``: every token is predicted exactly once;
    the first window is conditioned on ``prefix_token``, later ones on the tokens before them (the
    scorer keeps the last ``max_length + 1 - len(window)`` context tokens, so each input is as long as fits)."""
    tokens = [int(t) for t in tokens]
    out = []
    for start in range(0, len(tokens), max_length):
        out.append(([prefix_token, *tokens[:start]], tokens[start : start + max_length]))
    return out


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")

"""Exact accuracy at the scored positions of held-out batches (the research suite's metric).

``accuracy_sums(logits, targets, loss_mask)`` is a pure function returning integer counts (and the
summed cross-entropy) for one batch; sums over batches then :func:`finalize` give the metrics:

- ``accuracy``: correct / scored positions, "correct" = ``argmax(logits) == target`` exactly
  (ties go to the lowest token id, as ``argmax`` does);
- ``last_accuracy``: the same at the last scored position of each row only (for state tracking:
  the product of the whole sequence);
- ``seq_accuracy``: rows whose every scored position is correct / rows with a scored position;
- ``ce``: mean cross-entropy over the scored positions (nats);
- with ``state_from`` (the combined ``recall_state`` task): ``state_accuracy`` over the scored positions whose
  target id is ``>= state_from`` (running products), ``recall_accuracy`` over the others (recalled values),
  ``balanced_accuracy`` = their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.train_step import cross_entropy

COUNT_KEYS = (
    "correct",
    "scored",
    "rows_correct",
    "rows",
    "last_correct",
    "ce_sum",
    "state_correct",
    "state_scored",
)


def accuracy_sums(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, state_from: int | None = None
) -> dict[str, jax.Array]:
    """Counts of one batch. logits float ``[B,T,V]``; targets int ``[B,T]``; loss_mask ``[B,T]`` (> 0 = scored);
    ``state_from``: targets with ids at or above it are counted apart (``state_*``), None: none are."""
    mask = loss_mask > 0
    hit = (jnp.argmax(logits, axis=-1) == targets) & mask
    n_scored = jnp.sum(mask, axis=1)
    n_hit = jnp.sum(hit, axis=1)
    has = n_scored > 0
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # index of the last scored position of each row
    last_hit = jnp.take_along_axis(hit, last[:, None], axis=1)[:, 0] & has
    ce_sum, _ = cross_entropy(logits, targets, mask.astype(jnp.float32))
    state = mask & (targets >= state_from) if state_from is not None else jnp.zeros_like(mask)
    return {
        "state_correct": jnp.sum(hit & state),
        "state_scored": jnp.sum(state),
        "correct": jnp.sum(n_hit),
        "scored": jnp.sum(n_scored),
        "rows_correct": jnp.sum(has & (n_hit == n_scored)),
        "rows": jnp.sum(has),
        "last_correct": jnp.sum(last_hit),
        "ce_sum": ce_sum,
    }


def make_accuracy_step(
    graphdef: Any, state_from: int | None = None
) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
    """``step(state, batch) -> accuracy_sums`` of the model ``nnx.merge(graphdef, state.params, state.rest)``;
    jit it with ``train.train_step.jit_eval_step`` (replicated outputs)."""

    def step(state: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state.params, state.rest)
        logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        return accuracy_sums(logits, batch["targets"], batch["loss_mask"], state_from)

    return step


def total(counts: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Sum per-batch counts (device or numpy values) exactly: integers as Python ints, CE as float."""
    out: dict[str, float] = {k: 0 for k in COUNT_KEYS}
    for c in jax.device_get(list(counts)):
        for k in COUNT_KEYS:
            if k not in c:
                continue
            v = np.asarray(c[k])
            out[k] += float(v) if k == "ce_sum" else int(v)
    return out


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Metrics from summed counts (see the module docstring); NaN where nothing was scored."""

    def ratio(a: float, b: float) -> float:
        return float(a) / float(b) if b else float("nan")

    out = {
        "accuracy": ratio(sums["correct"], sums["scored"]),
        "last_accuracy": ratio(sums["last_correct"], sums["rows"]),
        "seq_accuracy": ratio(sums["rows_correct"], sums["rows"]),
        "ce": ratio(sums["ce_sum"], sums["scored"]),
        "scored": int(sums["scored"]),
        "rows": int(sums["rows"]),
    }
    n_state, hit_state = sums.get("state_scored", 0), sums.get("state_correct", 0)
    if n_state:
        out["state_accuracy"] = ratio(hit_state, n_state)
        out["recall_accuracy"] = ratio(sums["correct"] - hit_state, sums["scored"] - n_state)
        out["balanced_accuracy"] = (out["state_accuracy"] + out["recall_accuracy"]) / 2
    return out

"""Multiple-choice scoring (MMLU / HellaSwag style): score every continuation, pick the most likely.

For a question with context ``c`` and choices ``x_1..x_k`` the model scores ``ll_j = log p(x_j | c)``
(:class:`~wuneng_jax.eval.loglikelihood.LoglikelihoodScorer`). Predictions, as lm-eval defines them:

* ``acc``: ``argmax_j ll_j``;
* ``acc_norm``: ``argmax_j ll_j / len_j``, with ``len_j`` the choice's length (lm-eval uses its length in
  characters; token counts are used when no lengths are given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from wuneng_jax.eval.loglikelihood import LoglikelihoodScorer


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """One question as token ids: ``context``, ``choices`` (continuations), index of the right one."""

    context: Sequence[int]
    choices: Sequence[Sequence[int]]
    gold: int
    norm_lengths: Sequence[float] | None = None  # per choice (e.g. characters); default token counts

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice question needs >= 2 choices, got {len(self.choices)}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold={self.gold} is not a choice index in [0, {len(self.choices)})")
        if self.norm_lengths is not None and len(self.norm_lengths) != len(self.choices):
            raise ValueError(
                f"norm_lengths has {len(self.norm_lengths)} entries for {len(self.choices)} choices"
            )


@dataclasses.dataclass
class MCResult:
    """``acc`` / ``acc_norm`` over ``n`` questions, plus each question's choice log-likelihoods and picks."""

    acc: float
    acc_norm: float
    n: int
    loglikelihoods: list[list[float]]
    predictions: list[int]
    predictions_norm: list[int]

    def as_dict(self) -> dict[str, float | int]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def score_multiple_choice(
    scorer: LoglikelihoodScorer, questions: Sequence[MCQuestion], *, progress: bool = False
) -> MCResult:
    """Score every (question, choice) pair in one batched pass and compute ``acc`` / ``acc_norm``."""
    if not questions:
        raise ValueError("no questions to score")
    requests = [(q.context, choice) for q in questions for choice in q.choices]
    scores = scorer.score(requests, progress=progress, desc="multiple choice")
    lls, preds, preds_norm, i = [], [], [], 0
    for q in questions:
        ll = np.asarray([s.logprob for s in scores[i : i + len(q.choices)]], np.float64)
        i += len(q.choices)
        lengths = np.asarray(
            q.norm_lengths if q.norm_lengths is not None else [len(c) for c in q.choices], np.float64
        )
        if np.any(lengths <= 0):
            raise ValueError("choice lengths for acc_norm must be positive")
        lls.append(ll.tolist())
        preds.append(int(np.argmax(ll)))
        preds_norm.append(int(np.argmax(ll / lengths)))
    gold = np.asarray([q.gold for q in questions])
    return MCResult(
        acc=float(np.mean(np.asarray(preds) == gold)),
        acc_norm=float(np.mean(np.asarray(preds_norm) == gold)),
        n=len(questions),
        loglikelihoods=lls,
        predictions=preds,
        predictions_norm=preds_norm,
    )

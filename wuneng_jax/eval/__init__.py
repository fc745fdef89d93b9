"""Evaluation cores (pure, jitted; no files or meshes): continuation log-likelihoods, rolling
log-likelihood, multiple-choice accuracy. ``train/evaluate.py`` adds token stores, text and the CLI."""

from wuneng_jax.eval.loglikelihood import (
    LoglikelihoodScorer,
    Score,
    rolling_requests,
    score_tokens,
    token_logprobs,
)
from wuneng_jax.eval.multiple_choice import MCQuestion, MCResult, score_multiple_choice

__all__ = [
    "LoglikelihoodScorer",
    "MCQuestion",
    "MCResult",
    "Score",
    "rolling_requests",
    "score_multiple_choice",
    "score_tokens",
    "token_logprobs",
]

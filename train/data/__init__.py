"""Data: tokenizers, the tensorstore token store, prepare-data, packing and grain pipelines.

Light modules (no jax/grain import) are re-exported here; the grain pipeline
(``train.data.pipeline``: ``train_dataset``, ``train_iterator``, ``eval_batches``, ``make_global_batch``)
is imported lazily on first attribute access. prepare-data: ``train.data.prepare.prepare`` / ``main``.
"""

from __future__ import annotations

from train.data.store import StoreError, TokenStore
from train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

_PIPELINE = (
    "train_dataset",
    "train_iterator",
    "eval_dataset",
    "eval_batches",
    "row_dataset",
    "make_global_batch",
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "StoreError",
    "TokenStore",
    "Tokenizer",
    "load_tokenizer",
    *_PIPELINE,
]


def __getattr__(name: str):
    if name in _PIPELINE:
        from train.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")

"""Matched parameter counts: tune each variant's width knob so its total matches the reference variant.

Counts come from shapes only (``wuneng_jax.config.count_params``: abstract init, nothing allocated) and
are cached in ``out_dir/param_counts.json`` (keyed by the full model mapping), so a resumed experiment
does not count again. See ``train.experiments.spec`` for the rule.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from train.experiments.spec import ExperimentError, ExperimentSpec, VariantSpec

Counter = Callable[[dict[str, Any]], int]


def model_key(model: Mapping[str, Any]) -> str:
    return json.dumps(dict(model), sort_keys=True)


class CachedCounter:
    """``count(model_mapping) -> total parameters``, memoised in memory and in a JSON file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.cache: dict[str, int] = {}
        if self.path and self.path.is_file():
            try:
                self.cache = {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.cache = {}

    def __call__(self, model: dict[str, Any]) -> int:
        key = model_key(model)
        if key not in self.cache:
            from wuneng_jax.config import count_params, load_model_config

            self.cache[key] = int(count_params(load_model_config(dict(model))))
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.cache, indent=0))
                tmp.replace(self.path)
        return self.cache[key]


def tune_variant(v: VariantSpec, vocab: int, target: int, count: Counter) -> tuple[dict[str, Any], int]:
    """The variant's model mapping at ``vocab`` with ``v.tune`` chosen (multiples of ``v.tune_multiple``)
    so that its count is nearest ``target``; returns ``(model, count)``. Counts are affine in a width
    knob, so two counts give the slope; the neighbours of the solution are checked too."""
    model = {**v.model, "vocab_size": vocab}
    if v.tune is None:
        return model, count(model)
    m = v.tune_multiple
    x0 = max(m, round(int(model[v.tune]) / m) * m)
    c0 = count({**model, v.tune: x0})
    c1 = count({**model, v.tune: x0 + m})
    slope = (c1 - c0) / m
    if slope <= 0:
        raise ExperimentError(
            f"variant {v.name}: the count does not grow with `{v.tune}`; choose another knob"
        )
    guess = max(m, x0 + round((target - c0) / slope / m) * m)
    best = min(
        (x for x in (guess - m, guess, guess + m) if x >= m),
        key=lambda x: (abs(count({**model, v.tune: x}) - target), x),
    )
    model[v.tune] = best
    return model, count(model)


def match_all(
    spec: ExperimentSpec, task_vocab: Mapping[str, int], count: Counter
) -> tuple[dict[tuple[str, str], dict[str, Any]], list[dict[str, Any]]]:
    """Model mappings per ``(task, variant)`` and the parameter table (one row per vocabulary × variant).

    Raises ``ExperimentError`` when a variant cannot get within ``spec.tolerance`` of the reference.
    """
    ref = spec.variant(spec.reference)
    models: dict[tuple[str, str], dict[str, Any]] = {}
    table: list[dict[str, Any]] = []
    by_vocab: dict[int, dict[str, tuple[dict[str, Any], int]]] = {}
    for vocab in sorted(set(task_vocab.values())):
        ref_model, target = tune_variant(ref, vocab, 0, count)
        tuned: dict[str, tuple[dict[str, Any], int]] = {}
        for v in spec.variants:
            model, n = (ref_model, target) if v.name == ref.name else tune_variant(v, vocab, target, count)
            rel = (n - target) / target
            if abs(rel) > spec.tolerance:
                knob = f"`{v.tune}`" if v.tune else "a width field (set `tune:`)"
                raise ExperimentError(
                    f"experiment field `variants.{v.name}`: {n:,} parameters at vocab {vocab} is "
                    f"{100 * rel:+.1f}% from the reference {ref.name} ({target:,}), beyond params.tolerance="
                    f"{spec.tolerance}; tune {knob} or change its dimensions"
                )
            tuned[v.name] = (model, n)
            table.append(
                {
                    "vocab_size": vocab,
                    "variant": v.name,
                    "family": v.family,
                    "params": n,
                    "rel_to_reference": rel,
                    "tuned": {v.tune: model[v.tune]} if v.tune else {},
                    "tasks": sorted(t for t, voc in task_vocab.items() if voc == vocab),
                }
            )
        by_vocab[vocab] = tuned
    for task, vocab in task_vocab.items():
        for v in spec.variants:
            models[(task, v.name)] = by_vocab[vocab][v.name][0]
    return models, table

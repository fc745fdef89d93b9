"""Parameter report: what the WuNeng additions cost, per preset (``python -m wuneng_jax.params_report``).

Every count comes from shapes only (``nnx.eval_shape`` / ``jax.eval_shape``; nothing is allocated):

* ``total``: all parameters of the WuNeng model (``wuneng_jax.models.count_params``);
* ``base``: all parameters of its Qwen2 base (``cfg.to_qwen2()``);
* ``added = total - base`` and ``added / base`` in percent; the per-parameter breakdown comes from the
  abstract values of ``init_hybrid_params`` (one hybrid layer) times the number of hybrid layers.

The goal: additions under 5 % at the Qwen2.5-1.5B and 7B shapes with the
default settings. ``docs/params.md`` holds the table this command prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wuneng_jax.models import count_params
from wuneng_jax.models.registry import preset
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.models.wuneng_params import hybrid_param_names, init_hybrid_params

DEFAULT_PRESETS = ("wuneng_tiny", "wuneng-0.5b", "wuneng-1.5b", "wuneng-7b")
VARIANT_PRESETS = ("wuneng-1.5b", "wuneng-7b")
#: Settings compared in the variants table (overrides of the preset's defaults).
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default (full, state_query, attention_value)", {}),
    ("fusion=concat", {"fusion": "concat"}),
    ("fusion=add", {"fusion": "add"}),
    ("fusion=gate", {"fusion": "gate"}),
    ("full, state_query off", {"state_query": False}),
    (
        "full, state_query off, state_value=attention_output",
        {"state_query": False, "state_value": "attention_output"},
    ),
    ("full, full-rank W_Om (middle_out_rank=null)", {"middle_out_rank": None}),
    ("full, state_head_size=64", {"state_head_size": 64, "state_heads": None}),
)


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts of one WuNeng config."""

    name: str
    base: int  # the Qwen2 base model
    total: int  # the WuNeng model
    per_layer: dict[str, int]  # new parameter name -> elements in one hybrid layer
    num_hybrid_layers: int

    @property
    def added(self) -> int:
        return self.total - self.base

    @property
    def added_pct(self) -> float:
        return 100.0 * self.added / self.base


def hybrid_layer_params(cfg: WuNengConfig) -> dict[str, int]:
    """Elements of each new parameter of one hybrid layer (abstract evaluation of the init recipe)."""
    d, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    pdt = jnp.dtype(cfg.param_dtype)
    shapes = jax.eval_shape(
        lambda qk, kk, key: {
            n: v for n, (v, _) in init_hybrid_params(cfg, 0, q_kernel=qk, k_kernel=kk, key=key).items()
        },
        jax.ShapeDtypeStruct((d, q), pdt),
        jax.ShapeDtypeStruct((d, kv), pdt),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    return {name: math.prod(shapes[name].shape) for name in hybrid_param_names(cfg)}


def param_report(cfg: WuNengConfig, name: str = "") -> ParamReport:
    """Counts for ``cfg`` (whole models by ``eval_shape``); checks total = base + per-layer additions."""
    if not isinstance(cfg, WuNengConfig):
        raise ValueError(f"param_report needs a WuNengConfig, got {type(cfg).__name__}")
    rep = ParamReport(
        name=name,
        base=count_params(cfg.to_qwen2()),
        total=count_params(cfg),
        per_layer=hybrid_layer_params(cfg),
        num_hybrid_layers=cfg.num_hybrid_layers,
    )
    expected = rep.base + sum(rep.per_layer.values()) * rep.num_hybrid_layers
    if rep.total != expected:  # the model and the init recipe disagree: a bug
        raise RuntimeError(f"{name}: model has {rep.total} parameters, base + additions = {expected}")
    return rep


def _fmt(n: int) -> str:
    return f"{n:,}"


def _settings(cfg: WuNengConfig) -> str:
    mid = "" if cfg.fusion != "full" else f", W_Om rank {cfg.middle_out_rank or 'full'}"
    return (
        f"S={cfg.state_heads}, N={cfg.state_head_size}, LoRA {cfg.decay_lora_rank}/{cfg.iclr_lora_rank}/"
        f"{cfg.gate_lora_rank}{mid}"
    )


def main_table(presets: Sequence[str] = DEFAULT_PRESETS) -> str:
    """Markdown table: per preset, base / WuNeng totals and the additions (default settings)."""
    rows = [
        "| preset | base qwen2 | wuneng | added | added % | per hybrid layer | hybrid layers | settings |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in presets:
        cfg = preset(p)
        r = param_report(cfg, p)
        rows.append(
            f"| {p} | {_fmt(r.base)} | {_fmt(r.total)} | {_fmt(r.added)} | {r.added_pct:.2f} % | "
            f"{_fmt(sum(r.per_layer.values()))} | {r.num_hybrid_layers} | {_settings(cfg)} |"
        )
    return "\n".join(rows)


def variants_table(presets: Sequence[str] = VARIANT_PRESETS) -> str:
    """Markdown table: additions (% of base) of each setting in :data:`VARIANTS`, per preset."""
    head = "| setting | " + " | ".join(f"{p} added | %" for p in presets) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(presets)]
    bases = {p: count_params(preset(p).to_qwen2()) for p in presets}
    for label, overrides in VARIANTS:
        cells = []
        for p in presets:
            cfg = dataclasses.replace(preset(p), **overrides)
            added = sum(hybrid_layer_params(cfg).values()) * cfg.num_hybrid_layers
            cells.append(f"{_fmt(added)} | {100.0 * added / bases[p]:.2f} %")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def breakdown_table(preset_name: str) -> str:
    """Markdown table: each new parameter's elements per hybrid layer for one preset."""
    cfg = preset(preset_name)
    per = hybrid_layer_params(cfg)
    total = sum(per.values())
    rows = [f"| parameter ({preset_name}) | per layer | share |", "|---|---:|---:|"]
    for name, n in per.items():
        rows.append(f"| `{name}` | {_fmt(n)} | {100.0 * n / total:.1f} % |")
    rows.append(f"| **sum** | **{_fmt(total)}** | 100 % |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wuneng_jax.params_report",
        description="WuNeng parameter report: total parameters and the cost of the WuNeng additions per preset.",
    )
    parser.add_argument(
        "--presets", nargs="+", default=list(DEFAULT_PRESETS), help="wuneng presets to report"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also compare settings at the 1.5B / 7B shapes"
    )
    parser.add_argument("--breakdown", metavar="PRESET", help="also list each new parameter for one preset")
    args = parser.parse_args(argv)
    try:
        print(main_table(args.presets))
        if args.variants:
            print()
            print(variants_table())
        if args.breakdown:
            print()
            print(breakdown_table(args.breakdown))
    except ValueError as e:
        print(f"params_report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

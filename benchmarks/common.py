"""Shared benchmark helpers: timing with warm-up and medians, a printed table, JSON results with the device."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

#: where results go: benchmarks/results, or $WUNENG_RESULTS_DIR (benchmarks/gpu_check.sh points it at $OUT)
RESULTS_DIR = os.environ.get("WUNENG_RESULTS_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results"
)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 5, min_time: float = 0.0) -> dict:
    """Median / min wall time of ``fn()`` (blocked until ready) after ``warmup`` calls, in seconds."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def device_info() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_results(name: str, payload: dict) -> str:
    """Write ``payload`` plus device info and date to ``benchmarks/results/<name>_<platform>.json``."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    info = device_info()
    payload = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **info,
        **payload,
    }
    path = os.path.join(RESULTS_DIR, f"{name}_{info['platform']}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    return path

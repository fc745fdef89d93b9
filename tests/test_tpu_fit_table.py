"""benchmarks/tpu_fit_table.py's walk over slices with faked compiles (no libtpu): the state-alone skip, the
compiler's verdicts in order until one fits, the cache, failed compiles, and the two markdown tables."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import tpu_fit_table as ft
from benchmarks.roofline import ROOFLINE_VERSION

T = 8192
HBM = 16 * 10**9
ARGS = argparse.Namespace(timeout=60.0, redo=False, skip_failed=False)


def _entry(point, status, used, tokens_s=None):
    e = {"key": point.key, "topology": point.topology, "chips": point.chips, "status": status}
    e |= {"used_bytes": used, "compile_s": 1.0}
    e["largest"] = [{"kind": "argument", "name": "w", "shape": "f32[1]", "nbytes": 3 * 2**20}]
    e["largest_temporaries"] = [{"kind": "temporary", "name": "x", "shape": "f32[1]", "nbytes": 2**20}]
    if tokens_s:
        e["predicted"] = {
            "step_s": T / tokens_s,
            "tokens_per_s_per_chip": tokens_s,
            "mfu": 0.4,
            "roofline": ROOFLINE_VERSION,
        }
    return e


@pytest.fixture
def fake(tmp_path, monkeypatch):
    verdicts = {  # (preset, topology) -> (status, bytes, tokens/s per chip)
        ("qwen2.5-7b", "v5e:2x2"): ("does not fit", 17 * 10**9, None),
        ("qwen2.5-7b", "v5e:2x4"): ("fits", 12 * 10**9, 1000.0),
        ("wuneng-7b", "v5e:2x2"): ("does not fit", 18 * 10**9, None),
        ("wuneng-7b", "v5e:2x4"): ("timeout", None, None),
    }
    calls = []

    def run_point(point, timeout, keep_dump):
        calls.append(point.key)
        return _entry(point, *verdicts[(point.preset, point.topology)])

    monkeypatch.setattr(ft, "run_point", run_point)
    monkeypatch.setattr(ft, "n_params", lambda preset: 2 * 10**9)  # 24 GB of state: more than one chip's HBM
    cache = ft.Cache(tmp_path / "table.json")
    cache.data["usable_hbm"]["v5e"] = HBM
    return cache, verdicts, calls


def test_the_walk_compiles_each_slice_until_one_fits(fake):
    cache, _, calls = fake
    row = ft.search(cache, ARGS, "qwen2.5-7b", T, "v5e")
    assert [(t["topology"], t["status"]) for t in row["tried"]] == [
        ("v5e:1x1", "state alone exceeds the HBM"),
        ("v5e:2x2", "does not fit"),
        ("v5e:2x4", "fits"),
    ]
    assert [k.split("|")[1] for k in calls] == ["v5e:2x2", "v5e:2x4"]
    assert ft.fitting(cache, row)["used_bytes"] == 12 * 10**9
    ft.search(cache, ARGS, "qwen2.5-7b", T, "v5e")  # cached: no new compile
    assert len(calls) == 2


def test_a_failed_compile_stops_the_walk_and_is_retried(fake):
    cache, verdicts, calls = fake
    row = ft.search(cache, ARGS, "wuneng-7b", T, "v5e")
    assert row["tried"][-1]["status"] == "timeout" and ft.fitting(cache, row) is None
    skip = argparse.Namespace(**{**vars(ARGS), "skip_failed": True})
    ft.search(cache, skip, "wuneng-7b", T, "v5e")
    assert len(calls) == 2  # kept
    verdicts[("wuneng-7b", "v5e:2x4")] = ("fits", 13 * 10**9, 800.0)
    row = ft.search(cache, ARGS, "wuneng-7b", T, "v5e")
    assert len(calls) == 3 and ft.fitting(cache, row)["used_bytes"] == 13 * 10**9


def test_markdown_tables(fake):
    cache, verdicts, _ = fake
    verdicts[("wuneng-7b", "v5e:2x4")] = ("fits", 13 * 10**9, 800.0)
    cache.data["table"] = [ft.search(cache, ARGS, p, T, "v5e") for p in ("qwen2.5-7b", "wuneng-7b")]
    text = ft.markdown(cache)
    assert (
        "| Qwen2.5-7B | qwen2 | 8192 | **v5e:2x4** 11.18 GiB, largest 3 MiB (argument), temporary 1 MiB; v5e:2x2: does not fit (15.83 GiB) |"
        in text
    )
    assert f"| Qwen2.5-7B | wuneng | 8192 | {T / 800:.2f} · 800 · 40 % · **1.25× qwen2** |" in text
    # a prediction made under older costing rules is not shown (nor compared): the cell says to rerun it
    predicted = cache.data["compiles"][ft.fitting(cache, cache.data["table"][1])["key"]]["predicted"]
    predicted["roofline"] = 1
    assert "| Qwen2.5-7B | wuneng | 8192 | (roofline v1: rerun) |" in ft.markdown(cache)
    # version 2 counted windowed loops once: current only on up to 4 chips, this cell has 8
    predicted["roofline"] = 2
    assert "| Qwen2.5-7B | wuneng | 8192 | (roofline v2: rerun) |" in ft.markdown(cache)

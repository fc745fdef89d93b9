"""benchmarks/tpu_fit_table.py's search over slices, on a hand-made cache (no compiles): the derivation
formula, full-depth compiles replacing derivations, and WuNeng cells anchored on their qwen2 twin's compile."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import tpu_fit_table as ft

T = 8192
FACTS = ft.Facts(n_params=10**9, layers=4, layer_params=10**8, hidden=1000)
HBM = 16 * 10**9
CALIB = {"qwen2.5-7b": 5 * 10**9, "wuneng-7b": 5 * 10**9 + 5 * 10**8}


def _derived(preset: str, chips: int) -> float:
    """The docstring's accounting, written out: 2 calibrated layers on 4 chips, 2 more layers, state rescaled."""
    per_layer = 16 * FACTS.layer_params / 4 + 4 * T * FACTS.hidden
    return CALIB[preset] + 2 * per_layer - 16 * FACTS.n_params / 4 + 16 * FACTS.n_params / chips


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "model_facts", lambda preset: FACTS)
    c = ft.Cache(tmp_path / "table.json")
    c.data["usable_hbm"]["v5e"] = HBM
    for preset, used in CALIB.items():
        c.data["compiles"][f"{preset}|{T}|v5p:2x2x1|2"] = {"status": "fits", "used_bytes": used}
    return c


ARGS = argparse.Namespace(calib_topology="v5p:2x2x1", calib_layers=2, full=False, margin=0.05)


def _search(cache, family: str, preset: str) -> dict:
    return ft.search(cache, ARGS, "Qwen2.5-7B", family, preset, T, "v5e")


def test_derivation_picks_the_smallest_slice(cache):
    row = _search(cache, "qwen2", "qwen2.5-7b")
    first, second = row["tried"][:2]
    assert first["topology"] == "v5e:1x1" and not first["fits"]
    assert first["used"] == pytest.approx(_derived("qwen2.5-7b", 1))
    assert row["answer"]["topology"] == "v5e:2x2" and row["answer"]["how"] == "derived"
    assert second["used"] == pytest.approx(_derived("qwen2.5-7b", 4))
    assert _search(cache, "wuneng", "wuneng-7b")["answer"]["topology"] == "v5e:2x2"


def test_full_compiles_replace_derivations_and_anchor_wuneng(cache):
    # the qwen2 program compiled at full depth on v5e:2x2 needs 17 GB: it does not fit there
    cache.data["compiles"][f"qwen2.5-7b|{T}|v5e:2x2|full"] = {
        "status": "does not fit",
        "used_bytes": 17 * 10**9,
    }
    q = _search(cache, "qwen2", "qwen2.5-7b")
    assert q["tried"][1] == {"topology": "v5e:2x2", "fits": False, "used": 17 * 10**9, "how": "compiled"}
    assert q["answer"]["topology"] == "v5e:2x4"
    w = _search(cache, "wuneng", "wuneng-7b")
    anchored = w["tried"][1]
    assert anchored["how"] == "derived from the qwen2 compile" and not anchored["fits"]
    assert anchored["used"] == pytest.approx(
        17 * 10**9 + 5 * 10**8
    )  # + the derived WuNeng - qwen2 difference
    assert w["answer"]["topology"] == "v5e:2x4"
    cache.data["table"] = [{**q, "shape": "Qwen2.5-7B"}, w]
    table = ft.markdown(cache)
    assert "(v5e:2x2: does not fit, 15.83 GiB compiled)" in table

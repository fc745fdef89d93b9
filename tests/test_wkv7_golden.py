"""``pallas_kernels.wkv7`` against golden outputs of third-party implementations (tests/golden/wkv7_cases).

The golden files were written by ``tests/golden/make_golden.py`` from BlinkDL's ``rwkv`` package (its CPU WKV
loop), fla-core's ``dplr_recurrence`` and an independent numpy float64 loop; see ``tests/golden/README.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import wkv7

GOLDEN = Path(__file__).parent / "golden" / "wkv7_cases"
CASES = sorted(p.stem for p in GOLDEN.glob("*.npz"))
IMPLS = ("reference", "chunked")
# one jitted function per impl: a single compile per input shape (the chunked form compiles slowly eagerly)
WKV7 = {impl: jax.jit(functools.partial(wkv7, impl=impl)) for impl in IMPLS}
# x64 runs of the chunked form (a compile per case) only where the decays stress it; the reference runs all
X64_CHUNKED = {
    "decay_near_zero_t33_n16",
    "decay_mixed_t64_n32",
    "decay_one_iclr_one_t64_n16",
    "decay_near_one_t1000_n16",
    "generic_dplr_t40_n32",
}
TOL_F32 = 1e-5  # max|Δ| / max|ref|, rwkv7-and-kernels.md §7.4
TOL_F64 = 1e-10
EXPECTED = {  # the adversarial families of rwkv7-and-kernels.md §6.5 / §7.1 must all be present
    "decay_floor_t65_n16",
    "decay_near_zero_t33_n16",
    "decay_mixed_t64_n32",
    "decay_one_iclr_one_t64_n16",
    "decay_near_one_t1000_n16",
    "generic_dplr_t40_n32",
    "large_kv_t33_n32",
    "iclr_zero_t31_n16",
    "iclr_one_t31_n16",
    "realistic_t1_n32",
    "realistic_t100_n64_s0",
}


def _load(case: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{case}.npz") as z:
        return {k: z[k] for k in z.files}


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def test_golden_cases_present():
    missing = EXPECTED - set(CASES)
    assert not missing, f"golden WKV7 cases missing: {sorted(missing)}; run tests/golden/make_golden.py"


@pytest.mark.parametrize("case", CASES)
def test_golden_oracles_agree(case):
    """The stored oracles agree with each other (guards against a corrupted or mislabelled file)."""
    d = _load(case)
    for key in ("o", "state"):
        assert _rel(d[f"{key}_rwkv"], d[f"{key}_np64"]) < 1e-6
        assert _rel(d[f"{key}_fla"], d[f"{key}_np64"]) < 1e-6
    # to 1e-15 relative, not bit-exact: numpy's float64 log differs by an ulp between hosts (its SIMD paths)
    np.testing.assert_allclose(d["log_w"], np.log(d["w"].astype(np.float64)), rtol=1e-15, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_wkv7_float32_matches_golden(case, impl):
    d = _load(case)
    args = [jnp.asarray(d[n], jnp.float32) for n in ("r", "log_w", "k", "v", "a", "b")]
    o, state = WKV7[impl](*args, jnp.asarray(d["s0"]))
    assert o.dtype == jnp.float32 and state.dtype == jnp.float32
    assert o.shape == d["o_rwkv"].shape and state.shape == d["state_rwkv"].shape
    errors = {
        f"{key}_{oracle}": _rel(got, d[f"{key}_{oracle}"])
        for oracle in ("rwkv", "fla")
        for key, got in (("o", o), ("state", state))
    }
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL_F32}
    assert not bad, f"{case} impl={impl}: max|Δ|/max|ref| above {TOL_F32}: {bad}"


@pytest.mark.parametrize(
    ("case", "impl"),
    [(c, "reference") for c in CASES] + [(c, "chunked") for c in CASES if c in X64_CHUNKED],
)
def test_wkv7_float64_matches_np64(case, impl):
    """In x64 mode, the same float32-valued inputs (log_w in float64) against the float64 loop."""
    d = _load(case)
    with jax.enable_x64(True):
        args = [jnp.asarray(d[n], jnp.float64) for n in ("r", "log_w", "k", "v", "a", "b")]
        o, state = WKV7[impl](*args, jnp.asarray(d["s0"], jnp.float64))
        assert o.dtype == jnp.float64
        err_o, err_s = _rel(o, d["o_np64"]), _rel(state, d["state_np64"])
    assert err_o <= TOL_F64 and err_s <= TOL_F64, f"{case} impl={impl}: o {err_o:.2e}, state {err_s:.2e}"

"""Seeded RWKV-7 recurrence inputs for tests: realistic statistics and adversarial decays.

Every case returns float32 numpy arrays ``r, log_w, k, v, a, b`` ``[B,T,H,N]`` and ``s0`` ``[B,H,N,N]``.
"""

from __future__ import annotations

import numpy as np

CASES = (
    "realistic",
    "decay_floor",
    "decay_near_zero",
    "mixed_decays",
    "decay_one_aligned",
    "decay_near_one",
    "generic_dplr",
    "large_kv",
    "iclr_zero",
    "iclr_one",
    "log_w_extreme",
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_case(name: str, bsz: int, seq_len: int, heads: int, n: int, seed: int = 0, zero_state: bool = False):
    rng = np.random.default_rng(seed)
    shape = (bsz, seq_len, heads, n)
    normal = lambda scale=1.0: rng.standard_normal(shape) * scale
    r, k, v = normal(0.5), normal(0.5), normal(0.5)
    kk = _unit(normal())
    iclr = _sigmoid(normal())
    log_w = -np.exp(-0.5) * _sigmoid(normal(2.0))
    a, b = -kk, kk * iclr
    if name == "realistic":
        pass
    elif name == "decay_floor":
        log_w = np.full(shape, np.log(0.545))
    elif name == "decay_near_zero":
        log_w = np.log(rng.uniform(1e-8, 0.1, shape))
    elif name == "mixed_decays":  # per channel from 1e-4 to 1 - 1e-6 in one head
        w = np.exp(np.linspace(np.log(1e-4), np.log1p(-1e-6), n))
        log_w = np.broadcast_to(np.log(w), shape).copy()
    elif name == "decay_one_aligned":  # w = 1, iclr = 1, a = -kk, b = kk: I - kk kkᵀ is singular
        kk = np.broadcast_to(_unit(rng.standard_normal((1, 1, heads, n))), shape).copy()
        log_w, a, b = np.zeros(shape), -kk, kk.copy()
    elif name == "decay_near_one":
        log_w = np.log(rng.uniform(1 - 1e-5, 1.0, shape))
    elif name == "generic_dplr":  # independent random a and b
        a, b = normal(0.2), normal(0.2)
    elif name == "large_kv":
        k, v = k * 10, v * 30
    elif name == "iclr_zero":
        b = kk * 0.0
    elif name == "iclr_one":
        b = kk.copy()
    elif name == "log_w_extreme":  # exactly 0, very negative, -inf
        choice = rng.integers(0, 3, shape)
        log_w = np.where(choice == 0, 0.0, np.where(choice == 1, -80.0, -np.inf))
    else:
        raise KeyError(name)
    s0 = np.zeros((bsz, heads, n, n)) if zero_state else rng.standard_normal((bsz, heads, n, n)) * 0.3
    f32 = lambda x: np.asarray(x, np.float32)
    return tuple(f32(x) for x in (r, log_w, k, v, a, b, s0))


def numpy_recurrence(r, log_w, k, v, a, b, s0, reset=None):
    """Independent float64 loop of the BlinkDL recurrence (value rows x key columns)."""
    r, w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, np.exp(np.float64(log_w)), k, v, a, b))
    s = np.array(s0, np.float64)
    bsz, seq_len, _, _ = r.shape
    o = np.zeros_like(r)
    for t in range(seq_len):
        if reset is not None:
            s[reset[:, t]] = 0.0
        sa = np.einsum("bhij,bhj->bhi", s, a[:, t])
        s = (
            s * w[:, t, :, None, :]
            + sa[..., None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        o[:, t] = np.einsum("bhij,bhj->bhi", s, r[:, t])
    return o, s


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))

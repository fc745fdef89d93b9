"""wkv7: reference and chunked implementations against an independent float64 loop, gradients, packing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wkv7_cases import CASES, make_case, numpy_recurrence, rel_err

from pallas_kernels import wkv7

TOL_F32 = 1e-5  # max|Δ| / max|ref| for float32 inputs (issue 2)


@pytest.mark.parametrize("name", CASES)
def test_reference_float64_matches_numpy_loop(name):
    x = make_case(name, 2, 21, 2, 16, seed=1)
    o_np, s_np = numpy_recurrence(*x)
    with jax.enable_x64(True):
        xs = [jnp.asarray(v, jnp.float64) for v in x]
        o, s = wkv7(*xs[:6], xs[6], impl="reference")
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert rel_err(o, o_np) < 1e-12
        assert rel_err(s, s_np) < 1e-12


SHAPES = [  # (B, T, H, N, chunk): T = 1, chunk - 1, chunk + 1, several chunks, every head size
    (1, 1, 1, 16, 16),
    (2, 15, 2, 32, 16),
    (1, 17, 1, 64, 16),
    (2, 65, 2, 64, 32),
    (1, 70, 1, 128, 64),
    (1, 33, 3, 16, 8),
]


@pytest.mark.parametrize("name", CASES)
def test_chunked_float32_vs_float64_loop_all_cases(name):
    """Every case on one shape (one compile): T not a multiple of the chunk, random state."""
    x = make_case(name, 2, 37, 2, 32, seed=len(name))
    o_np, s_np = numpy_recurrence(*x)
    o, s = wkv7(*x[:6], x[6], impl="chunked", chunk_size=16)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_np) <= TOL_F32, rel_err(o, o_np)
    assert rel_err(s, s_np) <= TOL_F32, rel_err(s, s_np)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}N{}L{}".format(*s))
def test_chunked_float32_vs_float64_loop_shapes(shape):
    """Every shape with a realistic input (matmul path) and decays near 0 (exact pairwise path)."""
    bsz, seq_len, heads, n, chunk = shape
    for name in ("realistic", "decay_near_zero"):
        x = make_case(name, bsz, seq_len, heads, n, seed=seq_len + n)
        o_np, s_np = numpy_recurrence(*x)
        o, s = wkv7(*x[:6], x[6], impl="chunked", chunk_size=chunk)
        assert rel_err(o, o_np) <= TOL_F32, (name, rel_err(o, o_np))
        assert rel_err(s, s_np) <= TOL_F32, (name, rel_err(s, s_np))


@pytest.mark.parametrize("name", ["realistic", "decay_floor", "generic_dplr"])
def test_reference_float32_vs_float64_loop(name):
    x = make_case(name, 2, 40, 2, 32, seed=3)
    o_np, s_np = numpy_recurrence(*x)
    o, s = wkv7(*x[:6], x[6], impl="reference")
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32


def test_long_sequence_decay_near_one():
    """T = 1000 with w within 1e-5 of 1: the state grows (|o| ~ 100) and must stay exact in float32."""
    x = make_case("decay_near_one", 1, 1000, 1, 16, seed=7, zero_state=True)
    o_np, s_np = numpy_recurrence(*x)
    assert np.abs(o_np).max() > 10  # the case really accumulates
    for impl, chunk in (("chunked", 16), ("chunked", 64), ("reference", None)):
        o, s = wkv7(*x[:6], x[6], impl=impl, chunk_size=chunk)
        assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32, impl


@pytest.mark.parametrize("name", ["realistic", "decay_near_zero", "mixed_decays", "decay_one_aligned"])
def test_chunked_float64_is_exact(name):
    """In float64 the chunked algebra equals the loop to rounding: no approximation hides in the algorithm."""
    x = make_case(name, 1, 40, 2, 16, seed=11)
    o_np, s_np = numpy_recurrence(*x)
    with jax.enable_x64(True):
        xs = [jnp.asarray(v, jnp.float64) for v in x]
        o, s = wkv7(*xs[:6], xs[6], impl="chunked", chunk_size=16)
        assert rel_err(o, o_np) < 1e-11 and rel_err(s, s_np) < 1e-11


def _loss(impl, chunk, r, log_w, k, v, a, b, s0, co, cs, reset):
    o, s = wkv7(r, log_w, k, v, a, b, s0, reset=reset, impl=impl, chunk_size=chunk)
    return jnp.sum(o * co) + jnp.sum(s * cs)


@pytest.mark.parametrize(
    "name,with_reset",
    [("realistic", False), ("generic_dplr", True), ("decay_near_zero", False), ("mixed_decays", True)],
)
def test_gradients_match_reference_float64(name, with_reset):
    bsz, seq_len, heads, n = 2, 37, 2, 16
    x = make_case(name, bsz, seq_len, heads, n, seed=5)
    rng = np.random.default_rng(9)
    co = rng.standard_normal((bsz, seq_len, heads, n))
    cs = rng.standard_normal((bsz, heads, n, n))
    reset = rng.random((bsz, seq_len)) < 0.1 if with_reset else None
    with jax.enable_x64(True):
        args = [jnp.asarray(v, jnp.float64) for v in (*x, co, cs)]
        rst = None if reset is None else jnp.asarray(reset)
        argnums = tuple(range(7))
        g_ref = jax.grad(functools.partial(_loss, "reference", None), argnums)(*args, rst)
        g_chk = jax.grad(functools.partial(_loss, "chunked", 16), argnums)(*args, rst)
        for label, gr, gc in zip(("r", "log_w", "k", "v", "a", "b", "s0"), g_ref, g_chk, strict=True):
            assert np.all(np.isfinite(np.asarray(gc))), label
            assert rel_err(gc, gr) < 1e-10, (label, rel_err(gc, gr))


def test_gradients_finite_for_extreme_log_w():
    x = make_case("log_w_extreme", 1, 20, 1, 16, seed=2)
    cot = np.random.default_rng(0).standard_normal(x[0].shape).astype(np.float32)
    f = lambda *args: jnp.sum(wkv7(*args, impl="chunked")[0] * cot)
    grads = jax.grad(f, argnums=tuple(range(7)))(*x)
    g_ref = jax.grad(lambda *args: jnp.sum(wkv7(*args, impl="reference")[0] * cot), argnums=tuple(range(7)))(
        *x
    )
    for i, (gc, gr) in enumerate(zip(grads, g_ref, strict=True)):
        gc, gr = np.asarray(gc), np.asarray(gr)
        finite = np.isfinite(gr)
        assert np.all(np.isfinite(gc[finite])), i
        assert rel_err(gc[finite], gr[finite]) < 1e-4, i


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_bfloat16_inputs(impl):
    x = make_case("realistic", 2, 50, 2, 32, seed=4)
    xb = [jnp.asarray(v, jnp.bfloat16) for v in x[:6]]
    # The float64 truth of the bf16-rounded inputs: the kernel must add no error beyond the output rounding.
    o_np, s_np = numpy_recurrence(*[np.asarray(v, np.float32) for v in xb], x[6])
    o, s = wkv7(*xb, x[6], impl=impl)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(s, s_np) <= TOL_F32
    assert rel_err(o, o_np) <= 8e-3  # bf16 output rounding (2^-8 relative)


@pytest.mark.parametrize("impl,chunk", [("chunked", 16), ("chunked", 8), ("reference", None)])
def test_packed_documents_equal_separate_runs(impl, chunk):
    lens = (13, 1, 22, 9)  # documents packed in one row (a 1-token document included)
    total = sum(lens)
    x = make_case("realistic", 1, total, 2, 16, seed=8)
    reset = np.zeros((1, total), bool)
    starts = np.cumsum((0,) + lens[:-1])
    reset[0, starts] = True
    o, s = wkv7(*x[:6], x[6], reset=jnp.asarray(reset), impl=impl, chunk_size=chunk)
    # Each document alone, from a zero state, in its own row, tail-padded with identity steps (ℓ = 0,
    # r = k = v = a = b = 0 leave the state unchanged): one batched call.
    alone = [np.zeros((len(lens),) + v.shape[1:], np.float32) for v in x[:6]]
    for i, (start, length) in enumerate(zip(starts, lens, strict=True)):
        for dst, src in zip(alone, x[:6], strict=True):
            dst[i, :length] = src[0, start : start + length]
    o_alone, s_alone = wkv7(*alone, None, impl=impl, chunk_size=chunk)
    for i, (start, length) in enumerate(zip(starts, lens, strict=True)):
        assert rel_err(o[0, start : start + length], o_alone[i, :length]) < 1e-6
    assert rel_err(s[0], s_alone[-1]) < 1e-6  # the final state is the last document's alone
    # Without the resets the documents leak into each other: the test can fail.
    o_leak, _ = wkv7(*x[:6], x[6], impl=impl, chunk_size=chunk)
    assert rel_err(o_leak[:, starts[1] :], o[:, starts[1] :]) > 1e-2


def test_reset_at_first_token_ignores_initial_state():
    x = make_case("realistic", 2, 37, 2, 32, seed=3)
    reset = np.zeros((2, 37), bool)
    reset[:, 0] = True
    o1, s1 = wkv7(*x[:6], x[6], reset=jnp.asarray(reset))
    o2, s2 = wkv7(*x[:6], None)
    assert rel_err(o1, o2) < 1e-6 and rel_err(s1, s2) < 1e-6


def test_jit_and_vmap():
    x = make_case("realistic", 2, 37, 2, 32, seed=6)
    o, s = wkv7(*x[:6], x[6])
    oj, sj = jax.jit(functools.partial(wkv7, impl="chunked"))(*x[:6], x[6])
    assert rel_err(oj, o) < 1e-6 and rel_err(sj, s) < 1e-6
    stacked = [np.stack([v, v[::-1]]) for v in x]  # an extra leading axis of 2
    ov, sv = jax.vmap(lambda *args: wkv7(*args))(*stacked)
    o_rev, s_rev = wkv7(*[v[::-1] for v in x[:6]], x[6][::-1])
    assert rel_err(ov[0], o) < 1e-6 and rel_err(ov[1], o_rev) < 1e-6 and rel_err(sv[1], s_rev) < 1e-6


def test_state_resume_equals_full_sequence():
    x = make_case("realistic", 2, 74, 2, 32, seed=12)
    o, s = wkv7(*x[:6], x[6])
    o1, s1 = wkv7(*[v[:, :37] for v in x[:6]], x[6])  # the shape of test_..._all_cases: compiled once
    o2, s2 = wkv7(*[v[:, 37:] for v in x[:6]], s1)
    assert rel_err(np.concatenate([o1, o2], 1), o) < 1e-6 and rel_err(s2, s) < 1e-6


def _args(shape=(1, 8, 2, 16)):
    x = make_case("realistic", *shape)
    return list(x[:6]), x[6]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, s: (a.__setitem__(2, a[2][:, :4]), s), "same shape"),
        (lambda a, s: (a.__setitem__(1, -a[1]), s), "log_w must be <= 0"),
        (lambda a, s: (a, s[:, :, :8]), "initial_state"),
        (lambda a, s: (a, s.astype(np.float32)[None]), "initial_state"),
    ],
)
def test_validation_errors(mutate, match):
    args, s0 = _args()
    mutate(args, s0)
    args2, s2 = _args()
    if match == "initial_state":
        args, s0 = args2, mutate(args2, s2)[1]
    with pytest.raises(ValueError, match=match):
        wkv7(*args, s0)


def test_validation_errors_misc():
    args, s0 = _args((1, 8, 2, 24))
    with pytest.raises(ValueError, match="head size N=24"):
        wkv7(*args, None)
    args, s0 = _args()
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(*args, s0, impl="cuda")
    with pytest.raises(ValueError, match="reset has shape"):
        wkv7(*args, s0, reset=jnp.zeros((1, 7), bool))
    with pytest.raises(ValueError, match="bool"):
        wkv7(*args, s0, reset=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B,T,H,N\]"):
        wkv7(*[v[0] for v in args], s0)

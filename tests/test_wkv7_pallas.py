"""wkv7 impl="pallas": the fused chunk kernels (TPU/Mosaic and GPU/Triton variants) in Pallas interpret mode on
CPU against the independent float64 loop, forward and all seven gradients; the chunk algebra alone; the
CPU ``auto`` rule; and the lowering for TPU and CUDA from a CPU host.

Compile time dominates (each jitted shape costs seconds in interpret mode), so shapes are tiny and every test
reuses one jitted function per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wkv7_cases import CASES, make_case, numpy_recurrence, rel_err

from pallas_kernels import wkv7
from pallas_kernels.wkv7 import resolve_impl
from pallas_kernels.wkv7_chunk import _is_bounded, chunk_forward, unit_lower_inverse
from pallas_kernels.wkv7_fused import FusedConfig, wkv7_fused

TOL_F32 = 1e-5  # max|Δ| / max|ref|, forward, float32 (rwkv7-and-kernels.md §7.4)
TOL_F64 = 1e-10  # float64 runs of the same algebra: rounding only
TPU_CALL = "tpu_custom_call"
TRITON_CALL = "__gpu$xla.gpu.triton"
VARIANTS = ("tpu", "gpu")


def _fused_fn(variant: str, chunk: int = 16):
    cfg = FusedConfig(variant=variant, interpret=True)
    return jax.jit(lambda *a, reset=None: wkv7_fused(*a, reset, chunk, cfg))


FUSED_16 = {variant: _fused_fn(variant) for variant in VARIANTS}
CHUNK_FORWARD = {tree: jax.jit(functools.partial(chunk_forward, tree=tree)) for tree in (None, True, False)}

# ------------------------------------------------------------------------------------------------ chunk algebra


def test_unit_lower_inverse_is_the_inverse_float64():
    rng = np.random.default_rng(0)
    m = np.tril(rng.standard_normal((32, 32)), -1) * 0.7
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(unit_lower_inverse)(jnp.asarray(m)))
    assert np.max(np.abs(got @ (np.eye(32) - m) - np.eye(32))) < 1e-9


@pytest.mark.parametrize(
    "name,bounded",
    [
        ("realistic", True),
        ("decay_floor", True),
        ("decay_near_zero", False),
        ("mixed_decays", False),
        ("log_w_extreme", False),
    ],
)
def test_one_chunk_float64_matches_the_loop(name, bounded):
    """The closed form of one chunk (L = 32) against the loop, exact to rounding: the automatic choice, and each
    path forced (the centred products only where RWKV-7-like decays allow them; the tree everywhere, -inf too)."""
    x = make_case(name, 1, 32, 1, 16, seed=3)
    o_np, s_np = numpy_recurrence(*x)
    with jax.enable_x64(True):
        rows = [jnp.asarray(v[0, :, 0], jnp.float64) for v in x[:6]]
        assert bool(_is_bounded(rows[1])) == bounded
        for tree in (None, True) + ((False,) if bounded else ()):
            y, s = CHUNK_FORWARD[tree](jnp.asarray(x[6][0, 0], jnp.float64), *rows)
            assert rel_err(y, o_np[0, :, 0]) < TOL_F64 and rel_err(s, s_np[0, 0]) < TOL_F64, tree


# ------------------------------------------------------------------------------------------------ fused kernels


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CASES)
def test_fused_float32_vs_float64_loop_all_cases(name, variant):
    """Every case (fresh random and adversarial decays) on one shape: T=40 is not a multiple of the chunk."""
    x = make_case(name, 1, 40, 2, 32, seed=len(name) + 100)
    o_np, s_np = numpy_recurrence(*x)
    o, s = FUSED_16[variant](*x)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_np) <= TOL_F32, rel_err(o, o_np)
    assert rel_err(s, s_np) <= TOL_F32, rel_err(s, s_np)


def test_pallas_default_chunk_head64_eight_heads_resets():
    """Default chunk (64), N = 64, 8 heads (one TPU head group), T = 70 (two chunks, the second partial),
    random state, packed documents."""
    x = make_case("realistic", 1, 70, 8, 64, seed=21)
    reset = np.zeros((1, 70), bool)
    reset[0, [9, 10, 50]] = True  # a 1-token document, and a document crossing the chunk boundary
    o_np, s_np = numpy_recurrence(*x, reset=reset)
    o, s = jax.jit(functools.partial(wkv7, impl="pallas"))(*x[:6], x[6], reset=jnp.asarray(reset))
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32, (rel_err(o, o_np), rel_err(s, s_np))
    o_leak, _ = numpy_recurrence(*x)  # without the resets the answer differs: the test can fail
    assert rel_err(o_leak, o_np) > 1e-2


def _loss(fn, r, log_w, k, v, a, b, s0, co, cs, reset):
    o, s = fn(r, log_w, k, v, a, b, s0, reset=reset)
    return jnp.sum(o * co) + jnp.sum(s * cs)


LABELS = ("r", "log_w", "k", "v", "a", "b", "s0")
GRAD_CASES = [
    ("realistic", False),
    ("generic_dplr", True),
    ("decay_near_zero", False),
    ("log_w_extreme", True),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_gradients_match_reference_float64(variant):
    """All seven input gradients of the backward kernel vs autodiff of the sequential scan: float64 (rounding
    only, <= 1e-10) with and without resets, decays down to -inf; and float32 within the forward tolerance."""
    bsz, seq_len, heads, n = 1, 37, 2, 16
    argnums = tuple(range(7))
    reference = functools.partial(wkv7, impl="reference")
    with jax.enable_x64(True):
        grad_fused = jax.jit(jax.grad(functools.partial(_loss, FUSED_16[variant]), argnums))
        grad_ref = jax.jit(jax.grad(functools.partial(_loss, reference), argnums))
        for name, with_reset in GRAD_CASES:
            x = make_case(name, bsz, seq_len, heads, n, seed=5)
            rng = np.random.default_rng(9)
            co = rng.standard_normal((bsz, seq_len, heads, n))
            cs = rng.standard_normal((bsz, heads, n, n))
            reset = (rng.random((bsz, seq_len)) < 0.1) if with_reset else np.zeros((bsz, seq_len), bool)
            if with_reset:
                reset[0, 16] = True  # at a chunk boundary
            args = [jnp.asarray(v, jnp.float64) for v in (*x, co, cs)] + [jnp.asarray(reset)]
            g_ref = grad_ref(*args)
            for label, gp, gr in zip(LABELS, grad_fused(*args), g_ref, strict=True):
                assert gp.dtype == jnp.float64
                assert np.all(np.isfinite(np.asarray(gp))), (name, label)
                assert rel_err(gp, gr) < TOL_F64, (name, label, rel_err(gp, gr))
        args32 = [jnp.asarray(v, jnp.float32) for v in args[:9]] + [args[9]]
        for label, gp, gr in zip(LABELS, grad_fused(*args32), g_ref, strict=True):
            assert gp.dtype == jnp.float32
            assert rel_err(gp, gr) < TOL_F32, (label, rel_err(gp, gr))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_bfloat16_inputs_and_gradients(variant):
    """bf16 in and out of HBM (the chunk math is float32): outputs and gradients come back in bf16."""
    x = make_case("realistic", 1, 40, 2, 32, seed=4)
    xb = [jnp.asarray(v, jnp.bfloat16) for v in x[:6]]
    o_np, s_np = numpy_recurrence(*[np.asarray(v, np.float32) for v in xb], x[6])
    o, s = FUSED_16[variant](*xb, jnp.asarray(x[6]))
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(s, s_np) <= TOL_F32
    assert rel_err(o, o_np) <= 8e-3  # bf16 output rounding (2^-8 relative)

    def loss(fn, *a):
        o, s = fn(*a)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)

    grads = jax.grad(functools.partial(loss, FUSED_16[variant]), tuple(range(6)))(*xb, jnp.asarray(x[6]))
    ref = jax.grad(functools.partial(loss, functools.partial(wkv7, impl="reference")), tuple(range(6)))(
        *xb, jnp.asarray(x[6])
    )
    for label, g, gr in zip(LABELS, grads, ref, strict=False):
        assert g.dtype == jnp.bfloat16
        assert rel_err(g, gr) <= 2e-2, (label, rel_err(g, gr))


def test_fused_vmap_folds_into_the_grid():
    x = make_case("realistic", 2, 32, 2, 16, seed=6)
    o_np, s_np = numpy_recurrence(*x)
    stacked = [jnp.asarray(v)[:, None] for v in x]  # [B, 1, ...]: vmap over B
    o, s = jax.vmap(lambda *a: FUSED_16["tpu"](*a))(*stacked)
    assert rel_err(o[:, 0], o_np) <= TOL_F32 and rel_err(s[:, 0], s_np) <= TOL_F32


def test_pallas_runs_the_kernel_and_auto_rule():
    x = make_case("realistic", 1, 40, 2, 32)
    jaxpr = str(jax.make_jaxpr(functools.partial(wkv7, impl="pallas", chunk_size=16))(*x))
    assert "pallas_call" in jaxpr and "platform_index" in jaxpr
    expected = "pallas" if jax.default_backend() in ("tpu", "gpu") else "auto"
    assert resolve_impl("auto") == expected


def test_cpu_auto_scans_forward_only_and_differentiates_the_chunked_form():
    """CPU ``auto``: a forward-only call runs the sequential scan (one step per token), a differentiated one the
    chunked form's forward and backward (also under remat); every result matches the loop."""
    x = make_case("realistic", 1, 48, 2, 16, seed=8)
    o_np, s_np = numpy_recurrence(*x)
    fwd = functools.partial(wkv7, impl="auto")
    fwd_jaxpr = str(jax.make_jaxpr(fwd)(*x))
    assert "length=48" in fwd_jaxpr and "length=3" not in fwd_jaxpr  # the token scan, no chunk scan
    o, s = jax.jit(fwd)(*x)
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32

    def loss(fn, *a):
        o, s = fn(*a)
        return jnp.sum(o * o) + jnp.sum(s)

    argnums = tuple(range(7))
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, fwd), argnums))(*x))
    assert "length=48" not in grad_jaxpr and "length=3" in grad_jaxpr  # 3 chunks of 16
    ref = jax.grad(functools.partial(loss, functools.partial(wkv7, impl="reference")), argnums)(*x)
    for fn in (fwd, jax.checkpoint(fwd)):
        for label, g, gr in zip(
            LABELS, jax.jit(jax.grad(functools.partial(loss, fn), argnums))(*x), ref, strict=True
        ):
            assert rel_err(g, gr) <= 1e-4, (label, rel_err(g, gr))


def test_pallas_validation():
    x = make_case("realistic", 1, 8, 1, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        wkv7(*x, impl="pallas", chunk_size=8)
    with pytest.raises(ValueError, match="variant"):
        FusedConfig(variant="cuda")
    with pytest.raises(ValueError, match="interpret"):
        FusedConfig(interpret=True)


# ------------------------------------------------------------------------------------------------ lowering


def _lowered_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,call", [("tpu", TPU_CALL), ("cuda", TRITON_CALL)])
@pytest.mark.parametrize("n,heads", [(16, 2), (32, 8), (64, 16), (128, 2)])
def test_pallas_lowers_for_platform(platform, call, n, heads):
    """The Pallas -> Mosaic (TPU) and Pallas -> Triton (CUDA) lowerings run on a CPU host: block-shape rules,
    unsupported primitives and dot shapes are checked here (libtpu's compile is tests/test_compile_tpu.py).
    Forward: one kernel; gradient: forward + backward. T = 300: not a multiple of any chunk."""
    bsz, seq_len = 2, 300
    args = [jax.ShapeDtypeStruct((bsz, seq_len, heads, n), jnp.bfloat16) for _ in range(6)]
    args.append(jax.ShapeDtypeStruct((bsz, heads, n, n), jnp.float32))
    reset = jax.ShapeDtypeStruct((bsz, seq_len), jnp.bool_)
    fwd = lambda *a: wkv7(*a[:7], reset=a[7], impl="pallas", chunk_size=64 if platform == "tpu" else 16)
    other = TRITON_CALL if call == TPU_CALL else TPU_CALL

    def loss(*a):
        o, s = fwd(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    text = _lowered_text(fwd, [*args, reset], platform)
    assert text.count(call) == 1 and other not in text
    text = _lowered_text(jax.grad(loss, argnums=tuple(range(7))), [*args, reset], platform)
    assert text.count(call) == 2


def test_every_family_accepts_exactly_the_ops_impl_names():
    """One list of implementation names: the op's ``IMPLS`` is what rwkv7 and wuneng configs accept."""
    from pallas_kernels.wkv7 import IMPLS
    from wuneng_jax.config import load_model_config

    for family, preset in (("rwkv7", "rwkv7_tiny"), ("wuneng", "wuneng_tiny")):
        for impl in IMPLS:
            cfg = load_model_config({"family": family, "preset": preset, "wkv_impl": impl})
            assert cfg.wkv_impl == impl
        with pytest.raises(ValueError, match="wkv_impl"):
            load_model_config({"family": family, "preset": preset, "wkv_impl": "fused"})

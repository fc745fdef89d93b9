"""wkv7 impl="pallas": the stage-B kernels (TPU/Mosaic and GPU/Triton variants) in Pallas interpret mode on CPU,
against independent references, forward and every gradient; and their lowering for TPU and CUDA from a CPU host.

Compile time dominates (each jitted shape costs seconds in interpret mode), so shapes are tiny and every test
reuses one jitted function per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from wkv7_cases import CASES, make_case, numpy_recurrence, rel_err

from pallas_kernels import wkv7
from pallas_kernels.wkv7 import _resolve_impl
from pallas_kernels.wkv7_chunked import state_pass_scan
from pallas_kernels.wkv7_pallas import wkv7_pallas
from pallas_kernels.wkv7_state_pass import StatePassConfig, state_pass

TOL_F32 = 1e-5  # max|Δ| / max|ref|, forward, float32 (rwkv7-and-kernels.md §7.4)
TOL_F64 = 1e-10  # float64 runs of the same algebra: rounding only
TPU_CALL = "tpu_custom_call"
TRITON_CALL = "__gpu$xla.gpu.triton"


# ------------------------------------------------------------------------------------------------ stage B alone


def _state_pass_inputs(rng, bsz=1, heads=2, num_chunks=3, chunk=16, n=32):
    """Stage-B inputs with adversarial gates: g exactly 0 (a reset inside the chunk), exactly 1, and in between."""
    normal = lambda *shape: rng.standard_normal(shape) * 0.5
    g = rng.uniform(0.0, 1.0, (bsz, heads, num_chunks, n))
    g[..., 0, :] = 0.0  # first chunk: a reset
    g[..., 1, : n // 2] = 1.0  # no decay at all
    return [
        normal(bsz, heads, num_chunks, chunk, n),  # W
        normal(bsz, heads, num_chunks, chunk, n),  # U
        g,
        normal(bsz, heads, num_chunks, chunk, n),  # B̄
        normal(bsz, heads, num_chunks, n, n),  # X
        normal(bsz, heads, n, n) * 4,  # S0
    ]


def _numpy_state_pass(w, u, g, bb, x, s0):
    """Independent float64 loop of the stage-B recurrence."""
    s, s_in, sa_all = np.array(s0, np.float64), [], []
    for c in range(w.shape[2]):
        s_in.append(s)
        sa = u[:, :, c] + np.einsum("bhtj,bhij->bhti", w[:, :, c], s)
        sa_all.append(sa)
        s = s * g[:, :, c, None, :] + np.einsum("bhti,bhtj->bhij", sa, bb[:, :, c]) + x[:, :, c]
    return np.stack(s_in, 2), np.stack(sa_all, 2), s


def _weighted(fn, cotangents, *xs):
    return sum(jnp.sum(out * cot) for out, cot in zip(fn(*xs), cotangents, strict=True))


@pytest.mark.parametrize(
    "config",
    [
        StatePassConfig(variant="tpu", interpret=True),
        StatePassConfig(variant="tpu", interpret=True, chunks_per_step=3),
        StatePassConfig(variant="gpu", interpret=True, block_v=16),
        StatePassConfig(variant="scan"),  # the non-kernel fallback (other platforms), same custom VJP
    ],
    ids=["tpu", "tpu-3-chunks-per-step", "gpu-2-value-blocks", "scan-fallback"],
)
def test_state_pass_float64_forward_and_all_gradients(config):
    """Forward vs a numpy loop; the hand-written VJP (backward kernel + einsums) vs JAX autodiff of lax.scan."""
    rng = np.random.default_rng(0)
    xs_np = _state_pass_inputs(rng)
    outs_np = _numpy_state_pass(*xs_np)
    with jax.enable_x64(True):
        xs = [jnp.asarray(x, jnp.float64) for x in xs_np]
        cots = [jnp.asarray(rng.standard_normal(o.shape)) for o in outs_np]
        kernel = functools.partial(state_pass, cfg=config)
        argnums = tuple(range(6))
        outs, grads = jax.jit(
            lambda *a: (kernel(*a), jax.grad(functools.partial(_weighted, kernel, cots), argnums)(*a))
        )(*xs)
        grads_ref = jax.grad(functools.partial(_weighted, state_pass_scan, cots), argnums)(*xs)
        for label, out, ref in zip(("S_c", "SA", "S_final"), outs, outs_np, strict=True):
            assert out.dtype == jnp.float64
            assert rel_err(out, ref) < 1e-12, (label, rel_err(out, ref))
        for label, grad, ref in zip(("W", "U", "g", "B̄", "X", "S0"), grads, grads_ref, strict=True):
            assert rel_err(grad, ref) < 1e-12, (label, rel_err(grad, ref))


def test_state_pass_float32_kernels_agree_with_float64():
    rng = np.random.default_rng(1)
    xs_np = _state_pass_inputs(rng, n=64, chunk=32, num_chunks=2)
    outs_np = _numpy_state_pass(*xs_np)
    xs = [jnp.asarray(x, jnp.float32) for x in xs_np]
    for variant in ("tpu", "gpu"):
        outs = jax.jit(functools.partial(state_pass, cfg=StatePassConfig(variant=variant, interpret=True)))(
            *xs
        )
        for out, ref in zip(outs, outs_np, strict=True):
            assert out.dtype == jnp.float32
            assert rel_err(out, ref) < 1e-6, (variant, rel_err(out, ref))


# ------------------------------------------------------------------------------------------------ whole op

WKV7_PALLAS_16 = jax.jit(functools.partial(wkv7, impl="pallas", chunk_size=16))


@pytest.mark.parametrize("name", CASES)
def test_pallas_float32_vs_float64_loop_all_cases(name):
    """Every case (fresh random and adversarial decays) on one shape: T=40 is not a multiple of the chunk."""
    x = make_case(name, 1, 40, 2, 32, seed=len(name) + 100)
    o_np, s_np = numpy_recurrence(*x)
    o, s = WKV7_PALLAS_16(*x[:6], x[6])
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_np) <= TOL_F32, rel_err(o, o_np)
    assert rel_err(s, s_np) <= TOL_F32, rel_err(s, s_np)


def test_pallas_default_chunk_head64_resets():
    """Default chunk (64), N = 64, T = 70 (two chunks, the second partial), random state, packed documents."""
    x = make_case("realistic", 1, 70, 2, 64, seed=21)
    reset = np.zeros((1, 70), bool)
    reset[0, [9, 10, 50]] = True  # a 1-token document, and a document crossing the chunk boundary
    o_np, s_np = numpy_recurrence(*x, reset=reset)
    o, s = jax.jit(functools.partial(wkv7, impl="pallas"))(*x[:6], x[6], reset=jnp.asarray(reset))
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32, (rel_err(o, o_np), rel_err(s, s_np))
    o_leak, _ = numpy_recurrence(*x)  # without the resets the answer differs: the test can fail
    assert rel_err(o_leak, o_np) > 1e-2


def test_pallas_gpu_variant_end_to_end():
    """The Triton kernels (interpreted) inside the whole op, N = 16 with a single value block."""
    x = make_case("generic_dplr", 1, 40, 2, 16, seed=5)
    o_np, s_np = numpy_recurrence(*x)
    cfg = StatePassConfig(variant="gpu", interpret=True)
    o, s = jax.jit(lambda *a: wkv7_pallas(*a, None, chunk_size=16, config=cfg))(*x)
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32, (rel_err(o, o_np), rel_err(s, s_np))


def _loss(impl, r, log_w, k, v, a, b, s0, co, cs, reset):
    o, s = wkv7(r, log_w, k, v, a, b, s0, reset=reset, impl=impl, chunk_size=16 if impl == "pallas" else None)
    return jnp.sum(o * co) + jnp.sum(s * cs)


LABELS = ("r", "log_w", "k", "v", "a", "b", "s0")
GRAD_CASES = [
    ("realistic", False),
    ("generic_dplr", True),
    ("decay_near_zero", False),
    ("mixed_decays", True),
]


def test_pallas_gradients_match_reference_float64():
    """All seven input gradients vs autodiff of the sequential scan: float64 (rounding only) with and without
    resets, and float32 within the forward tolerance."""
    bsz, seq_len, heads, n = 1, 37, 2, 16
    argnums = tuple(range(7))
    with jax.enable_x64(True):
        grad_pallas = jax.jit(jax.grad(functools.partial(_loss, "pallas"), argnums))
        grad_ref = jax.jit(jax.grad(functools.partial(_loss, "reference"), argnums))
        for name, with_reset in GRAD_CASES:
            x = make_case(name, bsz, seq_len, heads, n, seed=5)
            rng = np.random.default_rng(9)
            co = rng.standard_normal((bsz, seq_len, heads, n))
            cs = rng.standard_normal((bsz, heads, n, n))
            reset = (rng.random((bsz, seq_len)) < 0.1) if with_reset else np.zeros((bsz, seq_len), bool)
            args = [jnp.asarray(v, jnp.float64) for v in (*x, co, cs)] + [jnp.asarray(reset)]
            g_ref = grad_ref(*args)
            for label, gp, gr in zip(LABELS, grad_pallas(*args), g_ref, strict=True):
                assert gp.dtype == jnp.float64
                assert rel_err(gp, gr) < TOL_F64, (name, label, rel_err(gp, gr))
        # float32 (what runs on hardware): one case, every gradient against the float64 truth
        args32 = [jnp.asarray(v, jnp.float32) for v in args[:9]] + [args[9]]
        for label, gp, gr in zip(LABELS, grad_pallas(*args32), g_ref, strict=True):
            assert gp.dtype == jnp.float32
            assert rel_err(gp, gr) < TOL_F32, (label, rel_err(gp, gr))


def test_pallas_bfloat16_inputs():
    x = make_case("realistic", 1, 40, 2, 32, seed=4)
    xb = [jnp.asarray(v, jnp.bfloat16) for v in x[:6]]
    o_np, s_np = numpy_recurrence(*[np.asarray(v, np.float32) for v in xb], x[6])
    o, s = WKV7_PALLAS_16(*xb, x[6])
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(s, s_np) <= TOL_F32
    assert rel_err(o, o_np) <= 8e-3  # bf16 output rounding (2^-8 relative)


def test_pallas_runs_the_kernel_and_auto_rule():
    x = make_case("realistic", 1, 40, 2, 32)
    jaxpr = str(jax.make_jaxpr(functools.partial(wkv7, impl="pallas", chunk_size=16))(*x))
    assert "pallas_call" in jaxpr and "platform_index" in jaxpr
    assert _resolve_impl("auto") == ("pallas" if jax.default_backend() in ("tpu", "gpu") else "chunked")


def test_pallas_sharded_over_batch_and_heads():
    """8 devices, B over 'data' and H over 'model': the kernels' custom_partitioning rule keeps the sharding
    (no all-gather: each device runs the kernel on its own block), same values and gradients as one device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    x = make_case("generic_dplr", 2, 40, 4, 16, seed=13)
    o_np, s_np = numpy_recurrence(*x)
    act, state = NamedSharding(mesh, P("data", None, "model", None)), NamedSharding(mesh, P("data", "model"))
    xs = [jax.device_put(v, act) for v in x[:6]] + [jax.device_put(x[6], state)]

    def loss(impl, *args):
        o, s = wkv7(*args, impl=impl, chunk_size=16 if impl == "pallas" else None)
        return jnp.sum(o * o) + jnp.sum(s), (o, s)

    argnums = tuple(range(7))
    compiled = (
        jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums, has_aux=True))
        .trace(*xs)
        .lower()
        .compile()
    )
    assert "all-gather" not in compiled.as_text() and "all-to-all" not in compiled.as_text()
    grads, (o, s) = compiled(*xs)
    assert o.sharding.spec == act.spec
    assert rel_err(o, o_np) <= TOL_F32 and rel_err(s, s_np) <= TOL_F32
    grads_ref, _ = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums, has_aux=True))(*x)
    for label, grad, ref in zip(LABELS, grads, grads_ref, strict=True):
        assert rel_err(grad, ref) < TOL_F32, (label, rel_err(grad, ref))


def test_pallas_validation():
    x = make_case("realistic", 1, 8, 1, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        wkv7(*x, impl="pallas", chunk_size=8)
    with pytest.raises(ValueError, match="variant"):
        StatePassConfig(variant="cuda")
    with pytest.raises(ValueError, match="interpret"):
        StatePassConfig(interpret=True)


# ------------------------------------------------------------------------------------------------ lowering


def _lowered_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,call", [("tpu", TPU_CALL), ("cuda", TRITON_CALL)])
@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_pallas_lowers_for_platform(platform, call, n):
    """The Pallas -> Mosaic (TPU) and Pallas -> Triton (CUDA) lowerings run on a CPU host: block-shape rules,
    unsupported primitives and dot shapes are checked here. Forward: one kernel; gradient: forward + backward."""
    bsz, seq_len, heads = 2, 300, 2  # 5 chunks of 64: NC not a power of two, T not a multiple of L
    args = [jax.ShapeDtypeStruct((bsz, seq_len, heads, n), jnp.bfloat16) for _ in range(6)]
    args.append(jax.ShapeDtypeStruct((bsz, heads, n, n), jnp.float32))
    reset = jax.ShapeDtypeStruct((bsz, seq_len), jnp.bool_)
    fwd = lambda *a: wkv7(*a[:7], reset=a[7], impl="pallas")
    other = TRITON_CALL if call == TPU_CALL else TPU_CALL

    def loss(*a):
        o, s = fwd(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    text = _lowered_text(fwd, [*args, reset], platform)
    assert text.count(call) == 1 and other not in text
    text = _lowered_text(jax.grad(loss, argnums=tuple(range(7))), [*args, reset], platform)
    assert text.count(call) == 2


def test_tpu_lowering_with_chunk_groups():
    """chunks_per_step > 1 (several chunks per grid step, static in-block indices) also lowers for TPU."""
    args = [jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32) for _ in range(6)]
    cfg = StatePassConfig(chunks_per_step=4)
    fwd = lambda *a: wkv7_pallas(*a, jnp.zeros((1, 2, 64, 64)), None, chunk_size=16, config=cfg)
    loss = lambda *a: jnp.sum(fwd(*a)[0])
    assert _lowered_text(jax.grad(loss, argnums=tuple(range(6))), args, "tpu").count(TPU_CALL) == 2

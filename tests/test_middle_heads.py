"""WuNeng's middle heads (``pallas_kernels.middle_heads``): the XLA formula against an explicit float64 loop over
heads, the Mosaic kernels (Pallas interpreter) against the formula and its JAX gradient, under a mesh
(``shard_map`` over batch and head units), and the errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from pallas_kernels import middle_heads as mh_mod
from pallas_kernels.middle_heads import kernel_supported, middle_heads
from wuneng_jax.layers.rwkv7_ops import wkv7_partition
from wuneng_jax.sharding import DEFAULT_RULES


def _case(b, t, h, g, d, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(b, t, h, d))
    n = rng.normal(size=(b, t, g, d))
    w = rng.normal(size=(h, 2 * d, d)) / np.sqrt(2 * d)
    c = rng.normal(size=(h, d))
    gamma = rng.normal(size=(h, d))
    dm = rng.normal(size=(b, t, h, d))
    return tuple(jnp.asarray(x, dtype) for x in (a, n, w, c, gamma)), jnp.asarray(dm, dtype)


def _numpy_middle_heads(a, n, w, c, gamma):
    """Per query head, in float64: ``m_h = a_h + γ_h σ(a_h W^a_h + n_g W^n_h + c_h) (n_g - a_h)``."""
    a, n, w, c, gamma = (np.asarray(x, np.float64) for x in (a, n, w, c, gamma))
    h, d = a.shape[2], a.shape[3]
    per_group = h // n.shape[2]
    m = np.empty_like(a)
    for head in range(h):
        ng = n[:, :, head // per_group]
        z = a[:, :, head] @ w[head, :d] + ng @ w[head, d:] + c[head]
        m[:, :, head] = a[:, :, head] + gamma[head] / (1 + np.exp(-z)) * (ng - a[:, :, head])
    return m


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _value_and_grads(impl, args, dm, **kw):
    fn = functools.partial(middle_heads, impl=impl, interpret=True, **kw)
    m, vjp = jax.vjp(fn, *args)
    return (m, *vjp(dm))


def _on_mesh(fn, *xs):
    """``fn(xs, partition)`` jitted under a ``data=2 × tensor=2`` mesh with the default logical rules: its
    outputs and its jaxpr's text."""
    devices = np.array(jax.devices()[:4]).reshape(2, 1, 2, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        partition = wkv7_partition()
        jitted = jax.jit(lambda *ys: fn(ys, partition))
        return jitted(*xs), str(jax.make_jaxpr(jitted)(*xs))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# (B, T, H, G, D): units of 2 heads whose groups differ (H/G = 7 at 0.5B), whole-unit heads (D = 128),
# 4 heads per unit (D = 32), one group
SHAPES = [(2, 20, 14, 2, 64), (1, 24, 2, 1, 128), (2, 16, 8, 2, 32), (1, 12, 3, 1, 48), (1, 9, 6, 3, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_xla_formula_matches_the_loop_over_heads(x64, shape):
    args, _ = _case(*shape)
    assert _rel(middle_heads(*args, impl="xla"), _numpy_middle_heads(*args)) <= 1e-13


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_values_and_gradients_match_the_formula_float64(x64, shape):
    args, dm = _case(*shape)
    ref = _value_and_grads("xla", args, dm)
    got = _value_and_grads("pallas", args, dm)
    assert _rel(got[0], _numpy_middle_heads(*args)) <= 1e-13
    for name, g, r in zip(("m", "a", "n", "gate_w", "gate_b", "gamma"), got, ref, strict=True):
        assert _rel(g, r) <= 1e-12, name


def test_kernel_accumulates_over_token_blocks_and_batch_with_padding(x64, monkeypatch):
    """8-token blocks over T = 21 (3 blocks, the last padded) and 2 rows: the weight gradients sum over every
    block of every row in the resident output blocks, n's over the heads of each group."""
    monkeypatch.setattr(mh_mod, "BLOCK_TOKENS", 8)
    args, dm = _case(2, 21, 4, 2, 64, seed=3)
    ref = _value_and_grads("xla", args, dm)
    got = _value_and_grads("pallas", args, dm)
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) <= 1e-12


def test_kernel_float32_and_bfloat16():
    args, dm = _case(2, 16, 4, 2, 64, dtype=np.float32, seed=1)
    ref = _value_and_grads("xla", args, dm)
    for g, r in zip(_value_and_grads("pallas", args, dm), ref, strict=True):
        assert _rel(g, r) <= 1e-5
    bf = tuple(x.astype(jnp.bfloat16) for x in args)
    got = _value_and_grads("pallas", bf, dm.astype(jnp.bfloat16))
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    # bf16 inputs, float32 math inside the kernel: within bf16 rounding of the float32 result
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) <= 3e-2


def test_kernel_under_a_mesh_is_shard_mapped_and_exact(x64):
    """Batch over data, the heads of H = 4, D = 64 in 2 groups over tensor (one group per device): values and
    gradients as without a mesh (the weight gradients summed over the batch shards by shard_map's transpose)."""
    args, dm = _case(2, 16, 4, 2, 64, seed=5)
    ref = _value_and_grads("xla", args, dm)
    got, jaxpr = _on_mesh(
        lambda xs, partition: _value_and_grads("pallas", xs[:5], xs[5], partition=partition), *args, dm
    )
    assert "shard_map" in jaxpr
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) <= 1e-12


def test_supported_head_sizes_and_errors():
    assert kernel_supported(14, 64) and kernel_supported(28, 128) and kernel_supported(3, 48)
    assert kernel_supported(2, 256) and kernel_supported(4, 16)
    assert not kernel_supported(4, 8) and not kernel_supported(4, 40)  # a head's rows: whole 16-row tiles
    args, _ = _case(1, 8, 4, 2, 40, dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"impl='pallas' needs a head size that is a multiple of 16; got D=40"
    ):
        middle_heads(*args, impl="pallas")
    assert middle_heads(*args, impl="xla").shape == (1, 8, 4, 40)
    with pytest.raises(ValueError, match="unknown impl 'mosaic'"):
        middle_heads(*args, impl="mosaic")
    a, n, w, c, g = args
    with pytest.raises(ValueError, match=r"the 3 groups must divide the 4 heads"):
        middle_heads(a, jnp.zeros((1, 8, 3, 40)), w, c, g)
    with pytest.raises(ValueError, match=r"expected gate_w of shape \(4, 80, 40\)"):
        middle_heads(a, n, w[:, :40], c, g)


def test_gpu_branch_formula_and_gradient_match_the_kernels(x64):
    """``impl="pallas"`` on a CUDA backend runs the kernels' math in jnp on the same feature-major arrays
    (``_formula_fm``) and its JAX gradient (``_cuda_bwd``); both against the interpreted Mosaic kernels."""
    args, dm = _case(2, 12, 6, 3, 16, seed=7)
    a, n, w, c, g = args
    b, t, h, d = a.shape
    fm = lambda x: x.reshape(b, t, -1).transpose(0, 2, 1)
    t_w = lambda x: x.transpose(0, 2, 1)
    xs = (fm(a), fm(n), t_w(w[:, :d]), t_w(w[:, d:]), c[..., None], g[..., None])
    kernel_out = mh_mod._fwd_tpu(*xs, interpret=True)
    assert _rel(mh_mod._formula_fm(*xs), kernel_out) <= 1e-13
    for got, want in zip(
        mh_mod._cuda_bwd(*xs, fm(dm)), mh_mod._bwd_tpu(*xs, fm(dm), interpret=True), strict=True
    ):
        assert _rel(got, want) <= 1e-12


def _projected(shape, seed, rank=24, dtype=np.float64):
    """Middle-heads arguments plus ``w_out`` ``[H·D, r]`` and the cotangent of the projected output."""
    args, _ = _case(*shape, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    b, t, h, _, d = shape
    w_out = jnp.asarray(rng.normal(size=(h * d, rank)) / np.sqrt(h * d), dtype)
    dy = jnp.asarray(rng.normal(size=(b, t, rank)), dtype)
    return (*args, w_out), dy


def _projected_value_and_grads(impl, args, dy, **kw):
    fn = lambda *xs: middle_heads(*xs[:5], w_out=xs[5], impl=impl, interpret=True, **kw)  # noqa: E731
    y, vjp = jax.vjp(fn, *args)
    return (y, *vjp(dy))


@pytest.mark.parametrize("shape", [(2, 20, 14, 2, 64), (1, 12, 3, 1, 48), (2, 9, 6, 3, 16)])
def test_projected_kernel_matches_the_formula_float64(x64, shape):
    """``w_out``: the heads' projection summed on chip (grid heads-last, VMEM accumulator), its backward with
    ``dW_out`` accumulated per head; values against the loop over heads, every gradient against JAX's."""
    args, dy = _projected(shape, seed=11)
    want = _numpy_middle_heads(*args[:5]).reshape(*shape[:2], -1) @ np.asarray(args[5])
    got = _projected_value_and_grads("pallas", args, dy)
    assert _rel(got[0], want) <= 1e-13
    for i, (g, r) in enumerate(zip(got, _projected_value_and_grads("xla", args, dy), strict=True)):
        assert _rel(g, r) <= 1e-12, i


def test_projected_kernel_padding_blocks_mesh_and_gpu_branch(x64, monkeypatch):
    """8-token blocks over T = 21 with 2 rows; under a mesh (heads in two groups over tensor: each device's
    partial sum of the projection added by psum); the CUDA branch's formula and gradient."""
    monkeypatch.setattr(mh_mod, "BLOCK_TOKENS", 8)
    args, dy = _projected((2, 21, 4, 2, 64), seed=12)
    ref = _projected_value_and_grads("xla", args, dy)
    for g, r in zip(_projected_value_and_grads("pallas", args, dy), ref, strict=True):
        assert _rel(g, r) <= 1e-12
    run = lambda xs, partition: _projected_value_and_grads("pallas", xs[:6], xs[6], partition=partition)  # noqa: E731
    got, jaxpr = _on_mesh(run, *args, dy)
    assert "psum" in jaxpr
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) <= 1e-12
    monkeypatch.setattr(mh_mod, "BLOCK_TOKENS", 512)  # the kernels called directly: one whole-T block
    a, n, w, c, g, w_out = args
    b, t, h, d = a.shape
    fm = lambda x: x.reshape(b, t, -1).transpose(0, 2, 1)  # noqa: E731
    xs = (fm(a), fm(n), w[:, :d].transpose(0, 2, 1), w[:, d:].transpose(0, 2, 1), c[..., None], g[..., None])
    xs += (w_out.reshape(h, d, -1),)
    dy_fm = dy.transpose(0, 2, 1)
    assert _rel(mh_mod._formula_fm(*xs), mh_mod._fwd_tpu(*xs, interpret=True)) <= 1e-13
    kernel = mh_mod._bwd_tpu(*xs, dy_fm, interpret=True)
    for got, want in zip(mh_mod._cuda_bwd(*xs, dy_fm), kernel, strict=True):
        assert _rel(got, want) <= 1e-12
    with pytest.raises(ValueError, match=r"expected w_out of shape \[H·D, r\] = \[256, r\]"):
        middle_heads(a, n, w, c, g, w_out=w_out[:8])

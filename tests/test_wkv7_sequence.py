"""wkv7 with the sequence split over devices (pallas_kernels.wkv7_sequence) on 8 CPU devices: outputs, final
state and all seven gradients against the unsharded float64 loop / reference, for 2, 4 and 8 blocks, with
document boundaries inside blocks and exactly on block boundaries, and no all-gather of activations."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from wkv7_cases import make_case, numpy_recurrence, rel_err

from pallas_kernels import wkv7
from pallas_kernels.wkv7_fused import FusedConfig, wkv7_fused
from pallas_kernels.wkv7_sequence import wkv7_sequence_sharded

TOL = 1e-5
SEQ, BSZ, HEADS, N = 64, 2, 2, 16


def _chunked(*xs):
    return wkv7(*xs[:7], reset=xs[7], impl="chunked")


def _fused(*xs):
    return wkv7_fused(*xs, chunk_size=16, config=FusedConfig(variant="tpu", interpret=True))


def _sharded(op, blocks: int):
    mesh = Mesh(np.array(jax.devices()[:blocks]), ("sequence",))
    rows, state, resets = P(None, "sequence"), P(), P(None, "sequence")
    body = functools.partial(wkv7_sequence_sharded, op, axis_name="sequence")
    return jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(rows,) * 6 + (state, resets), out_specs=(rows, state), check_vma=False
        )
    )


def _resets() -> np.ndarray:
    reset = np.zeros((BSZ, SEQ), bool)
    reset[0, [5, 16, 40]] = True  # 16 and 40: a block boundary at 2/4/8 blocks (16) and inside one (40)
    reset[1, 33] = True
    return reset


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_sequence_sharded_matches_the_loop(blocks):
    x = make_case("generic_dplr", BSZ, SEQ, HEADS, N, seed=blocks)
    reset = _resets()
    o_np, s_np = numpy_recurrence(*x, reset=reset)
    o, s = _sharded(_chunked, blocks)(*x, jnp.asarray(reset))
    assert rel_err(o, o_np) <= TOL and rel_err(s, s_np) <= TOL, (rel_err(o, o_np), rel_err(s, s_np))
    o_unsharded_state, _ = numpy_recurrence(*x[:6], np.zeros_like(x[6]), reset=reset)
    assert rel_err(o_unsharded_state, o_np) > 1e-3  # the initial state matters: the test can fail


def test_sequence_sharded_fused_kernel_and_gradients():
    """The fused kernel (interpreted) as the local op, 4 blocks: values and the seven gradients vs the
    unsharded reference."""
    x = make_case("realistic", BSZ, SEQ, HEADS, N, seed=11)
    reset = jnp.asarray(_resets())
    sharded = _sharded(_fused, 4)
    rng = np.random.default_rng(0)
    co = jnp.asarray(rng.standard_normal((BSZ, SEQ, HEADS, N)), jnp.float32)
    cs = jnp.asarray(rng.standard_normal((BSZ, HEADS, N, N)), jnp.float32)

    def loss(fn, *xs):
        o, s = fn(*xs, reset)
        return jnp.sum(o * co) + jnp.sum(s * cs)

    argnums = tuple(range(7))
    grads = jax.grad(functools.partial(loss, sharded), argnums)(*x)
    ref = jax.grad(
        functools.partial(loss, lambda *xs: wkv7(*xs[:7], reset=xs[7], impl="reference")), argnums
    )(*x)
    for label, g, gr in zip(("r", "log_w", "k", "v", "a", "b", "s0"), grads, ref, strict=True):
        assert rel_err(g, gr) <= 1e-4, (label, rel_err(g, gr))


def test_only_block_summaries_cross_devices():
    """The compiled program's only collectives are the all-gathers of the [B,H,N,N] block summaries (A, S⁰):
    no activation of another block is ever fetched."""
    x = make_case("realistic", BSZ, SEQ, HEADS, N, seed=2)
    hlo = _sharded(_chunked, 4).lower(*x, jnp.asarray(_resets())).compile().as_text()
    collectives = [
        line.split("=")[1].split("{")[0].strip()
        for line in hlo.splitlines()
        if re.search(r"= \S+ (all-gather|all-to-all|collective-permute|all-reduce)\(", line)
    ]
    assert collectives == [f"f32[4,{BSZ},{HEADS},{N},{N}]"] * 2, collectives

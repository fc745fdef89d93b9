"""wkv7 under a mesh: impl="pallas" wraps the kernel in ``jax.shard_map`` (batch and heads split, the sequence
whole), with the axes passed as ``partition=`` (the model's logical rules give them: ``wkv7_partition``); the chunked / reference forms run inside a user's
``shard_map(check_vma=True)`` with a zero initial state. Values against the independent float64 loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P
from wkv7_cases import make_case, numpy_recurrence, rel_err

from pallas_kernels import wkv7
from pallas_kernels.wkv7 import _kernel_partition
from wuneng_jax.layers.rwkv7_ops import wkv7_partition
from wuneng_jax.sharding import DEFAULT_RULES

TOL = 1e-5
MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def _mesh(shape=(2, 1, 4, 1)) -> Mesh:
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def test_partition_follows_the_logical_rules_and_divisibility():
    mesh = _mesh((2, 2, 2, 1)).abstract_mesh
    with nnx.logical_axis_rules(DEFAULT_RULES):
        rules = wkv7_partition()
    assert rules == (("data", "fsdp"), "tensor", "sequence")
    assert _kernel_partition(mesh, 4, 2, 16, rules) == (("data", "fsdp"), ("tensor",), ())  # sequence: size 1
    assert _kernel_partition(mesh, 2, 2, 16, rules) == (
        ("data",),
        ("tensor",),
        (),
    )  # fsdp does not divide B = 2 / 2
    assert _kernel_partition(mesh, 4, 3, 16, rules) == (("data", "fsdp"), (), ())  # 3 heads: not split
    # without rules no partition is passed: batch takes the mesh axes that divide it in order, heads the rest
    assert wkv7_partition() is None
    assert _kernel_partition(mesh, 2, 4, 16) == (("data",), ("fsdp", "tensor"), ())
    assert _kernel_partition(Mesh(np.array(jax.devices()[:1]), ("x",)).abstract_mesh, 2, 2, 16) is None
    # a sequence axis of size > 1 splits T when it divides it
    seq_mesh = _mesh((2, 1, 1, 4)).abstract_mesh
    assert _kernel_partition(seq_mesh, 2, 2, 16, rules) == (("data", "fsdp"), ("tensor",), ("sequence",))
    assert _kernel_partition(seq_mesh, 2, 2, 18, rules) == (
        ("data", "fsdp"),
        ("tensor",),
        (),
    )  # 4 does not divide T = 18


def test_pallas_under_a_mesh_is_shard_mapped_and_exact():
    x = make_case("generic_dplr", 2, 40, 4, 16, seed=3)
    reset = np.zeros((2, 40), bool)
    reset[1, 17] = True
    o_np, s_np = numpy_recurrence(*x, reset=reset)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        partition = wkv7_partition()
    fn = jax.jit(functools.partial(wkv7, impl="pallas", chunk_size=16, partition=partition))
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(fn)(*x, reset=reset))
        o, s = fn(*x, reset=jnp.asarray(reset))
    assert "shard_map" in jaxpr
    assert rel_err(o, o_np) <= TOL and rel_err(s, s_np) <= TOL
    assert "shard_map" not in str(jax.make_jaxpr(fn)(*x, reset=reset))  # no mesh: unchanged
    with pytest.raises(
        ValueError,
        match=r"partition must be \(batch_axes, head_axes\) or \(batch_axes, head_axes, sequence_axes\)",
    ):
        wkv7(*x, partition="data")


def test_pallas_gradients_under_a_mesh_match_the_reference():
    x = make_case("realistic", 2, 16, 2, 16, seed=5)

    def loss(impl, *args):
        chunk = 16 if impl == "pallas" else None
        o, s = wkv7(*args, impl=impl, chunk_size=chunk, partition=wkv7_partition())
        return jnp.sum(o * o) + jnp.sum(s * s)

    argnums = tuple(range(7))
    ref = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums))(*x)
    with jax.set_mesh(_mesh((2, 1, 2, 1))), nnx.logical_axis_rules(DEFAULT_RULES):
        got = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums))(*x)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) <= 1e-4


def test_chunked_and_reference_inside_user_shard_map_with_zero_state():
    """initial_state=None inside shard_map(check_vma=True): the zero state must vary like the inputs."""
    x = make_case("realistic", 2, 12, 4, 16, seed=7, zero_state=True)[:6]
    o_np, s_np = numpy_recurrence(*x, np.zeros((2, 4, 16, 16)))
    mesh = _mesh()
    act, st = P("data", None, "tensor", None), P("data", "tensor")
    for impl in ("chunked", "reference"):
        fn = jax.shard_map(
            functools.partial(wkv7, impl=impl),
            mesh=mesh,
            in_specs=(act,) * 6,
            out_specs=(act, st),
            check_vma=True,
        )
        o, s = jax.jit(fn)(*x)
        assert rel_err(o, o_np) <= TOL and rel_err(s, s_np) <= TOL, impl

"""Mesh construction, DCN-aware device order, rules -> shardings, and sharded initialisation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from train.config import DistributedConfig, MeshConfig, OptimizerConfig
from train.mesh import (
    MeshError,
    build_device_array,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    resolve_axis_sizes,
)
from train.optimizer import make_optimizer
from train.state import init_state, make_layout
from train.train_step import check_batch_shape
from wuneng_jax.config import load_model_config
from wuneng_jax.models import build_model
from wuneng_jax.sharding import DEFAULT_RULES


def test_resolve_axis_sizes():
    assert resolve_axis_sizes((-1, 2, 2, 1), 8) == (2, 2, 2, 1)
    assert resolve_axis_sizes((1, 8, 1, 1), 8) == (1, 8, 1, 1)
    with pytest.raises(MeshError, match="has 6 devices but 8 are available"):
        resolve_axis_sizes((3, 2, 1, 1), 8)
    with pytest.raises(MeshError, match="does not divide the 8 devices"):
        resolve_axis_sizes((3, -1, 1, 1), 8)


def test_make_mesh_axes_and_types():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "fake"


def test_multislice_order_keeps_each_slice_on_one_dcn_index():
    # 2 slices of 4 devices, ids interleaved so a naive reshape would mix slices
    devices = [FakeDevice(i, slice_index=i % 2, process_index=i % 2) for i in range(8)]
    arr = build_device_array(MeshConfig(data=2, fsdp=4), devices)
    assert arr.shape == (2, 4, 1, 1)
    for k in range(2):
        assert {d.slice_index for d in arr[k].flat} == {k}
    # the DCN factor can be taken from another axis; data=1 cannot hold 2 slices
    arr = build_device_array(MeshConfig(data=1, fsdp=4, tensor=2, dcn_axis="tensor"), devices)
    for t in range(2):
        assert {d.slice_index for d in arr[:, :, t].flat} == {t}
    with pytest.raises(MeshError, match="mesh.data=1 is not a multiple of 2"):
        build_device_array(MeshConfig(data=1, fsdp=8), devices)
    # hosts as granules (GPU nodes): fsdp across 2 hosts
    hosts = [FakeDevice(i, slice_index=0, process_index=i // 4) for i in range(8)]
    arr = build_device_array(MeshConfig(data=1, fsdp=8, dcn_granule="process", dcn_axis="fsdp"), hosts)
    assert [d.process_index for d in arr.flat] == [0] * 4 + [1] * 4


def test_rules_to_specs():
    assert logical_to_spec(("activation_batch", "activation_length"), DEFAULT_RULES) == PartitionSpec(
        ("data", "fsdp"), "sequence"
    )
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == PartitionSpec(("fsdp", "sequence"), "tensor")
    assert logical_to_spec(("norm",), DEFAULT_RULES) == PartitionSpec(None)


def _expected_spec(names, rules):
    table = dict(rules)
    out = []
    for n in names:
        axes = table.get(n) if n is not None else None
        out.append(axes)
    return PartitionSpec(*out)


def test_sharded_init_places_every_parameter_by_the_rules():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    model_cfg = load_model_config("qwen2_tiny")
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    build = lambda rngs: build_model(model_cfg, rngs=rngs)
    layout = make_layout(build, tx, mesh, DEFAULT_RULES, seed=0)
    state = init_state(build, tx, mesh, DEFAULT_RULES, 0, layout)
    leaves = jax.tree_util.tree_leaves_with_path(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    n_sharded = 0
    for path, var in leaves:
        names = var.get_metadata()["out_sharding"]
        arr = var.get_value()
        want = _expected_spec(names, DEFAULT_RULES)
        assert arr.sharding.spec == want, jax.tree_util.keystr(path)
        # each device holds exactly its block: global size / number of shards
        n_shards = 1
        for axes in want:
            if axes is not None:
                n_shards *= int(
                    np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)])
                )
        for shard in arr.addressable_shards:
            assert shard.data.size * n_shards == arr.size
        n_sharded += n_shards > 1
    assert n_sharded >= 10
    # Adam moments are sharded like their parameters
    mu = state.opt_state[1].mu  # chain: (clip, adam, decay, schedule)
    # (stacked layers: a leading, unsharded `layers` axis)
    assert mu["layers"]["blocks"][0][0]["mlp"]["up_proj"][
        "kernel"
    ].get_value().sharding.spec == PartitionSpec(None, ("fsdp", "sequence"), "tensor")


def test_indivisible_parameter_and_batch_give_clear_errors():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    model_cfg = dataclasses.replace(load_model_config("qwen2_tiny"), hidden_size=36, num_heads=2, head_dim=18)
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    with pytest.raises(
        MeshError, match=r"parameter .*size 36.*not divisible by mesh axes \('fsdp', 'sequence'\)"
    ):
        make_layout(lambda rngs: build_model(model_cfg, rngs=rngs), tx, mesh, DEFAULT_RULES, 0)
    with pytest.raises(MeshError, match="micro-batch of 4 rows"):
        check_batch_shape(8, 16, 2, mesh, DEFAULT_RULES)


def test_single_process_needs_no_distributed_start(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed(DistributedConfig()) is False
    assert (
        initialize_distributed(DistributedConfig(coordinator_address="x:1", num_processes=1, process_id=0))
        is False
    )

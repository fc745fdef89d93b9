"""Orbax checkpoints: exact round trip onto another mesh, retention, mismatch and corruption errors,
and atomicity (a crash mid-save leaves the previous checkpoint restorable)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from train_support import PYTHON, REPO, subprocess_env

from train.checkpoint import Checkpointer, CheckpointError, check_compatible
from train.config import CheckpointConfig, MeshConfig, OptimizerConfig
from train.mesh import make_mesh
from train.optimizer import make_optimizer
from train.state import StateLayout, TrainState, init_state, make_layout, param_shapes
from wuneng_jax.config import config_to_dict, load_model_config
from wuneng_jax.models import build_model
from wuneng_jax.sharding import DEFAULT_RULES as RULES

SYNC = CheckpointConfig(interval=1, keep_last=3, async_save=False)


def _small_state(mesh, value: float = 1.0) -> tuple[TrainState, StateLayout]:
    """A model-free TrainState (plain dict params) sharded over ``mesh``."""
    sh = NamedSharding(mesh, PartitionSpec("fsdp", None))
    rep = NamedSharding(mesh, PartitionSpec())
    params = {
        "w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * value, sh),
        "b": jax.device_put(jnp.ones(4), rep),
    }
    tx, _ = make_optimizer(OptimizerConfig(weight_decay=0.0), 10)
    state = TrainState(
        step=jnp.array(0, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rest={},
        rng=jnp.array([1, 2], jnp.uint32),
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, StateLayout(graphdef=None, abstract=abstract, shardings=shardings)


META = {"model_config": {"family": "toy", "width": 4}, "param_shapes": {"w": [8, 4], "b": [4]}}


def test_round_trip_onto_another_mesh_is_exact(tmp_path):
    model_cfg = dataclasses.replace(load_model_config("qwen2_tiny"), num_layers=1, vocab_size=128)
    build = lambda rngs: build_model(model_cfg, rngs=rngs)
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    mesh8 = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    layout8 = make_layout(build, tx, mesh8, RULES, seed=3)
    state = init_state(build, tx, mesh8, RULES, 3, layout8)
    state = state.replace(step=jnp.array(7, jnp.int32))
    meta = {"model_config": config_to_dict(model_cfg), "param_shapes": param_shapes(state.params)}
    ck = Checkpointer(tmp_path / "ckpt", CheckpointConfig(interval=1, async_save=True))
    assert ck.save(7, state, {"next_index": 56}, meta)
    ck.wait()
    # restore onto a different layout: fsdp=8 over the same devices
    mesh_b = make_mesh(MeshConfig(data=1, fsdp=8))
    layout_b = make_layout(build, tx, mesh_b, RULES, seed=3)
    restored = Checkpointer(tmp_path / "ckpt", SYNC).restore(7, layout_b, meta)
    assert restored.step == 7 and restored.data_state == {"next_index": 56}
    assert int(restored.state.step) == 7
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(layout_b.shardings), strict=True):
        assert got.sharding.spec == want.spec
    ck.close()


def test_retention_keeps_last_n_and_every_k(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state, _ = _small_state(mesh)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, keep_last=2, keep_every=4, async_save=True))
    for step in range(1, 10):
        ck.save(step, state, {"next_index": step}, META)
    ck.close()
    assert Checkpointer(tmp_path, SYNC).all_steps() == [4, 8, 9]


def test_mismatched_model_names_the_field(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state, layout = _small_state(mesh)
    ck = Checkpointer(tmp_path, SYNC)
    ck.save(1, state, {}, META)
    wrong = {**META, "model_config": {"family": "toy", "width": 8}}
    with pytest.raises(
        CheckpointError, match=r"different model: model.width: checkpoint has 4, config has 8"
    ):
        ck.restore(1, layout, wrong)
    wrong_shape = {**META, "param_shapes": {"w": [8, 5], "b": [4]}}
    with pytest.raises(
        CheckpointError, match=r"parameter w has shape \[8, 4\] in the checkpoint but \[8, 5\]"
    ):
        ck.restore(1, layout, wrong_shape)
    # compute-only fields (dtype, remat) may change between runs
    check_compatible({"model_config": {"dtype": "float32"}}, {"model_config": {"dtype": "bfloat16"}}, "x")
    ck.close()


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state, layout = _small_state(mesh)
    ck = Checkpointer(tmp_path, SYNC)
    ck.save(1, state, {}, META)
    ck.save(2, state, {}, META)
    ck.close()
    # destroy step 2's array data (keep its directory, as a disk error or a partial copy would)
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f.relative_to(tmp_path / "2" / "state")):
            f.write_bytes(b"garbage")
    ck = Checkpointer(tmp_path, SYNC)
    with pytest.raises(CheckpointError, match=r"step 2 .* corrupt .* delete .*2 to resume from step 1"):
        ck.restore(2, layout, META)
    shutil.rmtree(tmp_path / "2" / "meta")
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        ck.restore(2, layout, META)
    restored = ck.restore(1, layout, META)  # the older one is intact
    np.testing.assert_array_equal(np.asarray(restored.state.params["w"]), np.asarray(state.params["w"]))
    ck.close()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, jax.numpy as jnp
    from train.checkpoint import Checkpointer, IteratorStateHandler
    from train.config import CheckpointConfig, MeshConfig
    from train.mesh import make_mesh
    from test_checkpoint import _small_state, META

    ck = Checkpointer(sys.argv[1], CheckpointConfig(interval=1, async_save=True))
    state, _ = _small_state(make_mesh(MeshConfig(data=1, fsdp=8)), value=1.0)
    ck.save(1, state, {"next_index": 8}, META)
    ck.wait()
    # step 2: the process dies while the checkpoint is being written (after the arrays started,
    # before the data item is written and the step directory is finalised)
    real_save = IteratorStateHandler.save
    def crash(self, directory, args):
        os._exit(17)
    IteratorStateHandler.save = crash
    state2, _ = _small_state(make_mesh(MeshConfig(data=1, fsdp=8)), value=2.0)
    ck.save(2, state2, {"next_index": 16}, META)
    ck.wait()
    print("not reached")
    """
)


def test_crash_mid_save_leaves_previous_checkpoint_restorable(tmp_path):
    ckdir = tmp_path / "ckpt"
    proc = subprocess.run(
        [PYTHON, "-c", CRASH_SCRIPT, str(ckdir)],
        env=subprocess_env(8),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert "not reached" not in proc.stdout
    leftovers = [p.name for p in ckdir.iterdir() if p.name.startswith("2")]
    assert leftovers and all(name != "2" for name in leftovers)  # only a temporary directory
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state, layout = _small_state(mesh, value=1.0)
    ck = Checkpointer(ckdir, SYNC)
    assert ck.latest_step() == 1
    restored = ck.restore(1, layout, META)
    assert restored.data_state == {"next_index": 8}
    np.testing.assert_array_equal(np.asarray(restored.state.params["w"]), np.asarray(state.params["w"]))
    ck.close()

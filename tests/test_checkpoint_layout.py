"""Run directories written before the layers were stacked still restore: the per-layer arrays of the
saved state (parameters and optimizer moments) are restacked into the scanned layer stack, and the model
gives the logits the old code computed from the same checkpoint (``tests/golden/prestack_<family>``,
written by ``tests/golden/make_prestack_runs.py`` with the pre-stack code)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx

from train.checkpoint import Checkpointer, CheckpointError
from train.config import load_config
from train.trainer import Trainer

GOLDEN = Path(__file__).resolve().parent / "golden"


def _restore(trainer: Trainer):
    ckpt = Checkpointer(trainer.run_dir / "checkpoints", trainer.cfg.checkpoint)
    try:
        return ckpt.restore(2, trainer.layout, trainer._meta())
    finally:
        ckpt.close()


def _raw_state(trainer: Trainer):
    """The saved state in its own (per-layer) structure, read by orbax without a target."""
    mgr = ocp.CheckpointManager((trainer.run_dir / "checkpoints").resolve(), item_names=("state",))
    try:
        return mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mgr.close()


def _trainer(family: str, tmp_path: Path, **model_overrides) -> Trainer:
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / f"prestack_{family}" / "run", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run_dir"] = str(run)
    cfg["mesh"] = {"data": 4, "fsdp": 2}  # written on one device, restored onto eight
    cfg["model"].update(model_overrides)
    return Trainer(load_config(cfg))


@pytest.mark.parametrize("family", ["wuneng", "rwkv7"])
def test_prestack_run_restores_into_the_stacked_layout(family, tmp_path):
    trainer = _trainer(family, tmp_path)
    model_cfg = trainer.model_cfg
    restored = _restore(trainer)
    assert int(restored.step) == 2 and int(restored.state.step) == 2
    model = nnx.merge(trainer.layout.graphdef, restored.state.params, restored.state.rest)
    stacks = model.layers if family == "wuneng" else model.blocks
    assert len(stacks.groups) == 2  # wuneng: layer 0 plain + hybrid 1-2; rwkv7: layer 0 + blocks 1-2
    gold = np.load(GOLDEN / f"prestack_{family}" / "logits.npz")
    got = np.asarray(model(jnp.asarray(gold["tokens"])))
    np.testing.assert_allclose(got, gold["logits"], rtol=0, atol=2e-5 * np.abs(gold["logits"]).max())
    # the optimizer moments were restacked too: each layer's slice is that layer's saved array
    raw = _raw_state(trainer)
    prefix, suffix = (
        ("layers", ("self_attn", "q_proj", "kernel")) if family == "wuneng" else ("blocks", ("att", "key"))
    )
    for i in (1, 2):
        g, j, r = stacks.locate(i)
        for moment in ("mu", "nu"):
            old = raw["opt_state"][1][moment][prefix][str(i)]
            for part in suffix:
                old = old[part]
            new = getattr(restored.state.opt_state[1], moment)[prefix]["blocks"][g][j]
            for part in suffix:
                new = new[part]
            np.testing.assert_array_equal(np.asarray(new.get_value())[r], np.asarray(old["value"]))
            assert np.abs(np.asarray(old["value"])).max() > 0
    assert model_cfg.family == family


def test_prestack_run_for_another_model_is_refused(tmp_path):
    trainer = _trainer("wuneng", tmp_path, intermediate_size=48)
    with pytest.raises(CheckpointError, match="different model"):
        _restore(trainer)

"""``compiled_step``: ``wuneng train`` runs a train step saved by ``wuneng compile --save``
(``train.aot.executable``). The saved step here is compiled for this host's 8 CPU devices by the same code
``wuneng compile`` uses for a slice (``train.aot.compile.compile_host``), tagged with the host platform; the
run with it gives the same losses as the run that compiles its own step, and a saved step that differs from
the run in target, mesh, versions or any step-relevant config value is refused with every difference named.
"""

from __future__ import annotations

import pickle

import pytest
from train_support import make_store, tiny_config, train_losses

from train.aot.compile import compile_host
from train.aot.executable import compare_meta, read_executable_meta, step_meta
from train.config import ConfigError, from_dict
from train.trainer import Trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(tmp dir, token store, path of the saved step, its config dict)."""
    tmp = tmp_path_factory.mktemp("compiled_step")
    store = make_store(tmp / "store")
    raw = tiny_config(tmp / "compile_run", store, steps=3)
    path = tmp / "step.aot"
    compile_host(from_dict(raw), save=path)
    return tmp, store, path, raw


def _with_meta(src, dst, edit):
    with open(src, "rb") as f:
        blob = pickle.load(f)
    edit(blob["meta"])
    with open(dst, "wb") as f:
        pickle.dump(blob, f)
    return dst


def test_saved_step_trains_like_the_compiled_one(saved):
    tmp, store, path, _ = saved
    meta = read_executable_meta(path)
    assert meta["target"]["platform"] == "cpu" and meta["target"]["num_devices"] == 8
    assert meta["mesh"]["shape"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert meta["signature"]["seq_len"] == 32 and meta["signature"]["stage"]["kind"] == "pretrain"
    lines = []
    ref = Trainer(from_dict(tiny_config(tmp / "ref", store, steps=3)), echo=lambda s: None).run()
    run = Trainer(
        from_dict(tiny_config(tmp / "aot", store, steps=3, compiled_step=str(path))), echo=lines.append
    ).run()
    assert run.final_step == 3 and len(run.losses) == 3
    assert run.losses == pytest.approx(ref.losses, rel=1e-6, abs=0)
    assert train_losses(tmp / "aot") == pytest.approx(train_losses(tmp / "ref"), rel=1e-6)


@pytest.mark.parametrize(
    "override, expect",
    [
        ({"seq_len": 64}, r"config\.seq_len: compiled 32, this run 64"),
        ({"global_batch_size": 16}, r"config\.global_batch_size: compiled 8, this run 16"),
        ({"model__num_layers": 2}, r"config\.model\.num_layers: compiled 1, this run 2"),
        ({"optimizer__lr": 3e-3}, r"config\.optimizer\.lr: compiled 0\.01, this run 0\.003"),
        ({"loss_vocab_tile": 64, "z_loss": 1e-4}, r"config\.loss_vocab_tile.*\n.*config\.z_loss"),
        ({"mesh": {"data": 1, "fsdp": 8, "tensor": 1}}, r"mesh\.data: compiled 2, this run 1"),
    ],
)
def test_a_run_that_differs_is_refused_naming_what_differs(saved, override, expect):
    tmp, store, path, _ = saved
    raw = tiny_config(tmp / "differs", store, steps=3, compiled_step=str(path), **override)
    with pytest.raises(ConfigError, match=r"(?s)compiled for another run.*" + expect):
        Trainer(from_dict(raw), echo=lambda s: None)


@pytest.mark.parametrize(
    "edit, expect",
    [
        (
            lambda m: m["target"].update(platform="tpu", device_kind="TPU v5"),
            r"target\.device_kind: compiled \"TPU v5\"",
        ),
        (lambda m: m["target"].update(num_devices=64), r"target\.num_devices: compiled 64, this run 8"),
        (lambda m: m["versions"].update(jax="0.0.1"), r"versions\.jax: compiled \"0\.0\.1\""),
        (lambda m: m["mesh"].update(device_ids=m["mesh"]["device_ids"][::-1]), r"mesh device order"),
        (
            lambda m: m["signature"].update(remat="full"),
            r"config\.remat: compiled \"full\", this run \"none\"",
        ),
    ],
)
def test_a_step_compiled_for_another_target_is_refused(saved, edit, expect):
    tmp, store, path, raw = saved
    other = _with_meta(path, tmp / "other.aot", edit)
    cfg = from_dict({**raw, "run_dir": str(tmp / "other_run"), "compiled_step": str(other)})
    with pytest.raises(ConfigError, match=expect):
        Trainer(cfg, echo=lambda s: None)


def test_topology_names_are_compared_when_both_sides_know_them(saved):
    _, _, path, raw = saved
    meta = read_executable_meta(path)
    from train.mesh import make_mesh

    cfg = from_dict(raw)
    from train.config import resolve_model_config

    run = step_meta(
        cfg, resolve_model_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat), make_mesh(cfg.mesh)
    )
    assert compare_meta(meta, run) == []
    named = {**meta, "target": {**meta["target"], "topology": "v5p:2x2x1"}}
    assert compare_meta(named, run) == []  # a TPU host does not name its slice
    run["target"]["topology"] = "v5p:2x2x2"
    assert compare_meta(named, run) == ['target.topology: compiled "v5p:2x2x1", this run "v5p:2x2x2"']


def test_distill_and_trainable_selection_are_refused(saved, tmp_path):
    tmp, store, path, raw = saved
    from train.aot.executable import SavedStepError, check_stage
    from train.upcycle.stage import StagePlan

    plan = StagePlan("distill", None)
    plan.teacher = object()
    plan.make_objective = lambda g: None
    with pytest.raises(SavedStepError, match=r"stage 'distill'.*frozen teacher.*pretrain or sft"):
        check_stage(plan)
    cfg = from_dict(
        {**raw, "run_dir": str(tmp_path / "r"), "compiled_step": str(path), "stage": {"freeze": ["mlp"]}}
    )
    with pytest.raises(ConfigError, match=r"stage\.trainable / stage\.freeze"):
        Trainer(cfg, echo=lambda s: None)


def test_not_a_saved_step(saved, tmp_path):
    _, _, _, raw = saved
    junk = tmp_path / "junk.aot"
    junk.write_text("not a pickle")
    for p, expect in ((junk, "not a compiled step"), (tmp_path / "missing.aot", "no such file")):
        cfg = from_dict({**raw, "run_dir": str(tmp_path / "r"), "compiled_step": str(p)})
        with pytest.raises(ConfigError, match=expect):
            Trainer(cfg, echo=lambda s: None)

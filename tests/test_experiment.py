"""The research-suite runner (train.experiments): the CI preset end to end (partial run + resume),
resume of an interrupted run from its checkpoint, an independent re-computation of a reported
accuracy, parameter matching, the report files, the CLI and config errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from train.cli import main as cli_main
from train.data import synthetic as syn
from train.experiments import params as params_lib
from train.experiments.runner import RESULT_FILE, heldout, load_result, run_experiment, setup
from train.experiments.spec import ExperimentError, load_experiment

REPO = Path(__file__).resolve().parents[1]
CI_PRESET = REPO / "configs" / "experiments" / "ci.yaml"


def _ci_raw(out_dir: Path) -> dict:
    raw = yaml.safe_load(CI_PRESET.read_text())
    raw["out_dir"] = str(out_dir)
    return raw


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The CI preset, run in two sessions: the first stops after 3 of its 4 runs, the second resumes."""
    out = tmp_path_factory.mktemp("experiment")
    spec = load_experiment(_ci_raw(out))
    lines: list[str] = []
    first = run_experiment(spec, max_runs=3, echo=lines.append)
    runs, _ = setup(spec, echo=lines.append)
    stamps = {r.key: (Path(r.run_dir) / RESULT_FILE).stat().st_mtime_ns for r in runs if load_result(r)}
    second = run_experiment(spec, echo=lines.append)
    return {"spec": spec, "runs": runs, "first": first, "second": second, "stamps": stamps, "lines": lines}


def test_partial_run_then_resume(done):
    assert done["first"]["ran"] == 3 and done["first"]["remaining"] == 1
    assert done["second"]["skipped"] == 3 and done["second"]["ran"] == 1 and done["second"]["remaining"] == 0
    for r in done["runs"]:  # finished runs were skipped, not redone
        if r.key in done["stamps"]:
            assert (Path(r.run_dir) / RESULT_FILE).stat().st_mtime_ns == done["stamps"][r.key]
    assert any("[4/4]" in line and "ETA" in line for line in done["lines"])  # progress lines


def test_report_files(done):
    out = Path(done["spec"].out_dir)
    rows = json.loads((out / "results.json").read_text())
    assert rows["runs_done"] == rows["runs_total"] == 4
    keys = {(r["task"], r["seq_len"], r["variant"], r["seed"]) for r in rows["runs"]}
    assert keys == {(t, 16, v, 0) for t in ("mqar", "s3") for v in ("qwen2", "wuneng_full")}
    for r in rows["runs"]:
        assert r["steps"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["train_loss"])
        assert r["scored"] == (16 * 2 if r["task"] == "mqar" else 16 * 16)  # 16 held-out examples
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("task,kind,seq_len,variant")
    summary = (out / "summary.md").read_text()
    assert "| wuneng_full |" in summary and "## Task `s3`" in summary and "last position" in summary
    for name in ("accuracy_vs_seq_len.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_matched_parameter_counts(done):
    table = json.loads((Path(done["spec"].out_dir) / "params.json").read_text())
    by = {r["variant"]: r for r in table}
    ref = by["wuneng_full"]["params"]
    assert abs(by["qwen2"]["params"] - ref) / ref <= 0.05
    # the tuned width is the best multiple of 8: its neighbours are no closer to the reference
    from wuneng_jax.config import count_params, load_model_config

    model = dict(done["runs"][0].model)
    assert model["family"] == "qwen2"
    assert count_params(load_model_config(model)) == by["qwen2"]["params"]
    i = model["intermediate_size"]
    for j in (i - 8, i + 8):
        n = count_params(load_model_config({**model, "intermediate_size": j}))
        assert abs(n - ref) >= abs(by["qwen2"]["params"] - ref)


def test_reported_accuracy_recomputed_independently(done):
    """Restore one run's final parameters and score fresh eval-stream examples with a plain forward pass."""
    from flax import nnx

    from train import checkpoint as ckpt_lib
    from train.config import load_config
    from train.trainer import Trainer

    run = next(r for r in done["runs"] if r.task.name == "s3" and r.variant == "qwen2")
    res = load_result(run)
    cfg = load_config(run.train_cfg)
    trainer = Trainer(cfg, data_factory=lambda t: (None, None), echo=lambda s: None)
    ck = ckpt_lib.Checkpointer(Path(run.run_dir) / "checkpoints", cfg.checkpoint)
    state = ck.restore(ck.latest_step(), trainer.layout, trainer._meta()).state
    ck.close()
    params, rest = jax.device_get(state.params), jax.device_get(state.rest)
    forward = jax.jit(lambda p, r, x: nnx.merge(trainer.layout.graphdef, p, r)(x))
    task = syn.StateTracking(seq_len=16, group="S3")
    src = syn.TaskSource(task, run.eval_seed, syn.EVAL_STREAM, length=run.eval_examples)
    rows = [src[i] for i in range(run.eval_examples)]
    logits = np.asarray(forward(params, rest, np.stack([r["tokens"] for r in rows])))
    pred = logits.argmax(-1)
    targets = np.stack([r["targets"] for r in rows])
    assert res["accuracy"] == np.mean(pred == targets)  # every position scored
    assert res["last_accuracy"] == np.mean(pred[:, -1] == targets[:, -1])
    assert res["seq_accuracy"] == np.mean((pred == targets).all(axis=1))


def test_interrupted_run_resumes_from_checkpoint(done):
    """Drop a finished run's result and newest checkpoint (as if killed after step 2): the runner resumes
    it from step 2 and reproduces the uninterrupted result."""
    spec, runs = done["spec"], done["runs"]
    run = next(r for r in runs if r.task.name == "mqar" and r.variant == "qwen2")
    before = load_result(run)
    rd = Path(run.run_dir)
    (rd / RESULT_FILE).unlink()
    shutil.rmtree(rd / "checkpoints" / "4")
    summary = run_experiment(spec, echo=lambda s: None)
    assert summary["ran"] == 1 and summary["skipped"] == 3
    after = load_result(run)
    assert after["steps_this_session"] == 2
    assert "(step 2)" in (rd / "train.log").read_text()
    for k in ("accuracy", "last_accuracy", "seq_accuracy", "scored"):
        assert after[k] == before[k], k
    assert after["ce"] == pytest.approx(before["ce"], rel=1e-6)
    assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-6)


def test_cli_dry_run_lists_the_grid(done, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_ci_raw(Path(done["spec"].out_dir))))
    assert cli_main(["experiment", str(path), "--dry-run", "seeds=[0,1]"]) == 0
    text = capsys.readouterr().out
    assert text.count(" done ") == 4 and text.count(" todo ") == 4 and "8 runs" in text
    assert "wuneng_full" in text and "(reference)" in text


def test_lm_task_data(tmp_path):
    """The language-modelling task: a token store from the embedded corpus, held-out rows from its eval split."""
    raw = _ci_raw(tmp_path / "exp")
    raw["tasks"] = {
        "lm": {
            "kind": "lm",
            "seq_lens": [32],
            "store": str(tmp_path / "store"),
            "prepare": ["stdlib"],
            "stdlib_max_files": 8,
            "stdlib_max_bytes": 60_000,
            "eval_fraction": 0.25,
            "eval_batches": 2,
        }
    }
    spec = load_experiment(raw)
    runs, table = setup(spec, echo=lambda s: None)
    assert {r["vocab_size"] for r in table} == {320}  # 258 byte-level ids, rounded up to 64
    assert runs[0].model["vocab_size"] == 320
    batches = heldout(runs[0], 8)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (8, 32)
    b = batches[0]
    live = b["loss_mask"] > 0
    assert live.any() and (b["targets"][:, :-1][live[:, :-1]] == b["tokens"][:, 1:][live[:, :-1]]).all()


def test_each_synthetic_task_has_its_own_vocabulary_and_matching(tmp_path):
    """A joint-layout MQAR (hundreds of pair tokens) next to a word problem (6 tokens): each task's models get
    that task's vocabulary rounded up to 8, and the parameter matching is done per vocabulary."""
    raw = _ci_raw(tmp_path / "exp")
    raw["tasks"]["mqar"].update(joint=True, num_keys=8, num_values=5)  # 1 + 8 + 5 + 40 = 54 ids
    runs, table = setup(load_experiment(raw), echo=lambda s: None)
    by_task = {r.task.name: r.model["vocab_size"] for r in runs}
    assert by_task == {"mqar": 56, "s3": 8}
    assert {r["vocab_size"] for r in table} == {56, 8}
    from wuneng_jax.config import count_params, load_model_config

    for vocab in (56, 8):
        rows = {r["variant"]: r["params"] for r in table if r["vocab_size"] == vocab}
        ref = rows["wuneng_full"]
        assert abs(rows["qwen2"] - ref) / ref <= 0.05
    for r in runs:
        assert count_params(load_model_config(r.model)) == next(
            t["params"]
            for t in table
            if t["vocab_size"] == r.model["vocab_size"] and t["variant"] == r.variant
        )


def test_worker_processes_get_single_threaded_xla_and_the_environment_is_restored(monkeypatch):
    from train.experiments.runner import SINGLE_THREAD_XLA_FLAGS, single_threaded_children

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with single_threaded_children():
        flags = os.environ["XLA_FLAGS"].split()
        assert flags[0] == "--xla_force_host_platform_device_count=8"
        assert flags[1:] == SINGLE_THREAD_XLA_FLAGS.split()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.delenv("XLA_FLAGS")
    with pytest.raises(RuntimeError), single_threaded_children():
        assert os.environ["XLA_FLAGS"] == SINGLE_THREAD_XLA_FLAGS
        raise RuntimeError  # restored on the way out of an error too
    assert "XLA_FLAGS" not in os.environ


def test_config_errors(tmp_path):
    raw = _ci_raw(tmp_path)
    with pytest.raises(ExperimentError, match="params.reference"):
        load_experiment({**raw, "params": {"reference": "nope"}})
    with pytest.raises(ExperimentError, match="train.seq_len"):
        load_experiment({**raw, "train": {**raw["train"], "seq_len": 8}})
    with pytest.raises(ExperimentError, match="tasks.mqar"):
        load_experiment(raw, ["tasks.mqar.num_pairs=9"])  # 9 pairs > 8 keys
    with pytest.raises(ExperimentError, match="eval.examples"):
        load_experiment(raw, ["eval.examples=12"])
    with pytest.raises(ExperimentError, match="variants.qwen2.vocab_size"):
        load_experiment(raw, ["variants.qwen2.vocab_size=64"])
    with pytest.raises(ExperimentError, match="tasks.mqar.train.seq_len"):
        load_experiment(raw, ["tasks.mqar.train={seq_len: 16}"])
    with pytest.raises(ExperimentError, match="tasks.mqar.train"):
        load_experiment(raw, ["tasks.mqar.train={optimizer: {lr: -1}}"])
    # a per-task train override: merged into the shared train fields for that task's runs only
    spec = load_experiment(raw, ["tasks.mqar.train={steps: 6, optimizer: {lr: 0.003}}"])
    runs, _ = setup(spec, echo=lambda _: None)
    by_task = {r.task.name: r.train_cfg for r in runs}
    assert by_task["mqar"]["steps"] == 6 and by_task["mqar"]["optimizer"]["lr"] == 0.003
    assert by_task["mqar"]["optimizer"]["warmup_steps"] == raw["train"]["optimizer"]["warmup_steps"]
    other = [n for n in by_task if n != "mqar"]
    assert other and all(by_task[n]["steps"] == raw["train"]["steps"] for n in other)
    # --tasks: a subset of the grid, with the fingerprints of the whole file's runs
    sub, _ = setup(spec, echo=lambda _: None, only=["mqar"])
    assert {r.task.name for r in sub} == {"mqar"}
    assert {r.key: r.fingerprint for r in sub} == {
        r.key: r.fingerprint for r in runs if r.task.name == "mqar"
    }
    with pytest.raises(ExperimentError, match="--tasks"):
        setup(spec, echo=lambda _: None, only=["nope"])
    # a variant that cannot be matched: no tuning knob and far fewer parameters than the reference
    spec = load_experiment(raw, ["variants.qwen2.tune=null"])
    with pytest.raises(ExperimentError, match=r"variants.qwen2.*from the reference"):
        params_lib.match_all(spec, {"mqar": 24}, params_lib.CachedCounter())


def test_combined_task_and_upcycling_experiment_end_to_end(tmp_path):
    """CI size: the combined recall_state task for one variant only (per-task variant list) and the
    upcycling-value chain (qwen2 teacher -> align -> distill -> equal extra steps for both -> held-out CE)."""
    raw = _ci_raw(tmp_path / "exp")
    raw["variants"]["wuneng_full"]["init"] = "scratch"
    raw["tasks"] = {
        "both": {
            "kind": "recall_state",
            "seq_lens": [16],
            "num_pairs": 2,
            "num_keys": 8,
            "num_values": 8,
            "variants": ["qwen2"],
        }
    }
    raw["upcycle"] = {
        "data": {
            "store": str(tmp_path / "store"),
            "prepare": ["stdlib"],
            "stdlib_max_files": 6,
            "stdlib_max_bytes": 40_000,
            "eval_fraction": 0.25,
        },
        "eval_batches": 1,
        "seq_len": 16,
        "global_batch_size": 8,
        "teacher": {"model": dict(raw["shared"]["attention"]), "steps": 2, "lr": 1.0e-2},
        "student": {
            "fusion": "full",
            "decay_lora_rank": 8,
            "iclr_lora_rank": 8,
            "gate_lora_rank": 8,
            "middle_out_rank": 8,
            "wkv_impl": "reference",
        },
        "align": {"steps": 1, "lr": 1.0e-2},
        "distill": {"steps": 1, "lr": 1.0e-2},
        "continue": {"steps": 1, "lr": 1.0e-2},
    }
    spec = load_experiment(raw)
    lines: list[str] = []
    summary = run_experiment(spec, echo=lines.append)
    assert summary["ran"] == 2 and summary["remaining"] == 0  # one upcycle seed + one grid run
    out = Path(spec.out_dir)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["task"], r["variant"]) for r in runs] == [("both", "qwen2")]
    r = runs[0]
    assert 0 <= r["recall_accuracy"] <= 1 and 0 <= r["state_accuracy"] <= 1
    assert r["balanced_accuracy"] == pytest.approx((r["recall_accuracy"] + r["state_accuracy"]) / 2)
    up = json.loads((out / "upcycle.json").read_text())
    (res,) = up["results"]
    assert set(res["losses"]) == {"teacher", "upcycled", "wuneng_more", "teacher_more", "teacher_more_all"}
    assert all(np.isfinite(v) and 0 < v < 10 for v in res["losses"].values())
    assert res["tokens"] == {"teacher": 2 * 8 * 16, "upcycling": 2 * 8 * 16, "continue": 8 * 16}
    seed_dir = out / "upcycle" / "seed0"
    for name, step in (
        ("teacher", 2),
        ("upcycle/align", 1),
        ("upcycle/distill", 1),
        ("wuneng_more", 1),
        ("teacher_more", 1),
        ("teacher_more_all", 2),
    ):
        assert (seed_dir / name / "checkpoints" / str(step)).is_dir(), name
    text = (out / "summary.md").read_text()
    assert "## Upcycling value" in text and "balanced accuracy" in text and "| qwen2 |" in text
    assert "| wuneng_full |" not in text.split("## Task `both`")[1].split("## Upcycling")[0]
    for name in ("accuracy_bars.png", "upcycle_losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: nothing left to do
    again = run_experiment(spec, echo=lines.append)
    assert again["ran"] == 0 and again["skipped"] == 2

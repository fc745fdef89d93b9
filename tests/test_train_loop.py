"""The training loop end to end on the embedded corpus: preemption (SIGTERM) saves, a resumed run
reproduces the uninterrupted one step for step, the loss decreases, outputs are written, a mismatched
resume is refused, and a 2-process ``jax.distributed`` run (gloo) trains and checkpoints."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_support import (
    PYTHON,
    REPO,
    free_port,
    make_store,
    subprocess_env,
    tiny_config,
    train_losses,
    write_yaml,
)

from train.checkpoint import CheckpointError
from train.config import from_dict
from train.trainer import Trainer

EXTRA_STEPS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("data") / "stdlib")


def _sigterm_run(run_dir: Path, store: str, tmp_path: Path) -> tuple[int, str]:
    """Start `wuneng train` (10000 steps) in a subprocess, SIGTERM it once 2 steps are logged."""
    # an async checkpoint every step (keep 2): each save is followed by a step that donates the state
    cfg = write_yaml(
        tmp_path / "sig.yaml",
        tiny_config(run_dir, store, steps=10_000, checkpoint__interval=1, checkpoint__keep_last=2),
    )
    proc = subprocess.Popen(
        [PYTHON, "-m", "train.cli", "train", str(cfg)],
        env=subprocess_env(8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while len(train_losses(run_dir)) < 2:
            if proc.poll() is not None or time.time() > deadline:
                out = proc.communicate()[0] if proc.poll() is not None else ""
                pytest.fail(f"training subprocess did not start steps (rc={proc.poll()}):\n{out[-4000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    # 1. a run preempted by SIGTERM: it finishes its step, saves and exits cleanly
    _, out = _sigterm_run(tmp / "b", store, tmp)
    steps = sorted(int(p.name) for p in (tmp / "b" / "checkpoints").iterdir() if p.name.isdigit())
    first_part = train_losses(tmp / "b")
    last = max(first_part)
    assert steps == [last - 1, last], (steps, last)  # the SIGTERM save is the last step run
    # resume from the older one: it was written asynchronously while the next step ran on donated
    # buffers, so this also checks that an async save captures the state it was given
    shutil.rmtree(tmp / "b" / "checkpoints" / str(last))
    k = last - 1
    total = last + EXTRA_STEPS
    # 2. the uninterrupted reference run, with evals, a profiler window and a sample
    ref_cfg = from_dict(
        tiny_config(
            tmp / "a",
            store,
            steps=total,
            eval__interval=2,
            eval__at_end=True,
            eval__sample_tokens=8,
            log__tensorboard=True,
            profiler__start_step=2,
            profiler__num_steps=1,
        )
    )
    ref = Trainer(ref_cfg, echo=lambda s: None).run()
    # 3. the preempted run, resumed from its run directory
    resumed = Trainer(from_dict(tiny_config(tmp / "b", store, steps=total)), echo=lambda s: None).run()
    return {
        "k": k,
        "out": out,
        "first_part": first_part,
        "ref": ref,
        "resumed": resumed,
        "tmp": tmp,
        "total": total,
    }


def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_run(runs):
    k, ref, resumed = runs["k"], runs["ref"], runs["resumed"]
    assert "stop requested (SIGTERM)" in runs["out"]
    assert resumed.start_step == k and resumed.final_step == runs["total"]
    assert sorted(ref.losses) == list(range(1, runs["total"] + 1))
    # steps before the preemption (subprocess) and after the resume (this process) equal the
    # uninterrupted run's: same data order, same state
    for step, loss in runs["first_part"].items():
        assert loss == pytest.approx(ref.losses[step], abs=1e-6), step
    assert sorted(resumed.losses) == list(range(k + 1, runs["total"] + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(ref.losses[step], abs=1e-6), step
    diff = max(abs(loss - ref.losses[s]) for s, loss in {**runs["first_part"], **resumed.losses}.items())
    print(f"preempted at step {k + 1}, resumed from {k}: max |loss difference| {diff:.3g} vs uninterrupted")
    # the run directory's history reads as one run
    assert train_losses(runs["tmp"] / "b") == pytest.approx(ref.losses, abs=1e-6)


def test_loss_decreases_and_outputs_are_written(runs):
    ref = runs["ref"]
    losses = [ref.losses[s] for s in sorted(ref.losses)]
    assert losses[0] > 5.0  # ~ln(320) at initialisation
    assert losses[-1] < losses[0] - 0.5
    assert ref.eval_loss is not None and ref.eval_loss < losses[0]
    assert isinstance(ref.sample, str)
    run_dir = runs["tmp"] / "a"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "grad_norm", "lr", "skipped", "z_loss"} <= set(train[0])
    assert any("tokens_per_s" in r and "tflops_per_device" in r and "step_time_s" in r for r in train)
    assert all("mfu" not in r for r in train)  # CPU: no peak FLOP/s, MFU n/a
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals][:2] == [2, 4] and evals[-1]["step"] == runs["total"]
    assert list((run_dir / "profile").rglob("*.xplane.pb"))  # the profiler window
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    saved = (run_dir / "config.yaml").read_text()
    assert "family: qwen2" in saved and "hidden_size: 32" in saved  # the resolved model config
    assert (run_dir / "checkpoints" / str(runs["total"])).is_dir()  # final save


def test_resume_with_another_model_is_refused(runs, store):
    cfg = from_dict(
        tiny_config(runs["tmp"] / "b", store, steps=runs["total"] + 1, model__intermediate_size=96)
    )
    saved = (runs["tmp"] / "b" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"model.intermediate_size: checkpoint has 64, config has 96"):
        Trainer(cfg, echo=lambda s: None).run()
    assert (runs["tmp"] / "b" / "config.yaml").read_text() == saved  # a failed start keeps the run's config


WORKER = """
import sys
from train.config import load_config
from train.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
r = Trainer(cfg).run()
print("FINAL", r.final_step, flush=True)
"""


def test_two_process_distributed_run_trains_and_checkpoints(runs, store, tmp_path):
    """2 processes x 4 CPU devices (gloo), mesh data=2 (across hosts) x fsdp=2 x tensor=2."""
    run_dir = tmp_path / "mp"
    cfg = write_yaml(
        tmp_path / "mp.yaml",
        tiny_config(run_dir, store, steps=4, checkpoint__interval=2, mesh__dcn_granule="process"),
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                PYTHON,
                "-c",
                WORKER,
                str(cfg),
                f"distributed.coordinator_address=localhost:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ],
            env=subprocess_env(4),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
        assert "FINAL 4" in out
    ck = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2, 4]
    assert sorted(f.name for f in (ck / "4" / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # the same global batches as the 1-process run (rows split across hosts), same losses
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    diff = max(abs(loss - runs["ref"].losses[step]) for step, loss in losses.items())
    print(f"2-process vs 1-process: max |loss difference| {diff:.3g} over {len(losses)} steps")
    assert diff < 2e-5

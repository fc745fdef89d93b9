"""Interruptions and concurrent starts: Ctrl-C saves like SIGTERM and a second Ctrl-C aborts at once; a run
directory in use is refused naming the other process, a stale lock is taken over; a run whose steps stay
non-finite stops with the likely causes. The trainers here run a stub step (nothing to compile)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from train_support import PYTHON, REPO, free_port, stub_step_trainer, subprocess_env, tiny_config, write_yaml

from train.checkpoint import CheckpointError
from train.cli import main
from train.run_lock import RunLock, RunLockError
from train.signals import ABORT_EXIT_CODE, StopSignals
from train.trainer import TrainingDiverged


def _interrupt(n: int) -> None:
    if n == 3:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the watcher thread sets the flag


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by Ctrl-C before its third batch: ``(result, printed lines, run_dir)``; its seq_len
    is above the model's max_position_embeddings (64)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    trainer, lines = stub_step_trainer(run_dir, steps=50, seq_len=128, on_batch=_interrupt)
    return trainer.run(), lines, run_dir


def test_ctrl_c_finishes_the_step_saves_and_returns(interrupted):
    result, lines, run_dir = interrupted
    assert result.preempted and result.final_step == 3
    assert (run_dir / "checkpoints" / "3").is_dir()
    assert any("stop requested (SIGINT): saved step 3" in line for line in lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards


def test_start_up_is_a_short_summary_with_warnings_then_the_compile_line(interrupted):
    _, lines, run_dir = interrupted
    text = "\n".join(lines)
    head = text[: text.index("compiling the train step")].splitlines()
    assert len(head) <= 10, head
    assert any(
        line.startswith("warning: seq_len=128 is above model.max_position_embeddings=64") for line in head
    )
    assert f"resolved config saved to {run_dir / 'config.yaml'} (--verbose prints it)" in head
    assert "family: qwen2" in (run_dir / "config.yaml").read_text() and "family: qwen2" not in text
    assert text.index("compiling the train step") < text.index("step 1/50")


def test_verbose_prints_the_resolved_config(tmp_path, monkeypatch):
    from train.trainer import Trainer

    seen = []
    monkeypatch.setattr(Trainer, "run", lambda self: seen.append(self.verbose))
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "store")))
    assert main(["train", str(cfg), "--verbose"]) == 0 and main(["train", str(cfg)]) == 0
    assert seen == [True, False]


def test_progress_bar_starts_after_the_first_step_compiled(tmp_path, monkeypatch):
    import tqdm

    created: list[tuple[float, int]] = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            created.append((time.perf_counter(), kwargs.get("initial")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    trainer, _ = stub_step_trainer(tmp_path / "run", steps=3, log__progress=True)
    step, compiled = trainer.train_step, []

    def slow_first_step(*args):
        if not compiled:
            time.sleep(0.5)  # as a compilation would
            compiled.append(time.perf_counter())
        return step(*args)

    trainer.train_step = slow_first_step
    trainer.run()
    assert len(created) == 1 and created[0][0] > compiled[0] and created[0][1] == 0


def test_a_resume_that_changes_the_data_order_is_warned_about(interrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted[2], run_dir)
    trainer, lines = stub_step_trainer(run_dir, steps=4, seq_len=64)
    assert trainer.run().start_step == 3
    assert (
        "warning: resuming with seq_len=64, but the checkpoint was written with 128: the data read from here on "
        "differs from the original run's"
    ) in lines
    assert sum(line.startswith("warning: resuming") for line in lines) == 1


def test_a_checkpoint_without_its_data_state_says_so(interrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted[2], run_dir)
    (run_dir / "checkpoints" / "3" / "data" / "process_0-of-1.json").unlink()
    trainer, _ = stub_step_trainer(run_dir, steps=50)
    with pytest.raises(CheckpointError, match=r"data-iterator state .*process_0-of-1.json\) is missing") as e:
        trainer.run()
    assert f"delete {run_dir.absolute() / 'checkpoints' / '3'}" in str(e.value)
    assert "different number of processes" not in str(e.value)


def test_sigterm_sets_the_same_flag():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while signals.requested is None and time.time() < deadline:
            time.sleep(0.01)
    assert signals.requested == "SIGTERM"


SECOND_CTRL_C = """
import os, signal, time
from train.signals import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.SIGINT)
    while s.requested is None:
        time.sleep(0.01)
    print("first Ctrl-C: still running", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
print("not aborted")
"""


def test_second_ctrl_c_aborts_at_once():
    t0 = time.time()
    proc = subprocess.run(
        [PYTHON, "-c", SECOND_CTRL_C],
        env=subprocess_env(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ABORT_EXIT_CODE, proc.stderr
    assert time.time() - t0 < 20
    assert "first Ctrl-C: still running" in proc.stdout and "not aborted" not in proc.stdout
    assert "Ctrl-C again to abort" in proc.stderr and "SIGINT again: aborting now" in proc.stderr


# ---- the run-directory lock


def test_a_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    with RunLock(tmp_path, "wuneng train a.yaml"):
        with pytest.raises(RunLockError, match=rf"pid {os.getpid()} on host {socket.gethostname()}") as e:
            RunLock(tmp_path).acquire()
        assert "wuneng train a.yaml" in str(e.value)
    with RunLock(tmp_path) as lock:  # released: free again, and not a takeover
        assert lock.took_over is None


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock(tmp_path):
        pass
    assert "cannot lock" in caplog.text and "would not be detected" in caplog.text


KILLED_HOLDER = """
import os, sys
from train.run_lock import RunLock
RunLock(sys.argv[1], "wuneng train killed.yaml").acquire()
print(os.getpid(), flush=True)
os._exit(9)  # ends without releasing, as after kill -9
"""


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-c", KILLED_HOLDER, str(tmp_path)],
        env=subprocess_env(1),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    dead_pid = proc.stdout.strip()
    assert proc.returncode == 9 and dead_pid, proc.stderr
    with RunLock(tmp_path) as lock:
        assert lock.took_over is not None and f"pid {dead_pid}" in lock.took_over
        assert "killed.yaml" in lock.took_over


def test_train_into_a_directory_in_use_is_refused_and_keeps_its_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the running run's config\n")
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(run_dir, str(tmp_path / "store")))
    with RunLock(run_dir, "wuneng train other.yaml"):
        assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wuneng train: error:") and f"pid {os.getpid()}" in err and "in use" in err
    assert (run_dir / "config.yaml").read_text() == "the running run's config\n"
    assert not (run_dir / "checkpoints").exists()


def test_upcycle_and_experiment_take_the_lock(tmp_path):
    from train.experiments.runner import run_experiment
    from train.experiments.spec import load_experiment
    from train.upcycle.pipeline import load_pipeline, run_pipeline

    pipe = load_pipeline(REPO / "configs" / "upcycle" / "tiny.yaml", [f"root={tmp_path / 'up'}"])
    spec = load_experiment(REPO / "configs" / "experiments" / "small.yaml", [f"out_dir={tmp_path / 'ex'}"])
    for directory, start in (
        (pipe.root, lambda: run_pipeline(pipe)),
        (spec.out_dir, lambda: run_experiment(spec)),
    ):
        with RunLock(directory, "wuneng other"):
            with pytest.raises(RunLockError, match="wuneng other"):
                start()


# ---- non-finite steps


def test_consecutive_skipped_steps_stop_the_run_naming_the_causes(tmp_path):
    trainer, _ = stub_step_trainer(
        tmp_path / "run", loss=float("nan"), skipped=1, steps=50, max_skipped_steps=4
    )
    with pytest.raises(TrainingDiverged, match=r"the last 4 steps \(1\.\.4\)") as e:
        trainer.run()
    for cause in (
        "optimizer.lr=0.01",
        "initialisation",
        "token ids >= model.vocab_size",
        "max_skipped_steps",
    ):
        assert cause in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()


def test_a_run_whose_every_step_was_skipped_fails(tmp_path):
    trainer, _ = stub_step_trainer(
        tmp_path / "run", loss=float("inf"), skipped=1, steps=3, max_skipped_steps=10
    )
    with pytest.raises(TrainingDiverged, match=r"every step of this run \(1\.\.3\)"):
        trainer.run()


def test_diverged_run_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    from train.trainer import Trainer

    def diverge(self):
        raise TrainingDiverged("the last 10 steps (1..10) had a non-finite loss")

    monkeypatch.setattr(Trainer, "run", diverge)
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "store")))
    assert main(["train", str(cfg)]) == 1
    assert capsys.readouterr().err == "wuneng train: error: the last 10 steps (1..10) had a non-finite loss\n"


# ---- multi-host start


def test_an_unreachable_coordinator_is_waited_for_then_one_clear_error(tmp_path, capsys):
    from train.config import DistributedConfig

    assert DistributedConfig().initialization_timeout <= 120
    port = free_port()  # nothing listens there
    dist = {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": 1}
    cfg = tiny_config(
        tmp_path / "run", str(tmp_path / "store"), distributed={**dist, "initialization_timeout": 2}
    )
    t0 = time.monotonic()
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.splitlines()
    waiting = [line for line in err if line.startswith(f"waiting for coordinator localhost:{port}")]
    assert waiting == [f"waiting for coordinator localhost:{port} (process 1 of 2; 0 s of 2 s)"]
    assert err[-1].startswith(
        f"wuneng train: error: process 1: the coordinator localhost:{port} did not answer within 2 s ("
    )
    assert "raise distributed.initialization_timeout" in err[-1]


COORDINATOR_ALONE = """
import sys
from train.config import DistributedConfig
from train.mesh import initialize_distributed
cfg = DistributedConfig(
    coordinator_address=sys.argv[1], num_processes=2, process_id=0, initialization_timeout=2
)
initialize_distributed(cfg)
"""


def test_a_coordinator_whose_peers_never_join_stops_with_one_error_not_an_abort():
    address = f"localhost:{free_port()}"
    proc = subprocess.run(
        [PYTHON, "-c", COORDINATOR_ALONE, address],
        env=subprocess_env(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # not SIGABRT (-6) from the runtime's check failure
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wuneng: error: process 0 of 2: not all 2 processes joined at the coordinator {address} within 2 s; "
        "start every process with the same distributed.coordinator_address and num_processes (process_id 0..1), "
        "or raise distributed.initialization_timeout"
    )
    assert "Check failure" not in proc.stderr


def test_start_up_watchdog_of_a_detected_cluster_says_what_it_waits_for(monkeypatch):
    from train import mesh
    from train.config import DistributedConfig

    monkeypatch.setattr(mesh, "WAIT_NOTICE_S", 0.2)
    lines: list[str] = []
    codes: list[int] = []
    with mesh.start_up_watchdog(
        DistributedConfig(initialization_timeout=1), say=lines.append, stop=codes.append
    ):
        time.sleep(1.0)  # the watchdog stops the start at 1 - 0.5 s, before the runtime's abort
    assert codes == [2]
    assert (
        lines[0]
        == "waiting for all processes to join at the cluster's coordinator (this process; 0 s of 1 s)"
    )
    assert lines[-1] == (
        "wuneng: error: this process: not all processes joined at the cluster's coordinator within 1 s; check "
        "that every host of the job started, or raise distributed.initialization_timeout"
    )

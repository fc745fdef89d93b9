"""Plain CPU commands never start libtpu: with the ``tpu-aot`` extra installed (libtpu importable) and
``JAX_PLATFORMS`` unset, ``wuneng train``, ``eval`` and ``generate`` on a host without TPU or GPU pin JAX
to the CPU before any backend starts (``train.platform``), so libtpu is never imported (no TPU probe, no
start-up errors, no machine-wide lock file). Only ``wuneng compile`` and the AOT tests load it."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
from train_support import PYTHON, REPO, make_store, subprocess_env, tiny_config, write_yaml

from train.aot.topology import tpu_attached
from train.platform import gpu_visible

SCRIPT = """
import sys
from train.cli import main

run = sys.argv[1]
codes = [
    main(["train", sys.argv[2]]),
    main(["eval", run, "--max-batches", "1", "--no-progress"]),
    main(["generate", run, "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"]),
]
import jax

print("CODES", codes, "BACKEND", jax.default_backend())
print("LIBTPU", sorted(m for m in sys.modules if m == "libtpu" or m.startswith("libtpu.")))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu-aot extra (libtpu)")
def test_train_eval_generate_never_import_libtpu(tmp_path):
    if tpu_attached() or gpu_visible():
        pytest.skip("an accelerator is attached: JAX may use it")
    store = make_store(tmp_path / "store")
    cfg = tiny_config(tmp_path / "run", store, steps=2, mesh={"data": -1, "fsdp": 1, "tensor": 1})
    path = write_yaml(tmp_path / "c.yaml", cfg)
    env = {k: v for k, v in subprocess_env(1).items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(
        [PYTHON, "-c", SCRIPT, str(tmp_path / "run"), str(path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CODES [0, 0, 0] BACKEND cpu" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "LIBTPU []" in proc.stdout, proc.stdout
    for marker in ("libtpu", "TPU_WORKER_HOSTNAMES", "InitGoogle"):
        assert marker not in proc.stderr, proc.stderr[-3000:]

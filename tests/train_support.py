"""Test support for the training-system tests: subprocess environment, a small token store from the
embedded corpus, and a tiny training config (the real ``qwen2`` family, shrunk)."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable

TINY_MODEL: dict[str, Any] = {
    "preset": "qwen2_tiny",
    "vocab_size": 320,  # byte-level store: 258 ids
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def subprocess_env(n_devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def make_store(path: Path) -> str:
    """A small byte-level token store from the embedded stdlib corpus (~200 KB, 10 % held out)."""
    from train.data.prepare import prepare

    prepare(
        ["stdlib"],
        path,
        "byte",
        eval_fraction=0.1,
        stdlib_max_files=40,
        stdlib_max_bytes=200_000,
        progress=False,
    )
    return str(path)


def tiny_config(run_dir: Path | str, store: str, **top: Any) -> dict[str, Any]:
    """A training config dict for the tiny model (constant lr after a 2-step warmup, so losses do not
    depend on the total step count)."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": copy.deepcopy(TINY_MODEL),
        "data": {"store": store, "num_threads": 1, "prefetch": 2},
        "steps": 6,
        "global_batch_size": 8,
        "seq_len": 32,
        "dtype": "float32",
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant"},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "eval": {"interval": 0, "batches": 2, "at_end": False, "sample_tokens": 0},
        "log": {"interval": 1, "progress": False, "tensorboard": False},
    }
    for key, value in top.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path | str) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (last record per step)."""
    out: dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            out[rec["step"]] = float(rec["loss"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class CountingBatches:
    """A data iterator of constant batches (the keys of ``train.data.pipeline``) that counts what it
    gave; ``on_batch(n)`` runs before batch ``n`` (1-based) is returned."""

    def __init__(self, local_batch: int, seq_len: int, on_batch=None):
        import numpy as np

        tokens = np.arange(local_batch * seq_len, dtype=np.int32).reshape(local_batch, seq_len) % 200
        self.batch = {
            "tokens": tokens,
            "targets": tokens,
            "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
            "loss_mask": np.ones_like(tokens),
        }
        self.n = 0
        self.on_batch = on_batch

    def __next__(self):
        self.n += 1
        if self.on_batch is not None:
            self.on_batch(self.n)
        return self.batch

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def stub_step_trainer(run_dir: Path, *, loss: float = 1.0, skipped: int = 0, on_batch=None, **top: Any):
    """A Trainer of the tiny model whose train step is a plain function (nothing to compile): the state
    passes through unchanged but for its step count, and every step reports ``loss`` / ``skipped``. Returns ``(trainer, lines)``,
    the lines it printed."""
    import dataclasses

    import numpy as np

    from train.config import from_dict
    from train.trainer import Trainer

    lines: list[str] = []
    cfg = from_dict(tiny_config(run_dir, "unused-store", **top))
    trainer = Trainer(
        cfg,
        echo=lines.append,
        data_factory=lambda t: (CountingBatches(t.local_batch, cfg.seq_len, on_batch), None),
    )
    metrics = {
        "loss": np.float32(loss),
        "skipped": np.int32(skipped),
        "grad_norm": np.float32(loss),
        "lr": np.float32(cfg.optimizer.lr),
        "z_loss": np.float32(0),
        "loss_tokens": np.float32(1),
    }
    trainer.train_step = lambda state, batch, *extra: (
        dataclasses.replace(state, step=state.step + 1),
        metrics,
    )
    return trainer, lines

"""Context parallelism on 8 (fake CPU) devices: compiled temporaries per device of a whole train step with the
sequence split (``data=2 sequence=4``, 2 rows of 8192 tokens) against the same tokens per device as a batch
split (``data=8``, 8 rows of 2048), for qwen2, rwkv7 and wuneng (d = 64, 2 layers), plus the collectives in
each program. XLA's memory analysis of the compiled CPU program, not a run.

    python benchmarks/context_parallel.py                 # prints a table, writes benchmarks/results/context_parallel_cpu.json

Goal: the sequence-split step holds <= 1.25x the temporaries of the batch-split one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table, write_results  # noqa: E402
from train.config import MeshConfig, OptimizerConfig  # noqa: E402
from train.mesh import make_mesh, mesh_context  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import init_state, make_layout  # noqa: E402
from train.train_step import jit_train_step, make_train_step  # noqa: E402
from wuneng_jax import sharding as S  # noqa: E402
from wuneng_jax.config import config_from_dict  # noqa: E402
from wuneng_jax.models import build_model  # noqa: E402

LAYOUTS = (
    ("batch split: data=8, 8 x 2048", MeshConfig(data=8), 8, 2048),
    ("sequence split: data=2 sequence=4, 2 x 8192", MeshConfig(data=2, sequence=4), 2, 8192),
)


def model_dict(family: str, seq: int) -> dict:
    if family == "rwkv7":
        return {"family": "rwkv7", "preset": "rwkv7_tiny", "n_embd": 64, "n_layer": 2}
    return {
        "family": family,
        "preset": f"{family}_tiny",
        "hidden_size": 64,
        "num_layers": 2,
        "max_position_embeddings": seq,
    }


def step_memory(family: str, mesh_cfg: MeshConfig, batch: int, seq: int) -> dict:
    cfg = config_from_dict(model_dict(family, seq))
    mesh, rules = make_mesh(mesh_cfg), S.DEFAULT_RULES
    tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=1), 1000)
    build = lambda rngs: build_model(cfg, rngs=rngs)  # noqa: E731
    layout = make_layout(build, tx, mesh, rules, seed=0)
    state = init_state(build, tx, mesh, rules, 0, layout)
    step = jit_train_step(make_train_step(layout.graphdef, tx, schedule, rules=rules), layout, mesh, rules)
    ids = jnp.zeros((batch, seq), jnp.int32)
    batch_arrays = {
        "tokens": ids,
        "targets": ids,
        "segment_ids": ids + 1,
        "loss_mask": jnp.ones((batch, seq)),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
    }
    with mesh_context(mesh, rules):
        compiled = step.lower(state, batch_arrays).compile()
    text = compiled.as_text()
    return {
        "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "all_gathers": text.count("all-gather("),
        "collective_permutes": text.count("collective-permute("),
    }


def main() -> dict:
    rows = []
    for family in ("qwen2", "rwkv7", "wuneng"):
        base = None
        for label, mesh_cfg, batch, seq in LAYOUTS:
            rec = {"family": family, "layout": label, **step_memory(family, mesh_cfg, batch, seq)}
            base = base or rec["temp_MiB"]
            rec["vs_batch_split"] = rec["temp_MiB"] / base
            print(rec, flush=True)
            rows.append(rec)
    cols = ["family", "layout", "temp_MiB", "vs_batch_split", "all_gathers", "collective_permutes"]
    print_table(cols, [[r[c] for c in cols] for r in rows])
    path = write_results("context_parallel", {"rows": rows})
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

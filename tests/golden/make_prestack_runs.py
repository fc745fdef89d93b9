"""Write the run directories of ``tests/test_checkpoint_layout.py`` with the code from BEFORE layers were
stacked (commit a9da3f2), so the test restores a real old-format checkpoint:

    git worktree add /tmp/prestack a9da3f2
    PYTHONPATH=/tmp/prestack:tests python tests/golden/make_prestack_runs.py

Each ``tests/golden/prestack_<family>/`` holds a 2-step run directory (``checkpoints/2``) of a tiny model on
a 40-file byte-level store, and ``logits.npz``: the restored model's float32 logits on fixed tokens,
computed by the old code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from train_support import make_store, tiny_config  # noqa: E402

from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = {
    "wuneng": {
        "preset": "wuneng_tiny",
        "num_layers": 3,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 16,
        "hybrid_layers": [1, 2],
        "state_head_size": 16,
        "state_heads": 1,
    },
    "rwkv7": {
        "family": "rwkv7",
        "preset": "rwkv7_tiny",
        "vocab_size": 320,
        "n_embd": 32,
        "n_layer": 3,
        "head_size": 16,
        "dim_ffn": 64,
    },
}
TOKENS = np.random.default_rng(0).integers(0, 258, (2, 12)).astype(np.int32)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    store = make_store(tmp / "store")
    for family, model in MODELS.items():
        out = HERE / f"prestack_{family}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = tiny_config(out / "run", store, steps=2, mesh={"data": 1}, checkpoint__interval=2)
        if family == "wuneng":
            cfg["model"].update(model)
        else:
            cfg["model"] = model
        trainer = Trainer(load_config(cfg))
        trainer.run()
        restored = trainer.checkpointer.restore(2, trainer.layout, trainer._meta())
        m = nnx.merge(trainer.layout.graphdef, restored.state.params, restored.state.rest)
        np.savez(out / "logits.npz", tokens=TOKENS, logits=np.asarray(m(jnp.asarray(TOKENS)), np.float32))
        print(family, "->", out)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

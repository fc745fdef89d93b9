"""Training with the sequence split (``mesh.sequence = 4``) against the same run batch-sharded, for all three
families, on 8 CPU devices: 20 train steps (float32, Adam, the tiled loss) on packed rows whose documents
cross the sequence blocks' boundaries, then the eval step. float32 training amplifies rounding, so the
allowed drift is the one a plain re-sharding of the same run shows (``data=8`` vs ``data=2, fsdp=4``),
measured here in the same test, from the exact (float64) run of the same steps and from the batch-sharded
float32 run."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from train.config import MeshConfig, OptimizerConfig
from train.mesh import make_mesh, mesh_context
from train.optimizer import make_optimizer
from train.state import init_state, make_layout
from train.train_step import batch_sharding, jit_eval_step, jit_train_step, make_eval_step, make_train_step
from wuneng_jax.config import load_model_config
from wuneng_jax.models import build_model
from wuneng_jax.sharding import DEFAULT_RULES as RULES

B, T, STEPS, VOCAB = 8, 32, 20, 96
MESHES = {
    "batch": MeshConfig(data=8),
    "reshard": MeshConfig(data=2, fsdp=4),
    "sequence": MeshConfig(data=2, sequence=4),
}
SHRINK = {
    "qwen2_tiny": dict(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64
    ),
    # the family default (upcycle init): with init=scratch WuNeng's training is chaotic at this lr (a plain
    # re-sharding drifts 2e-2 in loss by step 8), which leaves a drift test nothing to measure
    "wuneng_tiny": {},
    "rwkv7_tiny": {},
}


def _batch(i: int) -> dict[str, np.ndarray]:
    """Rows of two or three packed documents; with 4 blocks of 8 tokens the cuts fall inside blocks and on
    block boundaries, and most documents span a boundary."""
    rng = np.random.default_rng(100 + i)
    stream = np.zeros(
        (B, T + 1), np.int64
    )  # a learnable stream: next = (5 * token + 1) mod V from a random start
    stream[:, 0] = rng.integers(0, VOCAB, B)
    for t in range(T):
        stream[:, t + 1] = (5 * stream[:, t] + 1) % VOCAB
    stream = stream.astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(3, T - 2), size=(B, 2)), axis=1)
    cuts[0] = (8, 16)  # on block boundaries
    t = np.arange(T)[None]
    seg = (1 + (t >= cuts[:, :1]) + (t >= cuts[:, 1:])).astype(np.int32)
    start = np.where(seg == 1, 0, np.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
    return {
        "tokens": stream[:, :-1],
        "targets": stream[:, 1:],
        "segment_ids": seg,
        "positions": (t - start).astype(np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }


def _config(name: str, **overrides):
    cfg = load_model_config(name)
    overrides = {**SHRINK[name], "vocab_size": VOCAB, **overrides}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if hasattr(cfg, k)})


def _run(name: str, mesh_cfg: MeshConfig, exact: bool = False) -> tuple[np.ndarray, float, float]:
    """The 20 train losses and the eval step's CE sum on a held-out batch before and after training.

    ``exact``: the same run in float64 from the same (float32-initialised) state, the reference every float32
    run's rounding drifts from."""
    tx, schedule = make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1), STEPS)
    mesh = make_mesh(mesh_cfg, jax.devices()[:8])
    cfg = _config(name)
    build = lambda rngs: build_model(cfg, rngs=rngs)
    layout = make_layout(build, tx, mesh, RULES, seed=0)
    state = init_state(build, tx, mesh, RULES, 0, layout)
    with jax.enable_x64(exact):
        if exact:
            cfg = _config(name, dtype="float64", param_dtype="float64")
            host = jax.tree.map(np.asarray, state)
            layout = make_layout(build, tx, mesh, RULES, seed=0)
            state = jax.device_put(
                jax.tree.map(lambda x, a: x.astype(a.dtype), host, layout.abstract), layout.shardings
            )
        step = jit_train_step(
            make_train_step(layout.graphdef, tx, schedule, rules=RULES, vocab_tile=32), layout, mesh, RULES
        )
        evaluate = jit_eval_step(make_eval_step(layout.graphdef, vocab_tile=32), layout, mesh, RULES)
        losses = []
        with mesh_context(mesh, RULES):
            held_out = jax.device_put(_batch(STEPS), batch_sharding(mesh, RULES))
            before = float(evaluate(state, held_out)["ce_sum"])
            for i in range(STEPS):
                state, m = step(state, jax.device_put(_batch(i), batch_sharding(mesh, RULES)))
                losses.append(float(m["loss"]))
            after = float(evaluate(state, held_out)["ce_sum"])
    return np.asarray(losses), before, after


@pytest.mark.parametrize("name", ["qwen2_tiny", "rwkv7_tiny", "wuneng_tiny"])
def test_training_with_the_sequence_split_stays_within_the_resharding_drift(name):
    runs = {k: _run(name, m) for k, m in MESHES.items()}
    exact = _run(name, MESHES["batch"], exact=True)[0]
    ref_losses, ref_before, ref_after = runs["batch"]
    losses, before, after = runs["sequence"]
    assert np.all(np.isfinite(ref_losses)) and ref_losses[-1] < ref_losses[0] - 0.1  # it trains
    # the same parameters (step 0): the eval step and the first loss agree to float32 rounding
    assert abs(before - ref_before) <= 1e-5 * abs(ref_before), (before, ref_before)
    assert abs(losses[0] - ref_losses[0]) <= 1e-5 * abs(ref_losses[0])
    resolution = 4 * np.finfo(np.float32).eps * float(np.max(ref_losses))
    # (1) from the exact (float64) run: the sequence split's float32 training drifts no further than the
    # batch-sharded run's and a plain re-sharding's own float32 rounding does
    own = max(np.max(np.abs(runs[k][0] - exact)) for k in ("batch", "reshard"))
    from_exact = np.max(np.abs(losses - exact))
    # (2) from the batch-sharded float32 run: within the drift of a plain re-sharding of it
    floor = np.max(np.abs(runs["reshard"][0] - ref_losses))
    drift = np.max(np.abs(losses - ref_losses))
    print(
        f"{name} over {STEPS} steps: from float64 — batch {np.max(np.abs(ref_losses - exact)):.2e}, "
        f"re-sharded {np.max(np.abs(runs['reshard'][0] - exact)):.2e}, sequence split {from_exact:.2e}; "
        f"from the batch run — re-sharded {floor:.2e}, sequence split {drift:.2e}"
    )
    # WuNeng: which float32 run lands nearer float64 depends on the machine (its float order's chaotic growth,
    # below): CI's measured the split at 2.5e-4 against the others' 6.2e-4, a 2-core AMD EPYC host of session 9 at
    # 6.6e-4 against 2.5e-4 (2.7x; the code before that session: 2.8x). A broken split (a wrong state or K/V
    # block carried between sequence blocks) fails the step-0 checks above and drifts by 1e-2 or more.
    assert from_exact <= (4 if name == "wuneng_tiny" else 2) * max(own, resolution), (from_exact, own)
    # WuNeng's full fusion at this lr amplifies any change of float order ~3x per step (a plain re-sharding's
    # 1e-7 gradient difference grows to 7e-5 in loss), and the sequence split changes the order of the forward
    # itself (chunks, attention blocks: gradients 1.6e-6 apart, as far from float64 as the unsplit path's);
    # so two float32 runs differ by 4x the re-sharding floor while both stay as close to float64 as the batch
    # run (1). qwen2 and rwkv7 stay within 2x of the floor here too.
    # On another host the re-sharding floor itself came out 5x smaller (5.5e-5 against the split's 6.0e-4, the
    # code before session 9: 8.4e-5 / 6.2e-4): for WuNeng the float32 noise scale is also the runs' own drift
    # from float64 (1), so the bound takes the larger of the two.
    noise = max(floor, own) if name == "wuneng_tiny" else floor
    factor = 4 if name == "wuneng_tiny" else 2
    allowed = factor * max(noise, resolution)
    assert drift <= allowed, (drift, floor)
    tokens = B * T  # the eval after training, per token, within the same allowance
    assert abs(after - ref_after) / tokens <= allowed + abs(runs["reshard"][2] - ref_after) / tokens

"""The jitted train step: 1 device vs 8 sharded devices, gradient accumulation, loss and z-loss
against a numpy reference, NaN skipping, and the weight-decay mask."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from train.config import MeshConfig, OptimizerConfig
from train.mesh import make_mesh, mesh_context
from train.optimizer import decay_mask, make_optimizer
from train.state import init_state, make_layout
from train.train_step import batch_sharding, jit_train_step, make_train_step
from wuneng_jax.config import load_model_config
from wuneng_jax.models import build_model
from wuneng_jax.sharding import DEFAULT_RULES as RULES

B, T = 8, 16
STEPS = 4
NAN_STEP = 2  # the batch of this step carries a NaN in its loss mask
Z_LOSS = 1e-3
# float32 compute: the only difference between layouts is the order of float reductions.
LOSS_TOL = 2e-5  # absolute, on losses ~4.9 (measured: below 1e-6)
# Adam divides by sqrt(v): parameters whose gradients are ~1e-9 (rarely seen embedding rows) move by
# ~lr * sign(g), so float-order noise in g shows up at a fraction of one lr step (lr = 1e-2).
PARAM_TOL = 5e-4


def _model_cfg():
    return dataclasses.replace(
        load_model_config("qwen2_tiny"),
        vocab_size=128,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def _batch(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    stream = rng.integers(0, 128, (B, T + 1)).astype(np.int32)
    cut = rng.integers(3, T - 3, B)
    seg = np.where(np.arange(T)[None] < cut[:, None], 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(T)[None], np.arange(T)[None] - cut[:, None]).astype(np.int32)
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    if i == NAN_STEP:
        mask[3, 5] = np.nan
    return {
        "tokens": stream[:, :-1],
        "targets": stream[:, 1:],
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": mask,
    }


def _run(
    mesh_cfg: MeshConfig,
    n_devices: int,
    accum: int = 1,
    remat: str = "none",
    dtype: str = "float32",
    steps: int = STEPS,
):
    model_cfg = dataclasses.replace(_model_cfg(), dtype=dtype, remat=remat)
    build = lambda rngs: build_model(model_cfg, rngs=rngs)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1), STEPS)
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    layout = make_layout(build, tx, mesh, RULES, seed=0)
    state = init_state(build, tx, mesh, RULES, 0, layout)
    step = jit_train_step(
        make_train_step(
            layout.graphdef,
            tx,
            schedule,
            accum_steps=accum,
            z_loss=Z_LOSS,
            rules=RULES,
        ),
        layout,
        mesh,
        RULES,
    )
    params0 = jax.device_get(state.params)
    metrics, before_nan, after_nan = [], None, None
    with mesh_context(mesh, RULES):
        for i in range(steps):
            if i == NAN_STEP:
                before_nan = jax.device_get((state.params, state.opt_state))
            state, m = step(state, jax.device_put(_batch(i), batch_sharding(mesh, RULES)))
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            if i == NAN_STEP:
                after_nan = jax.device_get((state.params, state.opt_state))
    return {
        "metrics": metrics,
        "params0": params0,
        "params": jax.device_get(state.params),
        "before_nan": before_nan,
        "after_nan": after_nan,
        "graphdef": layout.graphdef,
        "step": int(state.step),
        "dtypes": jax.tree.map(lambda x: x.dtype, (state.params, state.opt_state)),
    }


@pytest.fixture(scope="module")
def one_device():
    return _run(MeshConfig(data=1), 1)


@pytest.fixture(scope="module")
def eight_devices():
    return _run(MeshConfig(data=1, fsdp=2, tensor=4), 8)


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_one_device_equals_eight_sharded_devices(one_device, eight_devices):
    l1 = np.array([m["loss"] for m in one_device["metrics"]])
    l8 = np.array([m["loss"] for m in eight_devices["metrics"]])
    finite = np.isfinite(l1)
    assert np.array_equal(finite, np.isfinite(l8))
    print(
        f"1 vs 8 devices: max |loss diff| {np.max(np.abs(l1[finite] - l8[finite])):.3g}, "
        f"max |param diff| {_max_diff(one_device['params'], eight_devices['params']):.3g}"
    )
    assert np.max(np.abs(l1[finite] - l8[finite])) < LOSS_TOL
    g1 = np.array([m["grad_norm"] for m in one_device["metrics"]])[finite]
    g8 = np.array([m["grad_norm"] for m in eight_devices["metrics"]])[finite]
    np.testing.assert_allclose(g1, g8, rtol=1e-4)
    assert _max_diff(one_device["params"], eight_devices["params"]) < PARAM_TOL
    # and training did move the parameters
    assert _max_diff(one_device["params0"], one_device["params"]) > 1e-3


def test_first_loss_matches_numpy_reference(one_device):
    """CE (masked token mean) and z-loss of step 0, recomputed in float64 numpy from the model's logits."""
    model = nnx.merge(one_device["graphdef"], jax.tree.map(np.asarray, one_device["params0"]))
    b = _batch(0)
    logits = np.asarray(
        model(b["tokens"], segment_ids=b["segment_ids"], positions=b["positions"]), np.float64
    )
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
    tgt = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    mask = b["loss_mask"].astype(np.float64)
    ce = ((lse - tgt) * mask).sum() / mask.sum()
    z = (lse**2 * mask).sum() / mask.sum()
    m = one_device["metrics"][0]
    assert m["loss"] == pytest.approx(ce, rel=1e-5)
    assert m["z_loss"] == pytest.approx(z, rel=1e-5)
    assert m["loss_tokens"] == mask.sum()


def test_nan_batch_skips_the_update(one_device):
    m = one_device["metrics"]
    assert [x["skipped"] for x in m] == [0, 0, 1, 0]
    assert not np.isfinite(m[NAN_STEP]["loss"])
    # params and optimizer state unchanged, bit for bit
    before, after = one_device["before_nan"], one_device["after_nan"]
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the schedule did not advance on the skipped step: same lr as the step before
    assert m[NAN_STEP + 1]["lr"] == m[NAN_STEP]["lr"] == pytest.approx(1e-2)
    assert one_device["step"] == STEPS  # batches consumed, skipped one included
    assert all(np.isfinite(x["loss"]) for i, x in enumerate(m) if i != NAN_STEP)


def test_gradient_accumulation_and_remat_match_one_big_batch(eight_devices):
    """2 micro-batches (scan) with rematerialisation == one batch without (a different mesh, too)."""
    acc = _run(MeshConfig(data=2, fsdp=2, tensor=2), 8, accum=2, remat="full")
    la = np.array([x["loss"] for x in acc["metrics"]])
    l8 = np.array([x["loss"] for x in eight_devices["metrics"]])
    finite = np.isfinite(l8)
    assert np.max(np.abs(la[finite] - l8[finite])) < LOSS_TOL
    assert _max_diff(acc["params"], eight_devices["params"]) < PARAM_TOL


def test_bfloat16_compute_keeps_float32_master_weights_and_moments(one_device):
    bf = _run(MeshConfig(data=1), 1, dtype="bfloat16", steps=2)
    dtypes = {str(d) for d in jax.tree.leaves(bf["dtypes"])}
    assert dtypes <= {"float32", "int32"}, dtypes  # params, mu, nu float32; counters int32
    for a, b in zip(bf["metrics"], one_device["metrics"][:2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)  # bf16 activations
        assert a["loss"] != b["loss"]  # it did compute in bf16


def _decayed(state) -> dict[str, bool]:
    mask = decay_mask(state, OptimizerConfig())
    return {
        jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): bool(v)
        for p, v in jax.tree_util.tree_leaves_with_path(mask)
    }


def test_weight_decay_only_on_large_matrices():
    model = nnx.eval_shape(lambda: build_model(_model_cfg(), rngs=nnx.Rngs(0)))
    dec = _decayed(nnx.state(model, nnx.Param))
    for name, d in dec.items():
        is_matrix = name.endswith("kernel") or name.endswith("embedding")
        assert d == is_matrix, name
    # RWKV-7: only the big matrices (BlinkDL decays `*.weight` 2-D tensors), not the LoRAs or r_k
    from wuneng_jax.models.rwkv7 import RWKV7, RWKV7Config

    rwkv = nnx.eval_shape(
        lambda: RWKV7(
            RWKV7Config(
                vocab_size=256, n_embd=64, n_layer=2, head_size=16, d_decay=16, d_aaa=16, d_mv=8, d_gate=16
            ),
            rngs=nnx.Rngs(0),
        )
    )
    dec = _decayed(nnx.state(rwkv, nnx.Param))
    big = {"receptance", "key", "value", "output", "emb", "head"}
    for name, d in dec.items():
        assert d == (name.split("/")[-1] in big), name
    layer1 = "blocks/blocks/1/0"  # layers 1.. are stacked group 1 (layer 0 makes v_first: group 0)
    assert not dec[f"{layer1}/att/w1"] and not dec[f"{layer1}/att/r_k"] and dec[f"{layer1}/ffn/key"]

"""Vocabulary-tiled loss (``wuneng_jax.layers.vocab_tiling``): the same values and gradients as the full
logits (float64, ≤ 1e-6 relative) for cross-entropy with z-loss and loss masks, the distillation KL
(against ``train.upcycle.objectives``' own reference functions), greedy checks and perplexity, for the
three model families; and no ``[B,T,V]`` float32 logits buffer left in the compiled train step."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.train_step import CrossEntropyObjective, cross_entropy, make_eval_step, model_ce_sums
from train.upcycle.objectives import DistillObjective, kl_per_token, match_vocab
from wuneng_jax.config import config_from_dict
from wuneng_jax.eval.loglikelihood import score_tokens
from wuneng_jax.layers import vocab_tiling as vt
from wuneng_jax.models import build_model

TOL = 1e-6


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _tree_rel(a, b) -> float:
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------------------------- plan


def test_plan_tiles_prefers_divisors_and_pads_otherwise():
    assert vt.plan_tiles(151936, 8192) == vt.Tiling(151936, 32, 4748)  # Qwen2.5-0.5B/1.5B
    assert vt.plan_tiles(152064, 8192) == vt.Tiling(152064, 22, 6912)  # Qwen2.5-7B
    t = vt.plan_tiles(61, 16)  # prime: 4 tiles of 16, 3 padded ids
    assert (t.n, t.size, t.padded) == (4, 16, True)
    assert vt.plan_tiles(512, 8192).n == 1 and vt.plan_tiles(512, 0).n == 1
    assert not vt.is_tiled(512, 512) and vt.is_tiled(512, 511)


# --------------------------------------------------------------------------------- the core (float64)

CASES = [(60, 16, False), (60, 16, True), (61, 16, False), (61, 16, True), (60, 7, False)]


def _inputs(seed: int, vocab: int, transposed: bool, d: int = 8):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 5, d)))
    w = jnp.asarray(rng.normal(size=(vocab, d) if transposed else (d, vocab)))
    y = jnp.asarray(rng.integers(0, vocab, (2, 5)), jnp.int32)
    mask = jnp.asarray((rng.random((2, 5)) > 0.3).astype(np.float64))
    return x, w, y, mask


@pytest.mark.parametrize("vocab,tile,transposed", CASES)
def test_ce_and_z_loss_values_and_gradients(vocab, tile, transposed):
    with jax.enable_x64(True):
        x, w, y, mask = _inputs(0, vocab, transposed)

        def loss(x, w, tile):
            s = vt.ce_stats(x, w, y, transposed=transposed, tile=tile)
            return jnp.sum((s.lse - s.target) * mask) + 0.3 * jnp.sum(jnp.square(s.lse) * mask)

        def reference(x, w):
            z = jnp.einsum("btd,vd->btv" if transposed else "btd,dv->btv", x, w)
            ce, zz = cross_entropy(z, y, mask)
            return ce + 0.3 * zz

        assert vt.plan_tiles(vocab, tile).n > 1
        want, g_want = jax.value_and_grad(reference, (0, 1))(x, w)
        got, g_got = jax.value_and_grad(loss, (0, 1))(x, w, tile)
        assert got.dtype == jnp.float64
        assert _rel(got, want) <= TOL and _tree_rel(g_got, g_want) <= TOL


@pytest.mark.parametrize("vocab,tile,transposed", CASES[:3])
@pytest.mark.parametrize("teacher_vocab,tau", [(+5, 1.0), (-7, 2.0), (0, 0.5)])
def test_distill_kl_matches_objectives_reference(vocab, tile, transposed, teacher_vocab, tau):
    with jax.enable_x64(True):
        x, w, y, mask = _inputs(1, vocab, transposed)
        rng = np.random.default_rng(2)
        vt_ = vocab + teacher_vocab
        xt = jnp.asarray(rng.normal(size=(2, 5, 11)))
        wt = jnp.asarray(rng.normal(size=(11, vt_)))

        def loss(x, w):
            s = vt.distill_stats(
                x, w, xt, wt, y, transposed=transposed, teacher_transposed=False, temperature=tau, tile=tile
            )
            return jnp.sum(s.kl * mask) + 0.4 * jnp.sum((s.lse - s.target) * mask)

        def reference(x, w):
            z = jnp.einsum("btd,vd->btv" if transposed else "btd,dv->btv", x, w)
            t = match_vocab(jnp.einsum("btd,dv->btv", xt, wt), vocab)
            ce, _ = cross_entropy(z, y, mask)
            return jnp.sum(kl_per_token(t, z, tau) * mask) + 0.4 * ce

        want, g_want = jax.value_and_grad(reference, (0, 1))(x, w)
        got, g_got = jax.value_and_grad(loss, (0, 1))(x, w)
        assert _rel(got, want) <= TOL and _tree_rel(g_got, g_want) <= TOL


def test_greedy_argmax_is_the_first_maximum():
    with jax.enable_x64(True):
        x, w, y, _ = _inputs(3, 60, False)
        # ids 7 and 45 tie everywhere and win on row (0, 0); strided tiles 4 x 15: 45 is in tile 1 (seen
        # first), 7 in tile 3
        w = w.at[:, 7].set(3 * x[0, 0]).at[:, 45].set(3 * x[0, 0])
        full = vt.greedy_stats(x, w, y, transposed=False, tile=0)
        tiled = vt.greedy_stats(x, w, y, transposed=False, tile=16)
        assert int(tiled.argmax[0, 0]) == 7
        np.testing.assert_array_equal(tiled.argmax, full.argmax)
        assert _rel(tiled.lse, full.lse) <= TOL and _rel(tiled.target, full.target) <= TOL


def test_float32_tiles_stay_close():
    x, w, y, mask = _inputs(4, 61, True)
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    full = vt.ce_stats(x, w, y, transposed=True, tile=0)
    tiled = vt.ce_stats(x, w, y, transposed=True, tile=16)
    assert tiled.lse.dtype == jnp.float32
    assert _rel(tiled.lse, full.lse) <= 1e-6 and _rel(tiled.target, full.target) <= 1e-6


# ----------------------------------------------------------------------------------- the models

VOCAB = 96
ATTN = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=1,  # the loss does not depend on depth
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    intermediate_size=48,
    max_position_embeddings=64,
    dtype="float64",
    param_dtype="float64",
)
FAMILIES = {
    "qwen2": {"family": "qwen2", **ATTN, "tie_word_embeddings": False},
    "qwen2_tied": {"family": "qwen2", **ATTN, "tie_word_embeddings": True},
    "wuneng": {
        "family": "wuneng",
        **ATTN,
        "state_head_size": 16,
        "decay_lora_rank": 4,
        "iclr_lora_rank": 4,
        "gate_lora_rank": 4,
        "middle_out_rank": 4,
        "wkv_impl": "reference",
    },
    "rwkv7": {
        "family": "rwkv7",
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": 1,
        "head_size": 16,
        "dim_ffn": 64,
        "dtype": "float64",
        "param_dtype": "float64",
        "wkv_impl": "reference",
    },
}
B, T = 2, 12


def _batch(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    seg = np.where(np.arange(T)[None] < np.array([[5], [8]]), 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(T)[None], np.arange(T)[None] - np.array([[5], [8]])).astype(np.int32)
    mask = (rng.random((B, T)) > 0.25).astype(np.float32)
    return {
        "tokens": jnp.asarray(stream[:, :-1]),
        "targets": jnp.asarray(stream[:, 1:]),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
        "loss_mask": jnp.asarray(mask),
    }


def _model(name: str, seed: int = 0):
    model = build_model(config_from_dict(FAMILIES[name]), rngs=nnx.Rngs(seed))
    # Non-trivial parameters: small random perturbations of every float leaf.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_tiled_loss_equals_full_logits(name):
    """``hidden`` @ ``head_weight`` gives the model's logits; the train step's objective (CE + z-loss over
    the loss mask), tiled 96 = 4 x 24, gives the full-logits value and every parameter's gradient."""
    with jax.enable_x64(True):
        model = _model(name)
        b = _batch(1)
        kw = {"segment_ids": b["segment_ids"], "positions": b["positions"]}
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        x, w, transposed = vt.model_head(model, b["tokens"], **kw)
        logits = model(b["tokens"], **kw)
        assert logits.dtype == jnp.float64
        assert _rel(vt.full_logits(x, w, transposed=transposed), logits) <= 1e-12

        def value(params, tile):
            total, sums, _ = CrossEntropyObjective(graphdef, z_loss=0.1, vocab_tile=tile)(params, rest, b)
            return total, sums

        (want, s_want), g_want = jax.value_and_grad(value, has_aux=True)(params, 0)
        (got, s_got), g_got = jax.value_and_grad(value, has_aux=True)(params, 24)
        assert want.dtype == jnp.float64
        assert _rel(got, want) <= TOL and _rel(s_got["z_loss"], s_want["z_loss"]) <= TOL
        assert _tree_rel(g_got, g_want) <= TOL


def test_distill_objective_tiled_equals_full_logits():
    """Student WuNeng, teacher a Qwen2 with a larger vocabulary (cut to the student's); KL at τ = 2 plus CE."""
    with jax.enable_x64(True):
        student = _model("wuneng")
        teacher = build_model(
            config_from_dict({**FAMILIES["qwen2"], "vocab_size": VOCAB + 9}), rngs=nnx.Rngs(5)
        )
        t_graphdef, t_params = nnx.split(teacher, nnx.Param)
        graphdef, params, rest = nnx.split(student, nnx.Param, ...)
        b = _batch(2)

        def value(params, tile):
            obj = DistillObjective(graphdef, t_graphdef, VOCAB, 1.0, 0.5, 2.0, vocab_tile=tile)
            total, sums, _ = obj(params, rest, b, t_params)
            return total, sums

        (want, s_want), g_want = jax.value_and_grad(value, has_aux=True)(params, 0)
        (got, s_got), g_got = jax.value_and_grad(value, has_aux=True)(params, 24)
        assert want.dtype == jnp.float64
        assert _rel(got, want) <= TOL and _rel(s_got["kl"], s_want["kl"]) <= TOL
        assert _tree_rel(g_got, g_want) <= TOL


@pytest.mark.parametrize("name", ["qwen2_tied", "rwkv7"])
def test_scoring_and_eval_step_tiled_equal_full(name):
    with jax.enable_x64(True):
        model = _model(name)
        b = _batch(3)
        mask = b["loss_mask"] > 0
        full = score_tokens(model, b["tokens"], b["segment_ids"], b["targets"], mask, vocab_tile=0)
        tiled = score_tokens(model, b["tokens"], b["segment_ids"], b["targets"], mask, vocab_tile=24)
        assert _rel(tiled[0], full[0]) <= TOL
        np.testing.assert_array_equal(tiled[1], full[1])
        ce_full, _ = model_ce_sums(model, b, 0)
        ce_tiled, _ = model_ce_sums(model, b, 24)
        assert _rel(ce_tiled, ce_full) <= TOL

        @dataclasses.dataclass
        class _State:
            params: object
            rest: object

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        out = make_eval_step(graphdef, 24)(_State(params, rest), b)
        assert _rel(out["ce_sum"], ce_full) <= TOL


# ------------------------------------------------------------------------- the compiled train step


def _compiled_step_text(vocab_tile: int, mesh_cfg=None) -> tuple[str, dict]:
    from train.config import MeshConfig, OptimizerConfig
    from train.mesh import make_mesh, mesh_context
    from train.optimizer import make_optimizer
    from train.state import init_state, make_layout
    from train.train_step import jit_train_step, make_train_step
    from wuneng_jax.sharding import DEFAULT_RULES as RULES

    cfg = config_from_dict(
        {**FAMILIES["qwen2"], "dtype": "float32", "param_dtype": "float32", "vocab_size": 512}
    )
    build = lambda rngs: build_model(cfg, rngs=rngs)  # noqa: E731
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=1), 10)
    mesh = make_mesh(mesh_cfg or MeshConfig(data=1), jax.devices()[: 4 if mesh_cfg else 1])
    layout = make_layout(build, tx, mesh, RULES, seed=0)
    step = jit_train_step(
        make_train_step(layout.graphdef, tx, schedule, rules=RULES, z_loss=1e-3, vocab_tile=vocab_tile),
        layout,
        mesh,
        RULES,
    )
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 512, (4, 32)).astype(np.int32),
        "targets": rng.integers(0, 512, (4, 32)).astype(np.int32),
        "segment_ids": np.ones((4, 32), np.int32),
        "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1)),
        "loss_mask": np.ones((4, 32), np.float32),
    }
    with mesh_context(mesh, RULES):
        compiled = step.lower(layout.abstract, batch).compile()
        state = init_state(build, tx, mesh, RULES, 0, layout)
        _, metrics = compiled(state, batch)
    return compiled.as_text(), jax.device_get(metrics)


def test_compiled_step_holds_no_full_logits():
    """Untiled, the float32 ``[4,32,512]`` logits are in the program; tiled (512 = 4 x 128), no
    ``[.., 512]`` float32 array of the token rows is, and the step's loss is the same."""
    full_text, full = _compiled_step_text(0)
    tiled_text, tiled = _compiled_step_text(128)
    logits = re.compile(r"f32\[4,32,512\]")
    assert logits.search(full_text)
    assert not re.search(r"f32\[(4,32|128),512\]", tiled_text)
    assert re.search(r"f32\[4,32,128\]", tiled_text)  # one tile of logits
    assert tiled["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert tiled["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)


def test_sharded_tiled_step_matches_one_device():
    """fsdp=2 x tensor=2 (vocabulary tiles sharded over tensor) vs one device."""
    from train.config import MeshConfig

    _, one = _compiled_step_text(128)
    _, sharded = _compiled_step_text(128, MeshConfig(data=1, fsdp=2, tensor=2))
    assert sharded["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert sharded["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)

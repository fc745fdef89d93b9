"""The upcycling stages (align -> distill -> sft) and the pipeline, on a tiny random ``qwen2`` teacher.

Objectives against independent references (teacher-forced per-layer L2, KL with temperature and
vocabulary matching); the upcycling identity (align ``hybrid`` and distill KL are zero at init, align
``state`` is not); parameter groups and the trainable split (optimizer state for trained parameters
only); and one end-to-end ``wuneng upcycle configs/upcycle/tiny.yaml`` run: each stage lowers its own
loss, frozen parameters are bit-identical afterwards, stages skip / resume, the export reloads exactly.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from train_support import REPO, make_store

from train.config import ConfigError, from_dict
from train.trainer import RunResult, Trainer
from train.upcycle import sources
from train.upcycle.objectives import AlignObjective, DistillObjective, kl_per_token, l2_norm, match_vocab
from train.upcycle.params import GROUPS, in_group, trainable_split
from train.upcycle.pipeline import load_pipeline, run_pipeline
from wuneng_jax import config as mc
from wuneng_jax.convert.upcycle import upcycle_qwen2
from wuneng_jax.layers.context import LayerContext
from wuneng_jax.layers.stack import layer_paths, per_layer_params, set_per_layer_params, unstack_model_flat
from wuneng_jax.models import build_model
from wuneng_jax.models.qwen2 import Qwen2
from wuneng_jax.models.wuneng_params import hybrid_param_names

TINY = REPO / "configs" / "upcycle" / "tiny.yaml"
PIPE = yaml.safe_load(TINY.read_text())
HYBRID = {k: v for k, v in PIPE["common"]["model"].items() if k != "family"}


def base_config():
    spec = dict(PIPE["base"])
    spec.pop("seed")
    return mc.load_model_config(spec)


def random_qwen2(cfg, seed: int) -> Qwen2:
    """``Qwen2(cfg, rngs=Rngs(seed))`` initialised in one jitted call (eager init compiles op by op)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(Qwen2(cfg, rngs=nnx.Rngs(seed)))[1])())


def upcycled_base(seed: int = 0):
    """The tiny pipeline's base (random qwen2, ``seed``) and its upcycled WuNeng."""
    qcfg = base_config()
    qwen = random_qwen2(qcfg, seed)
    wcfg, student = upcycle_qwen2(qwen, qcfg, seed=0, wkv_impl="reference", **HYBRID)
    return qcfg, qwen, wcfg, student


def batch(vocab: int = 300, b: int = 2, t: int = 24) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 10 + [2] * 10 + [0] * (t - 20), [1] * t])
    pos = np.concatenate([np.arange(10), np.arange(10), np.zeros(t - 20, int)])
    pos = np.stack([pos, np.arange(t)])
    tokens = rng.integers(0, vocab, (b, t))
    mask = (seg > 0).astype(np.float32)
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
        "segment_ids": jnp.asarray(seg, jnp.int32),
        "positions": jnp.asarray(pos, jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }


# ----------------------------------------------------------------------------------------------------
# Loss functions against numpy


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("v_teacher", [37, 40, 45])
def test_kl_with_temperature_and_vocab_matching(v_teacher):
    rng = np.random.default_rng(v_teacher)
    t = rng.normal(size=(3, 5, v_teacher)) * 3
    s = rng.normal(size=(3, 5, 40)) * 3
    tau = 2.0
    got = np.asarray(
        kl_per_token(match_vocab(jnp.asarray(t, jnp.float32), 40), jnp.asarray(s, jnp.float32), tau)
    )
    tt = t[..., :40] if v_teacher >= 40 else t  # ARWKV: a larger teacher vocabulary is cut off
    lp_t = _np_log_softmax(tt / tau)
    lp_s = _np_log_softmax(s / tau)[..., : tt.shape[-1]] if v_teacher < 40 else _np_log_softmax(s / tau)
    # a smaller teacher vocabulary puts zero mass on the student's extra ids (they only normalise p_S)
    want = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1) * tau**2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got))


def test_l2_norm_gradient_is_zero_at_zero():
    g = jax.grad(lambda x: l2_norm(x).sum())(jnp.zeros((2, 3)))
    assert np.array_equal(np.asarray(g), np.zeros((2, 3)))
    x = jnp.asarray([[3.0, 4.0]])
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: l2_norm(x).sum())(x)), [[0.6, 0.8]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The upcycling identity and teacher forcing


@pytest.fixture(scope="module")
def upcycled():
    return upcycled_base()


def _forward_parts(student, qwen, bt):
    """Everything the references need, in one jitted function: the teacher's per-layer inputs and attention
    outputs, each student layer's branches run on the teacher's input (teacher-forced), and the student's own
    free-running attention outputs."""
    gd, params, rest = nnx.split(student, nnx.Param, ...)
    tgd, tparams = nnx.split(qwen, nnx.Param)

    @jax.jit
    def parts(params, tparams):
        teacher, model = nnx.merge(tgd, tparams), nnx.merge(gd, params, rest)
        t_out = teacher.forward_with_intermediates(bt["tokens"], bt["segment_ids"], bt["positions"])
        seg, _, rope = model.prepare(bt["tokens"], bt["segment_ids"], bt["positions"])
        forced = []
        for i, layer in enumerate(model.layers.views()):
            out = layer.self_attn(layer.input_layernorm(t_out.hidden_states[i]), LayerContext(rope, seg))
            forced.append({"state": out.state_branch, "hybrid": out.o})
        free = model.forward_with_intermediates(bt["tokens"], bt["segment_ids"], bt["positions"])
        return t_out.attn_outputs, forced, free.attn_outputs

    return jax.device_get(parts(params, tparams))


def _np_align(a, s, real):
    """mean over real tokens of ‖a − s‖₂ / √d (float64)."""
    a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
    return float(np.sqrt(((a - s) ** 2).sum(-1))[real].mean() / math.sqrt(a.shape[-1]))


@pytest.fixture(scope="module")
def align_fn(upcycled):
    """One jitted function: the align metrics of both branches (teacher: self)."""
    _, qwen, _, student = upcycled
    gd, _, rest = nnx.split(student, nnx.Param, ...)
    tgd, tparams = nnx.split(qwen, nnx.Param)
    paths = (frozenset(per_layer_params(qwen)), qwen.layers.groups)  # per layer, restacked as the teacher's
    objs = {
        "hybrid": AlignObjective(gd, (0, 1), tgd, branch="hybrid", teacher_paths=paths),
        "state": AlignObjective(gd, (0, 1), tgd, branch="state", teacher_paths=paths),
    }

    @jax.jit
    def metrics(params, bt):
        out = {}
        for name, obj in objs.items():
            total, sums, _ = obj(params, rest, bt, None)
            n = obj.count(bt)
            out[name] = {"loss": total / n, **{k: v / n for k, v in sums.items()}}
        return out

    return lambda model, bt: jax.device_get(metrics(nnx.state(model, nnx.Param), bt))


def test_align_identity_at_init_and_teacher_forcing(upcycled, align_fn):
    qcfg, qwen, wcfg, student = upcycled
    bt = batch()
    real = np.asarray(bt["segment_ids"]) > 0
    m = align_fn(student, bt)
    # hybrid branch: the upcycled layer IS the teacher's attention -> zero loss; the state branch is not
    assert m["hybrid"]["loss"] < 1e-6
    t_attn, forced, _ = _forward_parts(student, qwen, bt)
    ref = [_np_align(t_attn[i], forced[i]["state"], real) for i in range(2)]
    assert m["state"]["loss"] > 0.05
    np.testing.assert_allclose([m["state"]["align/layer_0"], m["state"]["align/layer_1"]], ref, rtol=1e-5)
    np.testing.assert_allclose(m["state"]["loss"], np.mean(ref), rtol=1e-5)

    # Teacher forcing: move layer 0's fused output away from the teacher; layer 1 is still fed the
    # teacher's hidden state, so its loss is the teacher-forced value, not the free-running one.
    moved = nnx.clone(student)
    o_state = ("layers", 0, "self_attn", "o_state")
    with pytest.raises(ValueError, match="read-only view"):  # a view cannot be written through
        moved.layers.view(0).self_attn.o_state.set_value(jnp.zeros(per_layer_params(moved)[o_state].shape))
    set_per_layer_params(moved, {o_state: np.full(per_layer_params(moved)[o_state].shape, 0.05, np.float32)})
    m = align_fn(moved, bt)
    t_attn, forced, free = _forward_parts(moved, qwen, bt)
    ref = [_np_align(t_attn[i], forced[i]["hybrid"], real) for i in range(2)]
    assert ref[0] > 1e-3
    np.testing.assert_allclose(
        [m["hybrid"]["align/layer_0"], m["hybrid"]["align/layer_1"]], ref, rtol=1e-5, atol=1e-7
    )
    free_loss = _np_align(t_attn[1], free[1], real)
    assert abs(free_loss - m["hybrid"]["align/layer_1"]) > 1e-3 * free_loss


def test_distill_kl_of_the_upcycled_model_is_zero_at_init(upcycled):
    qcfg, qwen, wcfg, student = upcycled
    bt = batch()
    gd, params, rest = nnx.split(student, nnx.Param, ...)
    tgd, tparams = nnx.split(qwen, nnx.Param)
    other = jax.tree.map(lambda x: x * 1.5, tparams)  # a different teacher, for scale
    obj = DistillObjective(gd, tgd, wcfg.vocab_size, kl_weight=1.0, ce_weight=0.5, temperature=2.0)
    fn = jax.jit(lambda p, e: obj(p, rest, bt, e)[:2])
    (total, sums), (_, sums_other) = fn(params, tparams), fn(params, other)
    n = float(obj.count(bt))
    kl, kl_other = float(sums["kl"]) / n, float(sums_other["kl"]) / n
    assert kl_other > 1e-3 and kl < 1e-6 * max(kl_other, 1.0)  # zero up to float32 rounding of the logits
    np.testing.assert_allclose(float(total), float(sums["kl"]) + 0.5 * float(sums["ce"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(sums["ce"]), float(sums_other["ce"]), rtol=1e-6
    )  # CE is the student's alone


# ----------------------------------------------------------------------------------------------------
# Parameter groups and the trainable split


def test_parameter_groups_and_split(upcycled):
    _, _, wcfg, student = upcycled
    params = nnx.state(student, nnx.Param)
    paths = [tuple(p) for p, _ in nnx.to_flat_state(params)]
    group = {g: {p for p in paths if in_group(g, p)} for g in GROUPS}
    new = {(*("layers", i, "self_attn"), n) for i in range(wcfg.num_layers) for n in hybrid_param_names(wcfg)}
    assert group["hybrid"] == {p for p in paths if all(q[:4] in new for q in layer_paths(student, p))}
    assert group["state"] | group["fusion"] == group["hybrid"] and not group["state"] & group["fusion"]
    assert group["base"] == set(paths) - group["hybrid"]
    base_parts = ("embeddings", "attention", "mlp", "norms")
    assert set().union(*(group[g] for g in base_parts)) == group["base"]
    assert sum(len(group[g]) for g in base_parts) == len(group["base"])  # disjoint
    # state stream = what the state branch W_O[R] depends on, besides the frozen attention weights
    assert {p[-1] for p in group["state"]} == {
        "mu_r", "mu_kappa", "mu_w", "mu_a", "mu_g", "r_proj", "kappa_proj", "w0", "w1", "w2", "a0", "a1", "a2",
        "k_a", "g1", "g2", "r_k", "ln_x_scale", "ln_x_bias",
    }  # fmt: skip

    split = trainable_split(params, ("state",), ())
    assert split.trained == group["state"]
    split = trainable_split(params, ("all",), ("mlp", r"^lm_head\."))
    assert split.trained == set(paths) - group["mlp"] - {("lm_head", "kernel")}
    train_p, frozen_p = split.split(params)
    assert len(jax.tree.leaves(train_p)) == len(split.trained)
    assert jax.tree.structure(split.merge(train_p, frozen_p)) == jax.tree.structure(params)
    assert trainable_split(params, ("all",), ()) is None
    with pytest.raises(ConfigError, match=r"stage.freeze\[0\].*mpl"):
        trainable_split(params, (), ("mpl",))
    with pytest.raises(ConfigError, match="nothing is left to train"):
        trainable_split(params, ("state",), ("hybrid",))


def test_stage_config_errors(tmp_path):
    base = {"run_dir": str(tmp_path / "r"), "model": {"family": "wuneng"}, "steps": 1, "global_batch_size": 8,
            "seq_len": 16, "data": {"store": "s"}}  # fmt: skip
    with pytest.raises(ConfigError, match="stage.teacher.*distill needs a teacher"):
        from_dict({**base, "stage": {"kind": "distill"}})
    with pytest.raises(ConfigError, match="stage.align_branch"):
        from_dict({**base, "stage": {"kind": "align", "align_branch": "fused"}})
    with pytest.raises(ConfigError, match="stage.teacher.*sft stage has no teacher"):
        from_dict({**base, "stage": {"kind": "sft", "teacher": "x"}, "data": {"chat": {"sample": 1}}})
    src = sources.open_source(dict(PIPE["base"]), "stage.init_from")
    assert src.kind == "random" and src.seed == 0
    with pytest.raises(ConfigError, match="model.hidden_size.*differs"):
        sources.student_config(
            src, {"family": "wuneng", "hidden_size": 64}, dtype="float32", remat="none", untie=False
        )
    with pytest.raises(ConfigError, match="does not exist"):
        sources.open_source(str(tmp_path / "nope"), "stage.init_from")
    cfg = sources.student_config(
        src, {"family": "wuneng", "fusion": "add"}, dtype="bfloat16", remat="none", untie=True
    )
    assert cfg.fusion == "add" and cfg.dtype == "bfloat16" and cfg.hidden_size == 32


def test_hf_qwen2_source_is_upcycled_and_untied():
    """The real-checkpoint path: a Hugging Face Qwen2 directory (tied head) -> upcycled, untied student."""
    from jax.sharding import AxisType, Mesh
    from safetensors.numpy import load_file

    from train.config import MESH_AXES
    from wuneng_jax.sharding import DEFAULT_RULES

    hf_dir = REPO / "tests" / "golden" / "qwen2_tiny_tied"
    src = sources.open_source(str(hf_dir), "stage.init_from")
    assert src.kind == "hf_qwen2" and src.cfg.tie_word_embeddings
    cfg = sources.student_config(
        src, {"family": "wuneng", **HYBRID}, dtype="float32", remat="none", untie=True
    )
    assert type(cfg).__name__ == "WuNengConfig" and not cfg.tie_word_embeddings and cfg.hidden_size == 64
    mesh = Mesh(np.array(jax.devices()[:1]).reshape((1,) * 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    params, _ = sources.load_student(src, cfg, mesh=mesh, rules=DEFAULT_RULES, upcycle_seed=0)
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    stacked = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
    got = {".".join(map(str, p)): v for p, v in unstack_model_flat(abstract, stacked).items()}  # per layer
    hf = load_file(str(hf_dir / "model.safetensors"))
    emb = hf["model.embed_tokens.weight"]
    assert np.array_equal(got["embed_tokens.embedding"], emb) and np.array_equal(got["lm_head.kernel"], emb.T)
    q = hf["model.layers.1.self_attn.q_proj.weight"].T  # [d, H*D]
    assert np.array_equal(got["layers.1.self_attn.q_proj.kernel"], q)
    assert np.array_equal(
        got["layers.1.self_attn.kappa_proj"], hf["model.layers.1.self_attn.k_proj.weight"].T
    )
    r_hat = q.reshape(64, 2, 2, 16).mean(axis=2).reshape(64, 32)  # W_R̂ = group mean of W_Q
    np.testing.assert_allclose(got["layers.1.self_attn.r_proj"], r_hat, rtol=1e-6, atol=1e-7)
    assert set(got) == {".".join(map(str, p)) for p in per_layer_params(abstract)}


# ----------------------------------------------------------------------------------------------------
# The pipeline end to end (configs/upcycle/tiny.yaml, shortened)

STEPS = 12


def _overrides(root: Path, store: str) -> list[str]:
    """tiny.yaml, cut down for CI: one layer, the scan WKV kernel (quicker to compile), a compact chat
    template (shorter rows), and FSDP for distill so the teacher is really sharded like the student."""
    return [
        f"root={root}",
        f"common.data.store={store}",
        "common.log.progress=false",
        "base.num_layers=1",
        "common.model.wkv_impl=reference",
        f"align.steps={STEPS}",
        f"distill.steps={STEPS}",
        f"sft.steps={STEPS}",
        "sft.seq_len=128",
        'sft.data.chat.template={turn_start: "{role}:", turn_end: "\\n", turn_separator: ""}',
        "distill.mesh={data: 4, fsdp: 2}",
    ]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upcycle")
    store = make_store(tmp / "store")
    overrides = _overrides(tmp / "pipe", store)
    pipe = load_pipeline(TINY, overrides)
    trainers: dict[str, Trainer] = {}
    initial: dict[str, dict] = {}

    def factory(cfg):
        name = Path(cfg.run_dir).name
        tr = trainers[name] = Trainer(cfg, echo=lambda s: None)
        make_initial = tr._initial_state

        def keep_initial():  # a host copy of each stage's step-0 parameters
            state = make_initial()
            initial[name] = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}
            return state

        tr._initial_state = keep_initial
        return tr

    status = run_pipeline(pipe, trainer_factory=factory, echo=lambda s: None)
    return {"pipe": pipe, "overrides": overrides, "status": status, "trainers": trainers, "initial": initial}


def _metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def _final_params(run_dir: Path):
    from train.generate import load_orbax

    loaded = load_orbax(Path(run_dir) / "checkpoints")
    assert loaded.step == STEPS
    return loaded.model, {
        tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param))
    }


def test_each_stage_lowers_its_own_loss(pipeline):
    assert pipeline["status"]["stages"] == {"align": "ran", "distill": "ran", "sft": "ran"}
    for name, cfg in pipeline["pipe"].stages:
        recs = _metrics(cfg.run_dir)
        losses = [r["loss"] for r in recs]
        assert len(losses) == STEPS and all(r["skipped"] == 0 for r in recs)
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        assert last < 0.85 * first, (name, losses)
        if name == "align":  # per-layer losses are logged (one layer here)
            assert all(r["align/layer_0"] == r["loss"] for r in recs)
        if name == "distill":
            assert all({"kl", "ce"} <= set(r) for r in recs)


def test_frozen_parameters_are_bit_identical(pipeline):
    stages = dict(pipeline["pipe"].stages)
    start = pipeline["initial"]["align"]  # the upcycled base
    _, aligned = _final_params(stages["align"].run_dir)
    _, distilled = _final_params(stages["distill"].run_dir)
    assert set(start) == set(aligned) == set(distilled)
    # each later stage starts exactly where the previous one ended
    assert all(pipeline["initial"]["distill"][p].tobytes() == aligned[p].tobytes() for p in aligned)
    trained_align = {p for p in start if in_group("state", p)}
    # every trained state tensor moved, every other one is bit-identical
    assert all(not np.array_equal(start[p], aligned[p]) for p in trained_align)
    assert all(start[p].tobytes() == aligned[p].tobytes() for p in start if p not in trained_align)
    # distill (freeze: [mlp]): the MLPs stay bit-identical, the rest moves
    mlp = {p for p in start if in_group("mlp", p)}
    assert mlp and all(aligned[p].tobytes() == distilled[p].tobytes() for p in mlp)
    assert not np.array_equal(
        aligned[("embed_tokens", "embedding")], distilled[("embed_tokens", "embedding")]
    )
    # optimizer state exists for the trained parameters only (first and second moments)
    for name, group in (("align", trained_align), ("distill", set(start) - mlp)):
        opt = pipeline["trainers"][name].layout.abstract.opt_state
        n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt) if x.ndim > 0)
        assert n_opt == 2 * sum(start[p].size for p in group), name


def test_export_reloads_exactly(pipeline):
    from wuneng_jax.convert.hf_wuneng import load_wuneng

    export = pipeline["status"]["export"]
    hf = json.loads((export / "config.json").read_text())
    assert hf["model_type"] == "wuneng" and hf["fusion"] == "full" and hf["state_head_size"] == 16
    cfg, model = load_wuneng(export, wkv_impl="reference")
    run_model, final = _final_params(dict(pipeline["pipe"].stages)["sft"].run_dir)
    structural = lambda c: {k: v for k, v in mc.config_to_dict(c).items() if k not in sources.RUNTIME_FIELDS}
    assert structural(cfg) == structural(run_model.cfg)
    got = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(got) == set(final) and all(got[p].tobytes() == final[p].tobytes() for p in final)
    # the export carries its tokenizer (byte-level here): `wuneng generate EXPORT` needs no --tokenizer
    from train.data.tokenizer import ByteTokenizer
    from train.generate import load_model, load_tokenizer_for

    loaded = load_model(export)
    assert loaded.tokenizer_spec == "byte" and isinstance(load_tokenizer_for(loaded), ByteTokenizer)


def test_pipeline_skips_complete_stages_and_resumes_a_partial_one(pipeline, tmp_path):
    root = pipeline["pipe"].root
    calls = []

    class Fake:
        def __init__(self, cfg):
            calls.append(cfg)

        def run(self):
            return RunResult(STEPS, calls[-1].steps, {}, [], None, None, False)

    out = run_pipeline(load_pipeline(TINY, pipeline["overrides"]), trainer_factory=Fake, echo=lambda s: None)
    assert out["stages"] == {"align": "skipped", "distill": "skipped", "sft": "skipped"} and calls == []
    # more sft steps: only sft runs (the Trainer resumes it from its newest checkpoint)
    out = run_pipeline(load_pipeline(TINY, [*pipeline["overrides"], "sft.steps=20"]), trainer_factory=Fake,
                       echo=lambda s: None)  # fmt: skip
    assert out["stages"] == {"align": "skipped", "distill": "skipped", "sft": "ran"}
    assert [Path(c.run_dir).name for c in calls] == ["sft"] and calls[0].stage.init_from == str(
        root / "distill"
    )
    # a stage that started from a different step of the previous stage is refused
    rec_path = root / "distill" / "upcycle_stage.json"
    rec = json.loads(rec_path.read_text())
    assert rec["init_step"] == STEPS
    rec_path.write_text(json.dumps({**rec, "init_step": 7}))
    try:
        with pytest.raises(
            ConfigError, match=r"started from step 7 of stage align, which now ends at step 12"
        ):
            run_pipeline(
                load_pipeline(TINY, pipeline["overrides"]), trainer_factory=Fake, echo=lambda s: None
            )
    finally:
        rec_path.write_text(json.dumps(rec))


def test_cli_dry_run_and_wiring(pipeline, capsys):
    from train.cli import main

    assert main(["upcycle", str(TINY), "--dry-run", *pipeline["overrides"]]) == 0
    out = capsys.readouterr().out
    docs = [yaml.safe_load(part.split("\n", 1)[1]) for part in out.split("# ---- stage ")[1:]]
    assert [d["stage"]["kind"] for d in docs] == ["align", "distill", "sft"]
    assert docs[1]["stage"]["init_from"] == str(pipeline["pipe"].root / "align")
    assert docs[0]["stage"]["init_from"] == {**PIPE["base"], "num_layers": 1}
    assert main(["upcycle", str(TINY), "--dry-run", "nostage.steps=3"]) == 2
    bad = copy.deepcopy(PIPE)
    bad["base"] = None
    with pytest.raises(ConfigError, match="pipeline field `base`"):
        load_pipeline({**bad, "stages": {"align": str(TINY.parent / "align.yaml")}})

"""A training config's ``stage`` section -> what the Trainer needs to run it (:class:`StagePlan`).

The plan is built from configs alone (abstract shapes, no weights): the student's model config
(from ``stage.init_from`` or ``model``), the trainable/frozen split, the objective, the teacher (its
config, graph and shardings; its weights load when the run starts, never into checkpoints) and the
data hook for chat data. Weights load lazily through :meth:`StagePlan.initial_params` (only when the
run has no checkpoint to resume) and :meth:`TeacherPlan.load` (every start).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from train.config import ConfigError, Rules, TrainConfig, resolve_model_config
from train.mesh import mesh_context
from train.upcycle import sources
from train.upcycle.params import TrainableSplit, describe_split, trainable_split
from wuneng_jax.layers.stack import layer_paths, per_layer_params
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config
from wuneng_jax.models.wuneng import WuNeng, WuNengConfig


@dataclasses.dataclass
class TeacherPlan:
    """A frozen teacher from a source: ``cfg`` (compute and storage in the run's dtype) and its graph."""

    source: sources.Source
    cfg: Qwen2Config
    graphdef: Any

    @classmethod
    def create(cls, src: sources.Source, dtype: str) -> TeacherPlan:
        cfg = sources.teacher_config(src, dtype=dtype)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        return cls(src, cfg, graphdef)

    def _abstract(self, mesh, rules: Rules) -> tuple[Any, Any]:
        """(abstract parameter State, its NamedShardings) as built under ``mesh``/``rules``."""
        from train.state import specs_to_shardings

        with mesh_context(mesh, rules):
            abstract = nnx.state(nnx.eval_shape(lambda: Qwen2(self.cfg, rngs=nnx.Rngs(0))), nnx.Param)
            return abstract, specs_to_shardings(nnx.get_partition_spec(abstract), mesh)

    def shardings(self, mesh, rules: Rules) -> Any:
        return self._abstract(mesh, rules)[1]

    def load(self, mesh, rules: Rules) -> Any:
        """The teacher's parameters, sharded with the same rules as any model on ``mesh``."""
        from train.state import conform_params

        abstract, shardings = self._abstract(mesh, rules)
        params = sources.load_teacher(self.source, self.cfg, mesh=mesh, rules=rules)
        params = conform_params(params, abstract, f"stage.teacher ({self.source.where})")
        return jax.device_put(params, shardings)


@dataclasses.dataclass
class StagePlan:
    """Everything a stage changes in a training run (module docstring)."""

    kind: str
    model_cfg: Any
    trainable: TrainableSplit | None = None
    make_objective: Callable[[Any], Any] | None = None  # graphdef -> Objective (None: CE)
    teacher: TeacherPlan | None = None
    init_source: sources.Source | None = None
    upcycle_seed: int = 0
    data_factory: Callable[[Any], tuple[Any, Any]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def initial_params(self, mesh, rules: Rules) -> tuple[Any, Any] | None:
        """``(params, rest)`` from ``stage.init_from`` (None: random init)."""
        if self.init_source is None:
            return None
        return sources.load_student(
            self.init_source, self.model_cfg, mesh=mesh, rules=rules, upcycle_seed=self.upcycle_seed
        )


def plan_stage(cfg: TrainConfig, *, model_builder: Callable[..., Any] | None = None) -> StagePlan:
    """The :class:`StagePlan` of ``cfg`` (a plain pretraining run gives a plan that changes nothing)."""
    st = cfg.stage
    init_source = None
    if st.init_from is not None:
        init_source = sources.open_source(st.init_from, "stage.init_from")
        model_cfg = sources.student_config(
            init_source, cfg.model, dtype=cfg.dtype, remat=cfg.remat, untie=st.untie_embeddings
        )
    else:
        if st.untie_embeddings:
            raise ConfigError(
                "config field `stage.untie_embeddings`: applies to weights loaded with stage.init_from; for a "
                "random init set model.tie_word_embeddings=false"
            )
        model_cfg = resolve_model_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat)
    plan = StagePlan(st.kind, model_cfg, init_source=init_source, upcycle_seed=cfg.seed)
    if init_source is not None:
        plan.notes.append(f"student weights from {init_source.where}")

    if cfg.data.chat.enabled:
        from train.data.chat import data_factory

        plan.data_factory = data_factory

    trivial = st.kind in ("pretrain", "sft") and not st.trainable and not st.freeze
    if trivial:
        return plan

    if model_builder is None:
        from wuneng_jax.models import build_model

        model_builder = build_model
    abstract = nnx.state(nnx.eval_shape(lambda: model_builder(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    default = {"align": ("state",) if st.align_branch == "state" else ("hybrid",)}.get(st.kind, ("all",))
    plan.trainable = trainable_split(abstract, st.trainable or default, st.freeze)
    plan.notes.append(describe_split(abstract, plan.trainable))

    if st.kind == "align":
        _plan_align(plan, cfg, abstract)
    elif st.kind == "distill":
        plan.teacher = TeacherPlan.create(sources.open_source(st.teacher, "stage.teacher"), cfg.dtype)
        plan.notes.append(f"teacher: {plan.teacher.source.where}")
        from train.upcycle.objectives import DistillObjective

        teacher = plan.teacher
        vocab = int(model_cfg.vocab_size)
        if teacher.cfg.vocab_size != vocab:
            how = "cut to" if teacher.cfg.vocab_size > vocab else "padded (probability 0) to"
            plan.notes.append(f"teacher vocabulary {teacher.cfg.vocab_size} {how} the student's {vocab}")
        plan.make_objective = lambda graphdef: DistillObjective(
            graphdef,
            teacher.graphdef,
            vocab,
            kl_weight=st.kl_weight,
            ce_weight=st.ce_weight,
            temperature=st.kl_temperature,
            vocab_tile=cfg.loss_vocab_tile,
        )
    return plan


def _plan_align(plan: StagePlan, cfg: TrainConfig, abstract: Any) -> None:
    from train.upcycle.objectives import AlignObjective

    st = cfg.stage
    model_cfg = plan.model_cfg
    if not isinstance(model_cfg, WuNengConfig):
        raise ConfigError(
            "config field `stage.kind`: align trains the state heads of a wuneng model; set model.family=wuneng"
        )
    if st.teacher in (None, "self"):
        tcfg = dataclasses.replace(model_cfg.to_qwen2(), dtype=cfg.dtype)
        tcfg = sources._with_runtime(tcfg, remat="none")
        teacher = nnx.eval_shape(lambda: Qwen2(tcfg, rngs=nnx.Rngs(0)))
        tgraph = nnx.split(teacher, nnx.Param)[0]
        paths = frozenset(per_layer_params(teacher))  # per layer: the layouts of the two stacks differ
        student = nnx.eval_shape(lambda: WuNeng(model_cfg, rngs=nnx.Rngs(0)))
        trained = (
            {tuple(p) for p, _ in nnx.to_flat_state(abstract)}
            if plan.trainable is None
            else plan.trainable.trained
        )
        trained = {q for p in trained for q in layer_paths(student, p)}
        bad = sorted(".".join(map(str, p)) for p in trained & paths)
        if bad:
            raise ConfigError(
                f"config field `stage.trainable`: align with teacher `self` takes the targets from the student's "
                f"own Qwen2 weights, which must stay frozen, but {bad[:4]} would train; freeze them (freeze: "
                "[base]) or name a separate teacher"
            )
        plan.notes.append("teacher: the student's own frozen Qwen2 weights (teacher: self)")
        tgraph_, tpaths, layer_ids = tgraph, (paths, teacher.layers.groups), model_cfg.hybrid_layer_ids
    else:
        plan.teacher = TeacherPlan.create(sources.open_source(st.teacher, "stage.teacher"), cfg.dtype)
        t = plan.teacher.cfg
        for name in ("hidden_size", "num_layers"):
            if getattr(t, name) != getattr(model_cfg, name):
                raise ConfigError(
                    f"config field `stage.teacher`: align feeds the teacher's hidden states into the student's "
                    f"layers, so {name} must match ({getattr(t, name)} vs the student's {getattr(model_cfg, name)})"
                )
        plan.notes.append(f"teacher: {plan.teacher.source.where}")
        tgraph_, tpaths, layer_ids = plan.teacher.graphdef, None, model_cfg.hybrid_layer_ids
    plan.notes.append(
        f"align: branch {st.align_branch}, layers {list(layer_ids)}, teacher-forced inputs, per-layer losses "
        "logged as align/layer_<i>"
    )
    branch = st.align_branch
    plan.make_objective = lambda graphdef: AlignObjective(
        graphdef, tuple(layer_ids), tgraph_, branch=branch, teacher_paths=tpaths
    )


__all__ = ["StagePlan", "TeacherPlan", "plan_stage"]

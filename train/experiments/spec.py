"""The experiment file (``configs/experiments/<name>.yaml``): variants × tasks × sequence lengths × seeds.

Schema (defaults in brackets)::

    name: str                          # used in the report
    out_dir: str                       # the experiment directory (runs/, results.*, plots)
    seeds: [int, ...]                  # one training run per seed (init, data order)
    workers: int [1]                   # runs trained in parallel (processes; each gets its own XLA)
    compile_cache: bool [true]         # JAX persistent compilation cache in out_dir/jax_cache
    eval: {seed [1000], examples [256]}  # held-out examples per (task, seq_len): the eval stream of `seed`
    train: {...}                       # TrainConfig fields shared by every run (steps, global_batch_size,
                                       # dtype, optimizer, checkpoint, log, ...); the runner sets run_dir,
                                       # model, seq_len, seed and data itself
    params: {reference: <variant>, tolerance [0.03]}   # parameter matching (below)
    variants:                          # name -> model config mapping (wuneng_jax.config) + runner keys
      <name>: {family: ..., <fields>, tune: <int field> | null, tune_multiple [8]}
    shared: {...}                      # free-form, ignored: a place for YAML anchors (&attention)
    tasks:                             # name -> task
      <name>: {kind: mqar, seq_lens: [...], num_pairs: int | {seq_len: int} | null [= seq_len // 16],
               num_keys [32], num_values [32], num_queries [= num_pairs], min_pairs [null]: each training
               row draws min_pairs..num_pairs pairs (uniform), held-out rows num_pairs; joint [false]:
               one token per key-value pair and per query}
      <name>: {kind: state_tracking, seq_lens: [...], group [S5]}
      <name>: {kind: recall_state, seq_lens: [...], num_pairs: int | {seq_len: int}, group [S3],
               num_keys [32], num_values [32], num_queries [= num_pairs]}   # the combined task
      <name>: {kind: lm, seq_lens: [...], store, prepare [[]], tokenizer [byte], eval_fraction [0.01],
               stdlib_max_files, stdlib_max_bytes, eval_batches [8]}
      # any task: `variants: [name, ...]` trains only those variants on it [all]; `train: {...}` overrides
      # the shared `train` fields for this task's runs (merged key by key, nested mappings too)
    upcycle: {...}                     # optional: the upcycling-value experiment (train.experiments.upcycle_value)

``vocab_size`` is set by the runner, per task: a synthetic task's own vocabulary (the largest over its
``seq_lens``) rounded up to a multiple of 8, the store's vocabulary rounded up to a multiple of 64 for an
``lm`` task. (Each task's parameter matching is done at its own vocabulary: an MQAR with one token per
pair has a vocabulary of hundreds, a word problem of a few.)

**Parameter matching.** The ``reference`` variant keeps its fields; every variant with ``tune: <field>``
(an integer width such as ``intermediate_size`` or ``dim_ffn``) gets that field set, in steps of
``tune_multiple``, to the value whose total parameter count is nearest the reference's (per
vocabulary). A variant further than ``tolerance`` (relative) from the reference is an error.

Overrides (``key=value``, dotted, YAML values) apply to the raw mapping before validation, as for
``wuneng train``: ``train.steps=50``, ``seeds=[0,1]``, ``tasks.mqar.seq_lens=[64]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from train.config import ConfigError, apply_override, load_config
from train.data import synthetic
from wuneng_jax.files import read_yaml

TASK_KINDS = ("mqar", "state_tracking", "recall_state", "lm")
_SYNTHETIC = {
    "mqar": synthetic.MQAR,
    "state_tracking": synthetic.StateTracking,
    "recall_state": synthetic.RecallState,
}
RUNNER_TRAIN_KEYS = ("run_dir", "model", "seq_len", "seed", "data")
_TOP_KEYS = (
    "name",
    "out_dir",
    "seeds",
    "workers",
    "compile_cache",
    "eval",
    "train",
    "params",
    "variants",
    "tasks",
    "shared",
    "upcycle",
)
_LM_KEYS = (
    "store",
    "prepare",
    "tokenizer",
    "eval_fraction",
    "stdlib_max_files",
    "stdlib_max_bytes",
    "eval_batches",
)


class ExperimentError(ConfigError):
    """The experiment file is invalid (names the field and the fix)."""


def _fail(field: str, problem: str) -> Any:
    raise ExperimentError(f"experiment field `{field}`: {problem}")


def _int(value: Any, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _int_list(value: Any, field: str, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        _fail(field, f"expected a non-empty list of integers, got {value!r}")
    out = tuple(_int(v, f"{field}[{i}]", minimum) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        _fail(field, f"repeated values in {list(out)}")
    return out


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(field, f"expected a mapping, got {value!r}")
    return dict(value)


def _check_keys(d: Mapping[str, Any], known: Sequence[str], field: str) -> None:
    for key in d:
        if key not in known:
            _fail(f"{field}.{key}" if field else str(key), f"unknown key; known: {', '.join(known)}")


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of the grid: ``kind`` and its parameters (``params``: everything but kind/seq_lens)."""

    name: str
    kind: str
    seq_lens: tuple[int, ...]
    params: dict[str, Any]
    variants: tuple[str, ...] | None = None  # None: every variant of the experiment
    train: dict[str, Any] | None = None  # overrides of the shared `train` fields for this task's runs

    @property
    def is_lm(self) -> bool:
        return self.kind == "lm"

    def synthetic(self, seq_len: int) -> synthetic.Task:
        """The generator of this task at ``seq_len`` (synthetic kinds only)."""
        if self.is_lm:
            raise ValueError(f"task {self.name!r} is a language-modelling task, not a synthetic one")
        params = dict(self.params)
        if self.kind in ("mqar", "recall_state"):
            pairs = params.get("num_pairs")
            if pairs is None:
                pairs = max(1, seq_len // 16)
            elif isinstance(pairs, Mapping):
                if seq_len not in pairs:
                    _fail(f"tasks.{self.name}.num_pairs", f"no entry for seq_len {seq_len}")
                pairs = pairs[seq_len]
            params["num_pairs"] = pairs
        try:
            return synthetic.make_task(self.kind, seq_len, **params)
        except ValueError as e:
            raise ExperimentError(f"experiment field `tasks.{self.name}` at seq_len {seq_len}: {e}") from None

    def describe(self, seq_len: int) -> dict[str, Any]:
        """JSON-able description of the task at ``seq_len`` (for the report and the run fingerprint)."""
        if self.is_lm:
            return {"kind": "lm", "seq_len": seq_len, **self.params}
        return {"kind": self.kind, **dataclasses.asdict(self.synthetic(seq_len))}


def _parse_task(name: str, raw: Any) -> TaskSpec:
    field = f"tasks.{name}"
    raw = _mapping(raw, field)
    kind = raw.pop("kind", None)
    if kind not in TASK_KINDS:
        _fail(f"{field}.kind", f"{kind!r} is not one of {', '.join(TASK_KINDS)}")
    if "seq_lens" not in raw:
        _fail(f"{field}.seq_lens", "is required (a list of sequence lengths)")
    seq_lens = _int_list(raw.pop("seq_lens"), f"{field}.seq_lens", 2)
    only = raw.pop("variants", None)
    if only is not None:
        if isinstance(only, str):
            only = [only]
        if not isinstance(only, list | tuple) or not only or not all(isinstance(v, str) for v in only):
            _fail(f"{field}.variants", f"expected a non-empty list of variant names, got {only!r}")
        only = tuple(only)
    train = raw.pop("train", None)
    if train is not None:
        train = dict(_mapping(train, f"{field}.train"))
    if kind == "lm":
        _check_keys(raw, _LM_KEYS, field)
        if not raw.get("store"):
            _fail(f"{field}.store", "is required: the token store path (e.g. runs/data/stdlib)")
        raw.setdefault("prepare", [])
        if isinstance(raw["prepare"], str):
            raw["prepare"] = [raw["prepare"]]
        raw.setdefault("tokenizer", "byte")
        raw.setdefault("eval_fraction", 0.01)
        raw.setdefault("eval_batches", 8)
        _int(raw["eval_batches"], f"{field}.eval_batches")
    else:
        cls = _SYNTHETIC[kind]
        known = [f.name for f in dataclasses.fields(cls) if f.name != "seq_len"]
        _check_keys(raw, known, field)
        pairs = raw.get("num_pairs")
        if isinstance(pairs, Mapping):
            raw["num_pairs"] = {int(k): _int(v, f"{field}.num_pairs.{k}") for k, v in pairs.items()}
    spec = TaskSpec(name=name, kind=kind, seq_lens=seq_lens, params=raw, variants=only, train=train)
    if not spec.is_lm:
        for t in seq_lens:
            spec.synthetic(t)  # validates every grid point now
    return spec


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A model variant: a model-config mapping (``family`` + fields, no ``vocab_size``) and its tuning knob."""

    name: str
    model: dict[str, Any]
    tune: str | None = None
    tune_multiple: int = 8

    @property
    def family(self) -> str:
        return self.model["family"]


def _parse_variant(name: str, raw: Any) -> VariantSpec:
    field = f"variants.{name}"
    raw = _mapping(raw, field)
    tune = raw.pop("tune", None)
    multiple = _int(raw.pop("tune_multiple", 8), f"{field}.tune_multiple")
    if "family" not in raw:
        _fail(f"{field}.family", "is required (qwen2, rwkv7 or wuneng)")
    if "vocab_size" in raw:
        _fail(f"{field}.vocab_size", "is set by the runner from the task (remove it)")
    if tune is not None:
        if not isinstance(tune, str) or tune not in raw:
            _fail(
                f"{field}.tune",
                f"{tune!r} must name an integer field of this variant (e.g. intermediate_size)",
            )
        _int(raw[tune], f"{field}.{tune}")
    from wuneng_jax.config import load_model_config

    try:
        load_model_config({**raw, "vocab_size": 64})
    except (ValueError, TypeError) as e:
        _fail(field, str(e))
    return VariantSpec(name=name, model=raw, tune=tune, tune_multiple=multiple)


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    out_dir: str
    seeds: tuple[int, ...]
    train: dict[str, Any]
    variants: tuple[VariantSpec, ...]
    tasks: tuple[TaskSpec, ...]
    reference: str
    tolerance: float = 0.03
    eval_seed: int = 1000
    eval_examples: int = 256
    workers: int = 1
    compile_cache: bool = True
    source: str = ""
    upcycle: Any = None  # train.experiments.upcycle_value.UpcycleSpec or None

    def task_variants(self, task: TaskSpec) -> tuple[VariantSpec, ...]:
        """The variants trained on ``task`` (its ``variants`` list, in the experiment's order)."""
        if task.variants is None:
            return self.variants
        return tuple(v for v in self.variants if v.name in task.variants)

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def global_batch_size(self) -> int:
        return int(self.train["global_batch_size"])


def load_experiment(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read an experiment YAML file (or mapping), apply ``key=value`` overrides, validate."""
    if isinstance(source, Mapping):
        raw = json.loads(json.dumps(source))
        origin = ""
    else:
        path = Path(source)
        if not path.is_file():
            raise ExperimentError(f"experiment file {str(path)!r} does not exist")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ExperimentError(f"experiment file {str(path)!r} must hold a YAML mapping at top level")
        origin = str(path)
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, origin)


def from_dict(raw: Mapping[str, Any], source: str = "") -> ExperimentSpec:
    raw = dict(raw)
    _check_keys(raw, _TOP_KEYS, "")
    for key in ("name", "out_dir", "seeds", "train", "variants", "tasks", "params"):
        if key not in raw:
            _fail(key, "is required")
    name, out_dir = raw["name"], raw["out_dir"]
    if not isinstance(name, str) or not name:
        _fail("name", f"expected a non-empty string, got {name!r}")
    if not isinstance(out_dir, str) or not out_dir:
        _fail("out_dir", f"expected a non-empty path, got {out_dir!r}")
    seeds = _int_list(raw["seeds"], "seeds", 0)
    workers = _int(raw.get("workers", 1), "workers")
    compile_cache = raw.get("compile_cache", True)
    if not isinstance(compile_cache, bool):
        _fail("compile_cache", f"expected true/false, got {compile_cache!r}")

    ev = _mapping(raw.get("eval"), "eval")
    _check_keys(ev, ("seed", "examples"), "eval")
    eval_seed = _int(ev.get("seed", 1000), "eval.seed", 0)
    eval_examples = _int(ev.get("examples", 256), "eval.examples")

    train = _mapping(raw["train"], "train")
    for key in RUNNER_TRAIN_KEYS:
        if key in train:
            _fail(f"train.{key}", "is set by the experiment runner per run (remove it)")
    if "global_batch_size" not in train or "steps" not in train:
        _fail("train", "needs at least steps and global_batch_size")
    try:  # validate the shared part now, with placeholders for the runner's fields
        load_config({**train, "run_dir": "x", "model": "x", "seq_len": 8, "data": {"store": "x"}})
    except ConfigError as e:
        raise ExperimentError(f"experiment section `train`: {e}") from None
    gbs = int(train["global_batch_size"])
    if eval_examples % gbs:
        _fail("eval.examples", f"{eval_examples} must be a multiple of train.global_batch_size={gbs}")

    variants_raw = _mapping(raw["variants"], "variants")
    if not variants_raw:
        _fail("variants", "needs at least one variant")
    variants = tuple(_parse_variant(str(n), v) for n, v in variants_raw.items())
    tasks_raw = _mapping(raw["tasks"], "tasks")
    if not tasks_raw:
        _fail("tasks", "needs at least one task")
    tasks = tuple(_parse_task(str(n), t) for n, t in tasks_raw.items())
    for task in tasks:
        if task.train is None:
            continue
        for key in (*RUNNER_TRAIN_KEYS, "global_batch_size"):
            if key in task.train:
                _fail(f"tasks.{task.name}.train.{key}", "cannot be set per task (remove it)")
        try:
            load_config(
                {
                    **_merged(train, task.train),
                    "run_dir": "x",
                    "model": "x",
                    "seq_len": 8,
                    "data": {"store": "x"},
                }
            )
        except ConfigError as e:
            raise ExperimentError(f"experiment section `tasks.{task.name}.train`: {e}") from None

    params = _mapping(raw["params"], "params")
    _check_keys(params, ("reference", "tolerance"), "params")
    reference = params.get("reference")
    names = [v.name for v in variants]
    if reference not in names:
        _fail("params.reference", f"{reference!r} is not one of the variants {names}")
    tolerance = params.get("tolerance", 0.03)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 1:
        _fail("params.tolerance", f"expected a number in [0, 1), got {tolerance!r}")
    if any(v.name == reference and v.tune for v in variants):
        _fail(f"variants.{reference}.tune", "the reference variant is not tuned (remove `tune`)")
    for t in tasks:
        unknown = sorted(set(t.variants or ()) - set(names))
        if unknown:
            _fail(f"tasks.{t.name}.variants", f"{unknown} are not variants of this experiment ({names})")
    upcycle = None
    if raw.get("upcycle") is not None:
        from train.experiments.upcycle_value import parse_upcycle

        upcycle = parse_upcycle(raw["upcycle"], seeds, eval_seed)
    return ExperimentSpec(
        name=name,
        out_dir=out_dir,
        seeds=seeds,
        train=train,
        variants=variants,
        tasks=tasks,
        reference=reference,
        tolerance=float(tolerance),
        eval_seed=eval_seed,
        eval_examples=eval_examples,
        workers=workers,
        compile_cache=compile_cache,
        source=source,
        upcycle=upcycle,
    )


# --------------------------------------------------------------------------------------------
# The run grid


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the grid, with everything a worker process needs (picklable)."""

    index: int
    task: TaskSpec
    seq_len: int
    variant: str
    seed: int
    run_dir: str
    train_cfg: dict[str, Any]  # a complete TrainConfig mapping
    eval_seed: int
    eval_examples: int

    @property
    def key(self) -> str:
        return f"{self.task.name}/T{self.seq_len}/{self.variant}/seed{self.seed}"

    @property
    def model(self) -> dict[str, Any]:
        return self.train_cfg["model"]

    @property
    def fingerprint(self) -> str:
        """sha256 of everything that determines the result (training config, task, held-out set)."""
        blob = {
            "train": {k: v for k, v in self.train_cfg.items() if k != "run_dir"},
            "task": self.task.describe(self.seq_len),
            "eval": [self.eval_seed, self.eval_examples],
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over`` key by key (nested mappings merged, everything else replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(dict(out[k]), v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return json.loads(json.dumps(out))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def synthetic_vocab(task: TaskSpec) -> int:
    """A synthetic task's model vocabulary: its largest over ``seq_lens``, rounded up to a multiple of 8."""
    return round_up(max(task.synthetic(n).vocab_size for n in task.seq_lens), 8)


def plan(spec: ExperimentSpec, models: Mapping[tuple[str, str], dict[str, Any]]) -> list[RunSpec]:
    """Every run of the grid, in order (seed, task, seq_len, variant). ``models[(task, variant)]`` is the
    variant's full model mapping for that task's vocabulary (from ``params.match_all``)."""
    runs: list[RunSpec] = []
    out = Path(spec.out_dir)
    for seed in spec.seeds:
        for task in spec.tasks:
            for seq_len in task.seq_lens:
                for v in spec.task_variants(task):
                    cfg = _merged(json.loads(json.dumps(spec.train)), task.train or {})
                    run_dir = out / "runs" / task.name / f"T{seq_len}" / v.name / f"seed{seed}"
                    cfg.update(
                        run_dir=str(run_dir),
                        model=dict(models[(task.name, v.name)]),
                        seq_len=seq_len,
                        seed=seed,
                        data={"store": task.params["store"] if task.is_lm else f"synthetic:{task.kind}"},
                    )
                    log = dict(cfg.get("log") or {})
                    log["progress"] = False  # the runner shows progress per run
                    cfg["log"] = log
                    runs.append(
                        RunSpec(
                            index=len(runs),
                            task=task,
                            seq_len=seq_len,
                            variant=v.name,
                            seed=seed,
                            run_dir=str(run_dir),
                            train_cfg=cfg,
                            eval_seed=spec.eval_seed,
                            eval_examples=spec.eval_examples,
                        )
                    )
    return runs

"""The upcycling-value experiment: is an upcycled WuNeng better than the Qwen2 it came from, after equal
extra training? (The WuNeng paper's central claim, at a size a CPU can run.)

Per seed, in ``out_dir/upcycle/seed<k>/`` (every step a normal run directory, resumable):

1. ``teacher``: a ``qwen2`` model pretrained (next-token CE) on the byte-level token store ``data.store``;
2. ``upcycle/align``, ``upcycle/distill``: the upcycling pipeline (:mod:`train.upcycle.pipeline`, the
   ``wuneng upcycle`` stages) with the teacher run as ``base``: align the state heads with the teacher's
   attention (state parameters only), then distil (``kl_weight`` · KL(teacher ‖ student) + ``ce_weight`` · CE;
   the upcycled model starts at KL = 0, so ``ce_weight`` > 0 is what moves it);
3. ``wuneng_more``: the distilled WuNeng trained ``continue.steps`` more steps (CE, constant learning rate);
4. ``teacher_more``: the teacher trained the same ``continue.steps`` steps with the same settings, and
   ``teacher_more_all``: then ``align.steps + distill.steps`` more, so that it has seen as many extra tokens
   as the WuNeng did since leaving the teacher, upcycling included.

Every checkpoint is scored by the same held-out cross-entropy (nats/byte): the first ``eval_batches`` rows of
the store's eval split (never trained on), a plain forward pass of the restored model
(:func:`train.upcycle.sources.load_source`). ``result.json`` per seed; the report adds a table
(mean ± standard error over seeds) and ``upcycle_losses.png``.

Config (the experiment file's ``upcycle:`` section; defaults in brackets)::

    seeds: [...]                        # [the experiment's seeds]
    data: {store, prepare [[]], eval_fraction [0.02], stdlib_max_files, stdlib_max_bytes}
    eval_batches: [16]
    seq_len, global_batch_size, dtype [float32]
    teacher: {model: {qwen2 fields}, steps, lr}
    student: {wuneng settings: fusion, state_query, ...}   # shapes come from the teacher
    align: {steps, lr}
    distill: {steps, lr, kl_weight [1.0], ce_weight [1.0]}
    continue: {steps, lr}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from train.experiments.report import RESULT_FILE

REPO = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = REPO / "configs" / "upcycle"
LOSS_KEYS = ("teacher", "upcycled", "wuneng_more", "teacher_more", "teacher_more_all")
LOSS_TITLES = {
    "teacher": "teacher (qwen2) after pretraining",
    "upcycled": "WuNeng after align + distill",
    "wuneng_more": "WuNeng + continue",
    "teacher_more": "teacher + continue",
    "teacher_more_all": "teacher + align + distill + continue tokens",
}
_KEYS = (
    "seeds",
    "data",
    "eval_batches",
    "seq_len",
    "global_batch_size",
    "dtype",
    "teacher",
    "student",
    "align",
    "distill",
    "continue",
)


def _fail(field: str, problem: str) -> Any:
    from train.experiments.spec import ExperimentError

    raise ExperimentError(f"experiment field `upcycle.{field}`: {problem}")


def _pos_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, f"expected a positive integer, got {value!r}")
    return value


def _lr(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        _fail(field, f"expected a positive learning rate, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
    seeds: tuple[int, ...]
    data: dict[str, Any]
    eval_batches: int
    seq_len: int
    global_batch_size: int
    dtype: str
    teacher_model: dict[str, Any]
    teacher_steps: int
    teacher_lr: float
    student: dict[str, Any]
    align_steps: int
    align_lr: float
    distill_steps: int
    distill_lr: float
    kl_weight: float
    ce_weight: float
    continue_steps: int
    continue_lr: float
    eval_seed: int = 0

    @property
    def store(self) -> str:
        return self.data["store"]


def parse_upcycle(raw: Any, seeds: Sequence[int], eval_seed: int = 0) -> UpcycleSpec:
    """Validate the ``upcycle:`` section (see the module docstring)."""
    if not isinstance(raw, Mapping):
        _fail("", f"expected a mapping, got {raw!r}")
    raw = json.loads(json.dumps(dict(raw)))
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        _fail(unknown[0], f"unknown key; known: {', '.join(_KEYS)}")
    for key in ("data", "seq_len", "global_batch_size", "teacher", "align", "distill", "continue"):
        if key not in raw:
            _fail(key, "is required")
    data = dict(raw["data"])
    if not data.get("store"):
        _fail("data.store", "is required: the byte-level token store (e.g. runs/data/stdlib)")
    data.setdefault("prepare", [])
    data.setdefault("eval_fraction", 0.02)
    own_seeds = tuple(raw.get("seeds", seeds))
    if not own_seeds:
        _fail("seeds", "needs at least one seed")
    teacher = dict(raw["teacher"])
    model = dict(teacher.get("model") or {})
    if model.get("family", "qwen2") != "qwen2":
        _fail("teacher.model.family", "the teacher is a qwen2 model")
    model["family"] = "qwen2"
    student = dict(raw.get("student") or {})
    student["family"] = "wuneng"
    student.pop("init", None)  # upcycling always starts from the identity (the teacher's logits)
    stages = {k: dict(raw[k]) for k in ("align", "distill", "continue")}
    return UpcycleSpec(
        seeds=tuple(int(s) for s in own_seeds),
        data=data,
        eval_batches=_pos_int(raw.get("eval_batches", 16), "eval_batches"),
        seq_len=_pos_int(raw["seq_len"], "seq_len"),
        global_batch_size=_pos_int(raw["global_batch_size"], "global_batch_size"),
        dtype=str(raw.get("dtype", "float32")),
        teacher_model=model,
        teacher_steps=_pos_int(teacher.get("steps"), "teacher.steps"),
        teacher_lr=_lr(teacher.get("lr"), "teacher.lr"),
        student=student,
        align_steps=_pos_int(stages["align"].get("steps"), "align.steps"),
        align_lr=_lr(stages["align"].get("lr"), "align.lr"),
        distill_steps=_pos_int(stages["distill"].get("steps"), "distill.steps"),
        distill_lr=_lr(stages["distill"].get("lr"), "distill.lr"),
        kl_weight=float(stages["distill"].get("kl_weight", 1.0)),
        ce_weight=float(stages["distill"].get("ce_weight", 1.0)),
        continue_steps=_pos_int(stages["continue"].get("steps"), "continue.steps"),
        continue_lr=_lr(stages["continue"].get("lr"), "continue.lr"),
        eval_seed=eval_seed,
    )


@dataclasses.dataclass(frozen=True)
class UpcycleJob:
    """One seed of the upcycling experiment (picklable; run by the experiment's worker pool)."""

    index: int
    seed: int
    run_dir: str
    spec: UpcycleSpec
    vocab_size: int

    @property
    def key(self) -> str:
        return f"upcycle/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        blob = {"spec": dataclasses.asdict(self.spec), "seed": self.seed, "vocab": self.vocab_size}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- configs ----------------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        s = self.spec
        data = {k: v for k, v in s.data.items() if v is not None}
        return {
            "data": {**data, "tokenizer": "byte", "num_threads": 1, "prefetch": 2},
            "seq_len": s.seq_len,
            "global_batch_size": s.global_batch_size,
            "dtype": s.dtype,
            "remat": "none",
            "seed": self.seed,
            "mesh": {"data": -1},
            "eval": {"at_end": False, "interval": 0},
            "log": {"interval": 10, "tensorboard": False, "progress": False},
        }

    def _checkpoint(self, steps: int) -> dict[str, Any]:
        return {"interval": steps, "keep_last": 1, "async_save": False}

    def teacher_config(self) -> dict[str, Any]:
        s = self.spec
        warm = max(1, s.teacher_steps // 10)
        return {
            **self._common(),
            "run_dir": str(Path(self.run_dir) / "teacher"),
            "model": {**s.teacher_model, "vocab_size": self.vocab_size},
            "steps": s.teacher_steps,
            "optimizer": {
                "lr": s.teacher_lr,
                "warmup_steps": warm,
                "schedule": "cosine",
                "min_lr_ratio": 0.1,
            },
            "checkpoint": self._checkpoint(s.teacher_steps),
        }

    def continue_config(self, name: str, init_from: str, family: str, steps: int) -> dict[str, Any]:
        s = self.spec
        return {
            **self._common(),
            "run_dir": str(Path(self.run_dir) / name),
            "model": {"family": family},
            "stage": {"kind": "pretrain", "init_from": init_from},
            "steps": steps,
            "optimizer": {
                "lr": s.continue_lr,
                "warmup_steps": 1,
                "schedule": "constant",
                "weight_decay": 0.0,
            },
            "checkpoint": self._checkpoint(steps),
        }

    def pipeline_mapping(self) -> dict[str, Any]:
        s = self.spec
        common = self._common()
        common["model"] = dict(s.student)
        return {
            "root": str(Path(self.run_dir) / "upcycle"),
            "base": str(Path(self.run_dir) / "teacher"),
            "tokenizer": "byte",
            "export": str(Path(self.run_dir) / "upcycle" / "export"),
            "export_dtype": None,
            "common": common,
            "stages": {
                "align": {
                    "config": str(STAGE_CONFIGS / "align.yaml"),
                    "steps": s.align_steps,
                    "optimizer": {"lr": s.align_lr, "warmup_steps": 1, "schedule": "constant"},
                    "checkpoint": self._checkpoint(s.align_steps),
                },
                "distill": {
                    "config": str(STAGE_CONFIGS / "distill.yaml"),
                    "steps": s.distill_steps,
                    "optimizer": {"lr": s.distill_lr, "warmup_steps": 1, "schedule": "constant"},
                    "stage": {"kl_weight": s.kl_weight, "ce_weight": s.ce_weight, "untie_embeddings": False},
                    "checkpoint": self._checkpoint(s.distill_steps),
                },
            },
        }

    # -- running ----------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        """Train every step of the chain (resuming), score the checkpoints, write ``result.json``."""
        from train.config import load_config
        from train.trainer import Trainer
        from train.upcycle.pipeline import load_pipeline, run_pipeline

        s = self.spec
        root = Path(self.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        with open(root / "train.log", "a") as logf:

            def echo(text: str) -> None:
                logf.write(text + "\n")
                logf.flush()

            def train(cfg: dict[str, Any]) -> str:
                Trainer(load_config(cfg), echo=echo).run()
                return cfg["run_dir"]

            teacher = train(self.teacher_config())
            run_pipeline(load_pipeline(self.pipeline_mapping()), echo=echo)
            distill = str(root / "upcycle" / "distill")
            extra = s.align_steps + s.distill_steps
            runs = {
                "teacher": teacher,
                "upcycled": distill,
                "wuneng_more": train(
                    self.continue_config("wuneng_more", distill, "wuneng", s.continue_steps)
                ),
                "teacher_more": train(
                    self.continue_config("teacher_more", teacher, "qwen2", s.continue_steps)
                ),
            }
            runs["teacher_more_all"] = train(
                self.continue_config("teacher_more_all", runs["teacher_more"], "qwen2", extra)
            )
            losses = {k: heldout_ce(path, s) for k, path in runs.items()}
            echo(f"held-out CE: {json.dumps(losses)}")
        tokens = s.global_batch_size * s.seq_len
        out = {
            "experiment": "upcycle",
            "seed": self.seed,
            "losses": losses,
            "tokens": {
                "teacher": s.teacher_steps * tokens,
                "upcycling": extra * tokens,
                "continue": s.continue_steps * tokens,
            },
            "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(time.process_time() - c0, 2),
            "fingerprint": self.fingerprint,
        }
        tmp = root / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(root / RESULT_FILE)
        return out


def heldout_ce(run_dir: str | Path, spec: UpcycleSpec) -> float:
    """Mean next-token cross-entropy (nats) of the newest checkpoint of ``run_dir`` over the first
    ``spec.eval_batches`` batches of the store's eval split."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, Mesh

    from train.config import MESH_AXES
    from train.data import pipeline
    from train.experiments.accuracy import accuracy_sums, total
    from train.mesh import mesh_context
    from train.upcycle.sources import load_source, open_source
    from wuneng_jax.sharding import DEFAULT_RULES

    src = open_source(str(run_dir), "upcycle experiment")
    dev = np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES))
    mesh = Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    with mesh_context(mesh, DEFAULT_RULES):
        model = load_source(src, mesh=mesh, rules=DEFAULT_RULES)
        graphdef, state = nnx.split(model)

        @jax.jit
        def sums(state, batch):
            logits = nnx.merge(graphdef, state)(
                batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
            )
            return accuracy_sums(logits, batch["targets"], batch["loss_mask"])

        ds = pipeline.eval_dataset(
            spec.store,
            seq_len=spec.seq_len,
            local_batch=spec.global_batch_size,
            max_batches=spec.eval_batches,
        )
        counts = [sums(state, {k: np.asarray(v) for k, v in b.items()}) for b in ds]
    t = total(counts)
    return t["ce_sum"] / t["scored"] if t["scored"] else float("nan")


def jobs(spec: UpcycleSpec, out_dir: str | Path, vocab_size: int, first_index: int) -> list[UpcycleJob]:
    return [
        UpcycleJob(first_index + i, seed, str(Path(out_dir) / "upcycle" / f"seed{seed}"), spec, vocab_size)
        for i, seed in enumerate(spec.seeds)
    ]


# --------------------------------------------------------------------------------------------
# Report


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, standard error and per-seed values of each held-out loss, and the paired difference
    ``wuneng_more - teacher_more`` (negative: the upcycled WuNeng is better)."""

    def stats(vals: list[float]) -> dict[str, Any]:
        n = len(vals)
        sd = statistics.stdev(vals) if n > 1 else 0.0
        return {"mean": statistics.fmean(vals), "se": sd / math.sqrt(n), "values": vals, "n": n}

    out: dict[str, Any] = {k: stats([float(r["losses"][k]) for r in results]) for k in LOSS_KEYS}
    for other in ("teacher_more", "teacher_more_all"):
        diffs = [float(r["losses"]["wuneng_more"]) - float(r["losses"][other]) for r in results]
        out[f"wuneng_more - {other}"] = stats(diffs)
    return out


def markdown(spec: UpcycleSpec, results: Sequence[Mapping[str, Any]]) -> str:
    lines = ["", "## Upcycling value (held-out CE, nats/byte; mean ± standard error over seeds)", ""]
    if not results:
        return "\n".join([*lines, "(no finished seeds yet)", ""])
    tok = results[0]["tokens"]
    lines += [
        f"Teacher: qwen2 {spec.teacher_model.get('hidden_size')}d × {spec.teacher_model.get('num_layers')} layers, "
        f"{spec.teacher_steps} steps ({tok['teacher']:,} tokens) on `{spec.store}`; upcycling: align "
        f"{spec.align_steps} + distill {spec.distill_steps} steps ({tok['upcycling']:,} tokens, distill "
        f"{spec.kl_weight}·KL + {spec.ce_weight}·CE); then {spec.continue_steps} more steps ({tok['continue']:,} "
        f"tokens) for both. Seeds: {[r['seed'] for r in results]}.",
        "",
        "| model | held-out CE | per seed |",
        "|---|---:|---|",
    ]
    summ = summarize(results)
    for k in (*LOSS_KEYS, "wuneng_more - teacher_more", "wuneng_more - teacher_more_all"):
        st = summ[k]
        title = LOSS_TITLES.get(k, f"difference: {k}")
        lines.append(
            f"| {title} | {st['mean']:.4f} ± {st['se']:.4f} | "
            + ", ".join(f"{v:.4f}" for v in st["values"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(results)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    xs = range(len(LOSS_KEYS))
    means = [summ[k]["mean"] for k in LOSS_KEYS]
    ses = [summ[k]["se"] for k in LOSS_KEYS]
    colors = ["#7f7f7f", "#2ca02c", "#2ca02c", "#1f77b4", "#1f77b4"]
    ax.bar(xs, means, yerr=ses, capsize=3, color=colors, alpha=0.8)
    for i, k in enumerate(LOSS_KEYS):
        ax.scatter([i] * len(summ[k]["values"]), summ[k]["values"], color="k", s=8, zorder=3)
    lo = min(min(summ[k]["values"]) for k in LOSS_KEYS)
    hi = max(max(summ[k]["values"]) for k in LOSS_KEYS)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        [LOSS_TITLES[k].replace(" after ", "\nafter ").replace(" + ", "\n+ ") for k in LOSS_KEYS], fontsize=7
    )
    ax.set_ylabel("held-out CE (nats/byte)")
    ax.set_title(f"upcycling value: mean ± SE over {len(results)} seeds (dots: seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

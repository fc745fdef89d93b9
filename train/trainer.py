"""The training loop: set up the mesh, model, optimizer, data and checkpoints, then run steps.

Follow one batch: ``train.data`` yields a host-local numpy batch -> ``make_global_batch`` makes the
global sharded arrays -> the jitted step (``train.train_step``) updates the donated ``TrainState`` ->
metrics are read one step late (so the host never stalls the device) -> ``train.metrics`` writes
them -> every ``checkpoint.interval`` steps ``train.checkpoint`` saves state + data position.

Stages (``cfg.stage``, ``train.upcycle``): the plan of :func:`train.upcycle.stage.plan_stage` may
start the weights from a checkpoint (``stage.init_from``), freeze part of them, swap the objective
(``align``, ``distill``) and pass a frozen teacher's parameters into the same jitted step.

Resume: with ``checkpoint.resume`` (default) a run directory holding checkpoints continues from the
newest one (model, optimizer, step, RNG and data position), so an interrupted run reproduces the
uninterrupted one step for step. SIGTERM (preemption) or Ctrl-C sets a flag; the loop finishes the
current step, saves, and returns with ``preempted=True`` (a second Ctrl-C aborts at once,
``train.signals``). A run holds ``run_dir/run.lock`` (``train.run_lock``): a second run into the same
directory is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from train import checkpoint as ckpt_lib
from train.config import ConfigError, TrainConfig, dump_yaml
from train.mesh import describe, initialize_distributed, make_mesh, mesh_context
from train.metrics import (
    MetricsWriter,
    Throughput,
    device_peak_flops,
    flops_dims,
    flops_per_token,
    format_line,
    truncate_jsonl,
)
from train.optimizer import make_optimizer
from train.run_lock import locked_run_dir
from train.signals import StopSignals
from train.state import (
    conform_params,
    count_params,
    init_state,
    make_layout,
    param_shapes,
    state_from_params,
)
from train.train_step import (
    BATCH_KEYS,
    batch_spec,
    check_batch_shape,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Model config


def model_config_dict(model_cfg: Any) -> dict[str, Any]:
    from wuneng_jax.config import config_to_dict

    return config_to_dict(model_cfg)


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    start_step: int  # steps already done when this run started (resumed from)
    final_step: int  # steps done when it returned
    losses: dict[int, float]  # step number (1-based) -> train loss
    skipped: list[int]  # steps whose update was skipped (non-finite)
    eval_loss: float | None
    sample: str | None
    preempted: bool


# Fields that decide which tokens each step reads: a resume that changes one of them is warned about.
_DATA_ORDER_FIELDS = ("seq_len", "global_batch_size", "seed", "data.store", "data.seed", "data.shuffle")


_ABSENT = object()


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; ``_ABSENT`` when a key is missing."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


class TrainingDiverged(RuntimeError):
    """The run stopped because its steps kept producing a non-finite loss or gradient."""


@dataclasses.dataclass
class NonFiniteGuard:
    """Stops a run after ``limit`` consecutive skipped (non-finite) steps, or when every step of the run
    was skipped; ``limit == 0`` never stops."""

    limit: int
    lr: float
    streak: int = 0

    def check(self, step: int, skipped: bool, last_saved: int | None) -> None:
        self.streak = self.streak + 1 if skipped else 0
        if self.limit and self.streak >= self.limit:
            which = f"the last {self.streak} steps ({step - self.streak + 1}..{step})"
            raise TrainingDiverged(self._message(which, last_saved))

    def check_all(self, start: int, done: int, n_skipped: int, last_saved: int | None) -> None:
        if self.limit and done > start and n_skipped == done - start:
            raise TrainingDiverged(self._message(f"every step of this run ({start + 1}..{done})", last_saved))

    def _message(self, which: str, last_saved: int | None) -> str:
        newest = (
            "no checkpoint was written" if last_saved is None else f"newest checkpoint: step {last_saved}"
        )
        return (
            f"{which} had a non-finite loss or gradient, so their updates were skipped and the run stopped. "
            f"Likely causes: a learning rate too high (optimizer.lr={self.lr:g}), a bad initialisation "
            "(stage.init_from, model.initializer_range) or token ids >= model.vocab_size in the data; lower "
            f"optimizer.lr or fix the data / init and run again ({newest}); max_skipped_steps sets the limit "
            "(0: never stop)"
        )


class _Progress:
    """The tqdm bar, created when the first step has finished (compilation is then out of its rate and
    ETA); ``write`` prints above the bar, or as a plain line before it exists."""

    def __init__(self, total: int, *, enabled: bool, echo: Callable[[str], None]):
        self.total = total
        self.enabled = enabled
        self._echo = echo
        self._bar: Any = None

    def start(self, initial: int) -> None:
        if self.enabled and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self._echo(text)

    def postfix(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclasses.dataclass
class _RunState:
    """What one :meth:`Trainer.run` carries from hook to hook: the train state, its data, its outputs and
    the step bookkeeping."""

    state: Any
    train_it: Any
    eval_ds: Any
    start: int  # steps done when the run started
    done: int  # steps done so far
    last_saved: int | None  # newest checkpoint's step
    writer: MetricsWriter
    bar: _Progress
    guard: NonFiniteGuard
    pending: tuple[int, Any] | None = None  # (step, metrics) not recorded yet
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    skipped: list[int] = dataclasses.field(default_factory=list)
    timing: bool = False  # a step was recorded: throughput and progress bar started
    profiling: bool = False
    preempted: bool = False

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class Trainer:
    """One training run described by a :class:`TrainConfig`.

    ``echo`` prints user-facing lines (primary process only). ``model_builder`` (tests) replaces
    ``wuneng_jax.models.build_model``. ``data_factory(trainer) -> (train_iterator, eval_batches)``
    replaces the token-store data (``cfg.data``): ``train_iterator`` yields local batches (dicts of
    ``[local_batch, seq_len]`` numpy arrays with the keys of ``train.data.pipeline``) and has
    ``get_state()``/``set_state()`` (saved in checkpoints, e.g. a ``grain.DatasetIterator``);
    ``eval_batches`` is a re-iterable of local eval batches of ``local_batch // grad_accum_steps``
    rows, or None. ``verbose`` prints the whole resolved config at start-up (always saved to
    ``run_dir/config.yaml``), not only the summary.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        echo: Callable[[str], None] | None = None,
        model_builder: Callable[..., Any] | None = None,
        data_factory: Callable[[Trainer], tuple[Any, Any]] | None = None,
        verbose: bool = False,
    ):
        initialize_distributed(cfg.distributed)
        self.cfg = cfg
        self.verbose = verbose
        self.primary = jax.process_index() == 0
        self._echo = echo or (lambda s: print(s, flush=True))
        self.run_dir = Path(cfg.run_dir)
        from train.upcycle.stage import plan_stage

        self.plan = plan_stage(cfg, model_builder=model_builder)
        self.model_cfg = self.plan.model_cfg
        if model_builder is None:
            from wuneng_jax.models import build_model

            model_builder = build_model
        self._build = lambda rngs: model_builder(self.model_cfg, rngs=rngs)
        self._data_factory = data_factory or self.plan.data_factory
        self.resolved = dataclasses.replace(cfg, model=model_config_dict(self.model_cfg))

        # Mesh and shapes
        self.mesh = make_mesh(cfg.mesh)
        self.rules = cfg.rules
        n_proc = jax.process_count()
        if cfg.global_batch_size % n_proc:
            raise ConfigError(
                f"config field `global_batch_size`: {cfg.global_batch_size} is not divisible by the "
                f"{n_proc} processes"
            )
        self.local_batch = cfg.global_batch_size // n_proc
        check_batch_shape(cfg.global_batch_size, cfg.seq_len, cfg.grad_accum_steps, self.mesh, self.rules)

        # Optimizer, state layout, step functions
        self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.steps)
        trainable = self.plan.trainable
        self.layout = make_layout(self._build, self.tx, self.mesh, self.rules, cfg.seed, trainable=trainable)
        self.n_params = count_params(self.layout.abstract.params)
        self.param_shapes = param_shapes(self.layout.abstract.params)
        step = make_train_step(
            self.layout.graphdef,
            self.tx,
            self.schedule,
            accum_steps=cfg.grad_accum_steps,
            z_loss=cfg.z_loss,
            vocab_tile=cfg.loss_vocab_tile,
            rules=self.rules,
            objective=None
            if self.plan.make_objective is None
            else self.plan.make_objective(self.layout.graphdef),
            trainable=trainable,
        )
        teacher = self.plan.teacher
        self.train_step = jit_train_step(
            step,
            self.layout,
            self.mesh,
            self.rules,
            extra_shardings=None if teacher is None else teacher.shardings(self.mesh, self.rules),
        )
        if cfg.compiled_step:
            self.train_step = self._load_compiled_step(cfg.compiled_step)
        self._step_extra: tuple[Any, ...] = ()
        self.eval_step = jit_eval_step(
            make_eval_step(self.layout.graphdef, cfg.loss_vocab_tile), self.layout, self.mesh, self.rules
        )

        # FLOPs / MFU
        dims = flops_dims(self.model_cfg, self.n_params)
        self.flops = flops_per_token(dims, cfg.seq_len)
        kind = jax.devices()[0].device_kind
        self.peak = device_peak_flops(kind)
        self.throughput = Throughput(self.flops["total"], cfg.tokens_per_step, jax.device_count(), self.peak)

        self._stop_requested = False

    def _load_compiled_step(self, path: str) -> Any:
        """The train step saved by ``wuneng compile --save`` (``train.aot.executable``), checked against
        this run: target devices, mesh, versions and every step-relevant config value."""
        from train.aot.compile import host_model_config
        from train.aot.executable import SavedStepError, check_stage, load_train_step, step_meta

        try:
            check_stage(self.plan)
            model_cfg = host_model_config(self.model_cfg, self.cfg.seq_len)
            return load_train_step(path, step_meta(self.cfg, model_cfg, self.mesh))
        except SavedStepError as e:
            raise ConfigError(str(e)) from e

    # ---- helpers
    def echo(self, text: str) -> None:
        if self.primary:
            self._echo(text)

    def _meta(self) -> dict[str, Any]:
        return {
            "config": self.resolved.to_dict(),
            "model_config": model_config_dict(self.model_cfg),
            "param_shapes": self.param_shapes,
            "n_params": self.n_params,
            "process_count": jax.process_count(),
        }

    def _open_data(self):
        if self._data_factory is not None:
            return self._data_factory(self)
        from train.data import pipeline
        from train.data.store import TokenStore

        d = self.cfg.data
        if d.prepare:
            self._maybe_prepare()
        store = TokenStore(d.store, "train")
        vocab = int(getattr(self.model_cfg, "vocab_size", store.vocab_size))
        if store.vocab_size > vocab:
            raise ConfigError(
                f"config field `model.vocab_size`: the token store {d.store!r} has vocabulary size "
                f"{store.vocab_size} but the model only {vocab}; set model.vocab_size >= {store.vocab_size}"
            )
        store.check_ids(vocab)
        self.store = store
        seed = self.cfg.seed if d.seed is None else d.seed
        train_it = pipeline.train_iterator(
            store,
            seq_len=self.cfg.seq_len,
            local_batch=self.local_batch,
            seed=seed,
            shuffle=d.shuffle,
            num_threads=d.num_threads,
            prefetch=d.prefetch,
        )
        eval_ds = None
        eval_store = TokenStore(d.store, "eval")
        eval_store.check_ids(vocab)
        if eval_store.num_tokens > 0:
            eval_ds = pipeline.eval_batches(
                eval_store,
                seq_len=self.cfg.seq_len,
                local_batch=self.local_batch // self.cfg.grad_accum_steps,
                max_batches=self.cfg.eval.batches,
                num_threads=d.num_threads,
                prefetch=d.prefetch,
            )
        return train_it, eval_ds

    def _maybe_prepare(self) -> None:
        from train.data import prepare as prep
        from train.data.store import read_manifest

        d = self.cfg.data
        if self.primary and read_manifest(d.store) is None:
            self.echo(f"preparing the token store {d.store} from {list(d.prepare)} ...")
            kwargs = {}
            if d.stdlib_max_files is not None:
                kwargs["stdlib_max_files"] = d.stdlib_max_files
            if d.stdlib_max_bytes is not None:
                kwargs["stdlib_max_bytes"] = d.stdlib_max_bytes
            manifest = prep.prepare(
                list(d.prepare),
                d.store,
                d.tokenizer,
                eval_fraction=d.eval_fraction,
                progress=self.cfg.log.progress,
                **kwargs,
            )
            self.echo(prep.summary(d.store, manifest))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("wuneng data prepared")

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        from train.data.pipeline import make_global_batch

        return make_global_batch({k: local[k] for k in BATCH_KEYS}, self.mesh, batch_spec(self.rules))

    def _stop_agreed(self, requested: str | None = None) -> bool:
        flag = self._stop_requested or requested is not None
        if jax.process_count() > 1:
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to save and return after the current step (SIGTERM / Ctrl-C do the same)."""
        self._stop_requested = True

    def evaluate(self, state, eval_ds) -> float | None:
        """Token-mean CE over the held-out batches (None without an eval split)."""
        if eval_ds is None:
            return None
        ce, n = 0.0, 0.0
        with mesh_context(self.mesh, self.rules):
            outs = [self.eval_step(state, self._global_batch(b)) for b in eval_ds]
        for o in jax.device_get(outs):
            ce += float(o["ce_sum"])
            n += float(o["loss_tokens"])
        return ce / n if n else None

    # ---- the run
    def run(self) -> RunResult:
        """Train to ``cfg.steps`` (resuming from ``run_dir``) while holding the run directory's lock."""
        with locked_run_dir(self.run_dir, "wuneng train"):
            # created under the lock: a manager cleans up unfinished saves, which may be another run's
            self.checkpointer = ckpt_lib.Checkpointer(self.run_dir / "checkpoints", self.cfg.checkpoint)
            return self._run()

    def _summary(self) -> list[str]:
        """At most a handful of start-up lines: what trains on what, for how long, where."""
        cfg, mc = self.cfg, self.model_cfg
        preset = cfg.model if isinstance(cfg.model, str) else cfg.model.get("preset", cfg.model.get("family"))
        data = (
            cfg.data.store or f"chat data ({len(cfg.data.chat.files)} files, sample {cfg.data.chat.sample})"
        )
        o = cfg.optimizer
        return [
            f"run {self.run_dir}: {getattr(mc, 'family', type(mc).__name__)} model ({preset}), "
            f"{self.n_params:,} params, {cfg.dtype} compute",
            f"data {data} ({cfg.data.tokenizer} tokenizer); {cfg.steps} steps x {cfg.global_batch_size} rows x "
            f"{cfg.seq_len} tokens",
            f"optimizer lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps}); checkpoint every "
            f"{cfg.checkpoint.interval} steps; eval every {cfg.eval.interval or '-'}",
            f"mesh {describe(self.mesh)} on {jax.device_count()} {jax.devices()[0].device_kind} device(s), "
            f"{jax.process_count()} process(es); {self.flops['total'] / 1e6:,.2f} MFLOP/token (dense "
            f"{self.flops['dense'] / 1e6:,.2f}, attention {self.flops['attention'] / 1e6:,.2f}, state "
            f"{self.flops['state'] / 1e6:,.2f})",
        ]

    def _warnings(self) -> list[str]:
        """Settings that run but probably are not what was meant."""
        out = []
        max_pos = getattr(self.model_cfg, "max_position_embeddings", None)
        if max_pos is not None and self.cfg.seq_len > max_pos:
            out.append(
                f"warning: seq_len={self.cfg.seq_len} is above model.max_position_embeddings={max_pos}: positions "
                f"past {max_pos} were never meant for this model; set seq_len <= {max_pos} or raise "
                "model.max_position_embeddings"
            )
        return out

    def _resume_warnings(self, saved: dict[str, Any]) -> list[str]:
        """Settings that changed since the checkpoint and change what the resumed steps read."""
        now = self.resolved.to_dict()
        out = []
        for dotted in _DATA_ORDER_FIELDS:
            old, new = _lookup(saved, dotted), _lookup(now, dotted)
            if old is not _ABSENT and old != new:
                out.append(
                    f"warning: resuming with {dotted}={new!r}, but the checkpoint was written with {old!r}: "
                    "the data read from here on differs from the original run's"
                )
        return out

    def _save_config(self) -> None:
        """``run_dir/config.yaml`` (atomically), once the run has started: a start that fails leaves an
        existing run's config alone."""
        if not self.primary:
            return
        path = self.run_dir / "config.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(dump_yaml(self.resolved))
        tmp.replace(path)

    def _start(self) -> tuple[Any, Any, Any, int | None]:
        """Open the data and restore the newest checkpoint (or initialise): ``(train_it, eval_ds, state,
        restored step)``."""
        cfg = self.cfg
        train_it, eval_ds = self._open_data()
        existing = self.checkpointer.latest_step()
        if existing is not None and not cfg.checkpoint.resume:
            raise ConfigError(
                f"config field `checkpoint.resume`: false, but {self.checkpointer.directory} already holds "
                f"checkpoints (newest: step {existing}); choose a new run_dir, delete them, or resume"
            )
        if existing is not None:
            restored = self.checkpointer.restore(existing, self.layout, self._meta())
            state = restored.state
            train_it.set_state(restored.data_state)
            self.echo(f"resumed from {self.checkpointer.directory / str(existing)} (step {existing})")
            for line in self._resume_warnings(restored.meta.get("config") or {}):
                self.echo(line)
        else:
            state = self._initial_state()
        if self.plan.teacher is not None:
            self._step_extra = (self.plan.teacher.load(self.mesh, self.rules),)
        return train_it, eval_ds, state, existing

    def _run(self) -> RunResult:
        """The step loop; the hooks below do the rest, each at its point of a step or of the run."""
        r = self._open_run()
        try:
            with StopSignals() as signals:
                for s in range(r.start, self.cfg.steps):
                    self._profile_start(r, s)
                    metrics = self._train_one(r, s)
                    self._profile_stop(r, metrics)
                    self._eval_hook(r)
                    stop = self._stop_agreed(signals.requested)
                    self._checkpoint_hook(r, force=stop)
                    if stop:
                        self._preempt(r, signals.requested)
                        break
                self._finish_steps(r)
            eval_loss = self._final_eval(r)
            sample = self._sample_hook(r)
        finally:
            r.close()
            self.checkpointer.close()
        return RunResult(
            start_step=r.start,
            final_step=r.done,
            losses=r.losses,
            skipped=r.skipped,
            eval_loss=eval_loss,
            sample=sample,
            preempted=r.preempted,
        )

    # ---- run hooks (in the order of one run)
    def _open_run(self) -> _RunState:
        """Start-up lines, data and state (restored or initialised), config.yaml, metrics outputs."""
        cfg = self.cfg
        for line in self._summary() + self._warnings():
            self.echo(line)
        if self.plan.kind != "pretrain" or self.plan.notes:
            self.echo(f"stage {self.plan.kind}: " + "; ".join(self.plan.notes))
        try:
            train_it, eval_ds, state, latest = self._start()
        except BaseException:
            self.checkpointer.close()
            raise
        self._save_config()
        where = f"resolved config saved to {self.run_dir / 'config.yaml'}"
        self.echo(
            f"{where}:\n{dump_yaml(self.resolved)}" if self.verbose else f"{where} (--verbose prints it)"
        )
        start = int(jax.device_get(state.step))
        if self.primary:
            truncate_jsonl(self.run_dir / "metrics.jsonl", start)
        return _RunState(
            state=state,
            train_it=train_it,
            eval_ds=eval_ds,
            start=start,
            done=start,
            last_saved=latest,
            writer=MetricsWriter(
                self.run_dir, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard, primary=self.primary
            ),
            bar=_Progress(cfg.steps, enabled=self.primary and cfg.log.progress, echo=self.echo),
            guard=NonFiniteGuard(cfg.max_skipped_steps, cfg.optimizer.lr),
        )

    def _train_one(self, r: _RunState, s: int) -> Any:
        """Step ``s`` -> ``s + 1``; its metrics are recorded one step late (the host never waits)."""
        local = next(r.train_it)
        if s == r.start:
            r.bar.write(
                f"train step loaded from {self.cfg.compiled_step} (compiled_step)"
                if self.cfg.compiled_step
                else "compiling the train step (the first step takes longer) ..."
            )
        with mesh_context(self.mesh, self.rules):
            r.state, metrics = self.train_step(r.state, self._global_batch(local), *self._step_extra)
        r.done = s + 1
        self._flush(r)
        r.pending = (r.done, metrics)
        return metrics

    def _flush(self, r: _RunState) -> None:
        """Record the pending step's metrics, if any."""
        if r.pending is not None:
            self._record(r, *r.pending)
            r.pending = None

    def _record(self, r: _RunState, step_no: int, metrics: Any) -> None:
        """One step's metrics: losses, the progress bar, the log line, metrics files, the non-finite guard."""
        cfg = self.cfg
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["skipped"] = int(values["skipped"])
        r.losses[step_no] = values["loss"]
        if values["skipped"]:
            r.skipped.append(step_no)
            r.bar.write(f"step {step_no}: non-finite loss/gradient, update skipped")
        if not r.timing:
            r.timing = True
            self.throughput.start()  # exclude compilation from the first window
            r.bar.start(step_no - 1)  # and from the progress bar's rate and ETA
        else:
            self.throughput.tick()
        if step_no % cfg.log.interval == 0 or step_no == cfg.steps:
            window = self.throughput.read()
            if window:
                values.update(window)
            r.bar.write(format_line(step_no, cfg.steps, values))
            r.bar.postfix(values["loss"])
        r.writer.write(step_no, "train", values)
        r.bar.update()
        r.guard.check(step_no, bool(values["skipped"]), r.last_saved)

    def _profile_start(self, r: _RunState, s: int) -> None:
        prof = self.cfg.profiler
        if prof.start_step >= 0 and s == prof.start_step and not r.profiling:
            jax.profiler.start_trace(str(self.run_dir / "profile"))
            r.profiling = True

    def _profile_stop(self, r: _RunState, metrics: Any) -> None:
        prof = self.cfg.profiler
        if r.profiling and r.done >= prof.start_step + prof.num_steps:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            r.profiling = False
            r.bar.write(
                f"profile of steps {prof.start_step}..{r.done - 1} written to {self.run_dir / 'profile'}"
            )

    def _eval_hook(self, r: _RunState) -> None:
        """Every ``eval.interval`` steps (not the last): held-out loss."""
        interval, steps = self.cfg.eval.interval, self.cfg.steps
        if not (interval and r.done % interval == 0 and r.done < steps):
            return
        self._flush(r)
        ev = self.evaluate(r.state, r.eval_ds)
        if ev is not None:
            r.writer.write(r.done, "eval", {"loss": ev})
            r.bar.write(f"step {r.done}/{steps} | eval loss {ev:.4f}")
        self.throughput.start()

    def _checkpoint_hook(self, r: _RunState, *, force: bool = False) -> None:
        """Every ``checkpoint.interval`` steps, or when ``force``: save state and data position."""
        if r.done % self.cfg.checkpoint.interval == 0 or force:
            self._flush(r)
            self._save(r)

    def _save(self, r: _RunState) -> None:
        self.checkpointer.save(r.done, r.state, r.train_it.get_state(), self._meta())
        r.last_saved = r.done

    def _preempt(self, r: _RunState, requested: str | None) -> None:
        r.preempted = True
        r.bar.write(
            f"stop requested ({requested or 'another process'}): saved step {r.done} to "
            f"{self.checkpointer.directory}; exiting"
        )

    def _finish_steps(self, r: _RunState) -> None:
        """After the last step: its metrics, the all-skipped check, the profile, the final checkpoint."""
        self._flush(r)
        if not r.preempted:
            r.guard.check_all(r.start, r.done, len(r.skipped), r.last_saved)
        if r.profiling:
            jax.profiler.stop_trace()
        if r.last_saved != r.done:
            self._save(r)
        self.checkpointer.wait()

    def _final_eval(self, r: _RunState) -> float | None:
        if r.preempted or not self.cfg.eval.at_end:
            return None
        eval_loss = self.evaluate(r.state, r.eval_ds)
        if eval_loss is not None:
            r.writer.write(r.done, "eval", {"loss": eval_loss})
            r.bar.write(f"final eval loss {eval_loss:.4f} (held-out split)")
        return eval_loss

    def _sample_hook(self, r: _RunState) -> str | None:
        if r.preempted or self.cfg.eval.sample_tokens <= 0:
            return None
        sample = self._sample(r.state)
        r.bar.write("sample:\n" + sample)
        return sample

    def _initial_state(self):
        """Step 0: the weights of ``stage.init_from`` (converted to this model), else a random init."""
        loaded = self.plan.initial_params(self.mesh, self.rules)
        if loaded is None:
            return init_state(
                self._build,
                self.tx,
                self.mesh,
                self.rules,
                self.cfg.seed,
                self.layout,
                trainable=self.plan.trainable,
            )
        params, rest = loaded
        where = f"stage.init_from ({self.plan.init_source.where})"
        params = conform_params(params, self.layout.abstract.params, where)
        rest = conform_params(rest, self.layout.abstract.rest, where)
        return state_from_params(
            params,
            rest,
            self.tx,
            self.mesh,
            self.rules,
            self.cfg.seed,
            self.layout,
            trainable=self.plan.trainable,
        )

    def _sample(self, state) -> str:
        """A sample from the current weights through the decode engine (KV cache / recurrent state)."""
        from wuneng_jax.decode import Decoder, SamplingConfig

        tok = getattr(self, "tokenizer", None) or self.store.tokenizer()
        e = self.cfg.eval
        prompt = tok.encode(e.sample_prompt) if e.sample_prompt else []
        t0 = time.perf_counter()
        with mesh_context(self.mesh, self.rules):
            decoder = Decoder(nnx.merge(self.layout.graphdef, state.params, state.rest))
            ids = decoder.generate(
                [prompt or [tok.eos_id]],
                max_new_tokens=e.sample_tokens,
                sampling=SamplingConfig(temperature=e.sample_temperature),
                seed=self.cfg.seed,
                vocab_limit=tok.vocab_size,
                pad_id=tok.eos_id,
            ).tokens[0]
        log.info("sampled %d tokens in %.1fs", len(ids), time.perf_counter() - t0)
        return e.sample_prompt + tok.decode(ids)

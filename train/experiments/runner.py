"""The experiment runner: train every (task, seq_len, variant, seed) of the grid, evaluate, report.

Per run, ``out_dir/runs/<task>/T<seq_len>/<variant>/seed<k>/`` holds the ``Trainer``'s run directory
(``config.yaml``, ``metrics.jsonl``, ``checkpoints/``), its log (``train.log``) and, once evaluated,
``result.json``. Resume: a run whose ``result.json`` carries the run's fingerprint is skipped; any other
run is (re)started through ``Trainer.run``, which continues from its newest checkpoint (so an
interrupted experiment, Ctrl-C or SIGTERM included, loses at most ``checkpoint.interval`` steps of one
run per worker). After training, the final checkpoint is restored and scored on the held-out set by a
jitted exact-accuracy step (``train.experiments.accuracy``). Then ``train.experiments.report`` writes
``results.csv``, ``results.json``, ``summary.md`` and the plots into ``out_dir``.

``workers > 1`` trains runs in parallel processes (``spawn``); each compiles its own programs, shared
through the persistent compilation cache. Single host only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from train.experiments.report import RESULT_FILE, load_result, write_report
from train.experiments.spec import (
    ExperimentError,
    ExperimentSpec,
    RunSpec,
    load_experiment,
    plan,
    round_up,
    synthetic_vocab,
)

log = logging.getLogger(__name__)
UPCYCLE = "upcycle"  # the upcycling experiment's token store in prepare_lm_stores


class Preempted(RuntimeError):
    """A run was stopped by SIGTERM or Ctrl-C (its checkpoint is saved; re-run the experiment to resume)."""


# --------------------------------------------------------------------------------------------
# Setup: token stores, vocabularies, matched models, the grid


def prepare_lm_stores(spec: ExperimentSpec, echo: Callable[[str], None]) -> dict[str, int]:
    """Make the token stores of the ``lm`` tasks when missing; ``{task: store vocab_size}``."""
    from train.data.prepare import prepare
    from train.data.store import TokenStore, read_manifest

    out: dict[str, int] = {}
    stores = [(t.name, t.params) for t in spec.tasks if t.is_lm]
    if spec.upcycle is not None:
        stores.append((UPCYCLE, {"tokenizer": "byte", **spec.upcycle.data}))
    for name, p in stores:
        if read_manifest(p["store"]) is None:
            if not p["prepare"]:
                raise ExperimentError(
                    f"experiment field `tasks.{name}.store`: no token store at {p['store']!r}; make one "
                    "with `wuneng prepare-data` or set `prepare: [stdlib]`"
                )
            echo(f"preparing the token store {p['store']} from {list(p['prepare'])} ...")
            kwargs = {k: p[k] for k in ("stdlib_max_files", "stdlib_max_bytes") if p.get(k) is not None}
            prepare(
                list(p["prepare"]),
                p["store"],
                p["tokenizer"],
                eval_fraction=p["eval_fraction"],
                progress=False,
                **kwargs,
            )
        out[name] = TokenStore(p["store"], "train").vocab_size
    return out


def task_vocabs(spec: ExperimentSpec, lm_vocab: dict[str, int]) -> dict[str, int]:
    """The model vocabulary of each task (see ``spec``: a synthetic task's own, up to 8; an lm store's, up to 64)."""
    return {t.name: round_up(lm_vocab[t.name], 64) if t.is_lm else synthetic_vocab(t) for t in spec.tasks}


def setup(
    spec: ExperimentSpec, echo: Callable[[str], None] = print, only: Sequence[str] | None = None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The run grid (the upcycling experiment's jobs first, then the grid's runs) and the parameter table
    (preparing stores and matching parameter counts). ``only``: keep the runs of these task names (and the
    upcycling jobs if it names ``upcycle``); the vocabulary and the parameter matching are those of the whole
    file, so a run's fingerprint (and its resume) does not depend on the selection."""
    from train.experiments.params import CachedCounter, match_all

    store_vocabs = prepare_lm_stores(spec, echo)
    vocabs = task_vocabs(spec, store_vocabs)
    counter = CachedCounter(Path(spec.out_dir) / "param_counts.json")
    models, table = match_all(spec, vocabs, counter)
    runs: list[Any] = plan(spec, models)
    if spec.upcycle is not None:
        from train.experiments.upcycle_value import jobs

        vocab = round_up(store_vocabs[UPCYCLE], 64)
        runs = jobs(spec.upcycle, spec.out_dir, vocab, len(runs)) + runs
    if only is not None:
        known = {t.name for t in spec.tasks} | ({UPCYCLE} if spec.upcycle is not None else set())
        unknown = sorted(set(only) - known)
        if unknown:
            raise ExperimentError(f"--tasks: {unknown} not among the experiment's {sorted(known)}")
        runs = [r for r in runs if (r.task.name if isinstance(r, RunSpec) else UPCYCLE) in only]
    return runs, table


def format_param_table(table: Sequence[dict[str, Any]]) -> str:
    lines = []
    for row in table:
        tuned = ", ".join(f"{k}={v}" for k, v in row["tuned"].items()) or "(reference)"
        lines.append(
            f"  vocab {row['vocab_size']:>4}  {row['variant']:<22} {row['params']:>10,}  "
            f"{100 * row['rel_to_reference']:+5.1f}%  {tuned}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One run


def _data_factory(run: RunSpec) -> Callable[[Any], tuple[Any, None]]:
    def factory(trainer: Any) -> tuple[Any, None]:
        import jax

        if run.task.is_lm:
            from train.data import pipeline

            it = pipeline.train_iterator(
                run.task.params["store"],
                seq_len=run.seq_len,
                local_batch=trainer.local_batch,
                seed=run.seed,
                num_threads=1,
                prefetch=2,
            )
        else:
            from train.data import synthetic

            it = synthetic.train_iterator(
                run.task.synthetic(run.seq_len),
                local_batch=trainer.local_batch,
                seed=run.seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        return it, None  # the runner scores the held-out set itself after training

    return factory


def heldout(run: RunSpec, local_batch: int) -> list[dict[str, Any]]:
    """The held-out batches of a run: fresh examples of the eval stream, or the store's eval split."""
    import jax

    if run.task.is_lm:
        from train.data import pipeline

        ds = pipeline.eval_dataset(
            run.task.params["store"],
            seq_len=run.seq_len,
            local_batch=local_batch,
            max_batches=run.task.params["eval_batches"],
        )
        batches = list(ds)
        if not batches:
            raise ExperimentError(
                f"task {run.task.name}: the eval split of {run.task.params['store']!r} is empty; "
                "prepare the store with eval_fraction > 0"
            )
        return batches
    from train.data import synthetic

    return synthetic.heldout_batches(
        run.task.synthetic(run.seq_len),
        num_examples=run.eval_examples,
        local_batch=local_batch,
        seed=run.eval_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def final_train_loss(run_dir: Path, window: int = 10) -> tuple[float, int]:
    """Mean train loss of the last ``window`` logged steps, and the last step (from metrics.jsonl)."""
    from train.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    recs = read_jsonl(path, "train") if path.exists() else []
    by_step = {int(r["step"]): float(r["loss"]) for r in recs}
    if not by_step:
        return float("nan"), 0
    steps = sorted(by_step)[-window:]
    return sum(by_step[s] for s in steps) / len(steps), steps[-1]


def execute(run: Any) -> dict[str, Any]:
    """Train (or resume) one run, score its final checkpoint on the held-out set, write ``result.json``
    (an upcycling-experiment job runs its whole chain)."""
    import jax

    if not isinstance(run, RunSpec):
        return run.execute()

    from train import checkpoint as ckpt_lib
    from train.config import load_config
    from train.data.pipeline import make_global_batch
    from train.experiments.accuracy import finalize, make_accuracy_step, total
    from train.mesh import mesh_context
    from train.train_step import batch_spec, jit_eval_step
    from train.trainer import Trainer

    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run.train_cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(run_dir / "train.log", "a") as logf:

        def echo(text: str) -> None:
            logf.write(text + "\n")
            logf.flush()

        trainer = Trainer(cfg, data_factory=_data_factory(run), echo=echo)
        result = trainer.run()
        if result.preempted:
            raise Preempted(
                f"{run.key}: stopped at step {result.final_step} (SIGTERM / Ctrl-C); re-run to resume"
            )
        t_train = time.perf_counter() - t0

        ck = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        try:
            step = ck.latest_step()
            state = ck.restore(step, trainer.layout, trainer._meta()).state
        finally:
            ck.close()
        state_from = (
            getattr(run.task.synthetic(run.seq_len), "state_from", None) if not run.task.is_lm else None
        )
        acc_step = jit_eval_step(
            make_accuracy_step(trainer.layout.graphdef, state_from),
            trainer.layout,
            trainer.mesh,
            trainer.rules,
        )
        spec_ = batch_spec(trainer.rules)
        with mesh_context(trainer.mesh, trainer.rules):
            counts = [
                acc_step(state, make_global_batch(b, trainer.mesh, spec_))
                for b in heldout(run, trainer.local_batch)
            ]
        metrics = finalize(total(counts))
        echo(f"held-out: {json.dumps(metrics)}")
    loss, last_step = final_train_loss(run_dir)
    out = {
        "task": run.task.name,
        "kind": run.task.kind,
        "seq_len": run.seq_len,
        "variant": run.variant,
        "family": run.model["family"],
        "seed": run.seed,
        "params": int(trainer.n_params),
        "steps": int(step),
        "train_loss": loss,
        **metrics,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "train_s": round(t_train, 2),
        "steps_this_session": int(result.final_step - result.start_step),
        "task_config": run.task.describe(run.seq_len),
        "model": run.model,
        "fingerprint": run.fingerprint,
    }
    if last_step != step:
        raise RuntimeError(f"{run.key}: metrics.jsonl ends at step {last_step}, the checkpoint at {step}")
    if jax.process_index() == 0:
        tmp = run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(run_dir / RESULT_FILE)
    return out


# --------------------------------------------------------------------------------------------
# The grid


_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def enable_compile_cache(directory: Path) -> dict[str, Any]:
    """Use JAX's persistent compilation cache in ``directory``; returns the previous settings."""
    import jax

    old = {n: getattr(jax.config, n) for n in _CACHE_OPTIONS}
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset_compile_cache()  # JAX decides whether to use the cache at its first compile and keeps that
    return old


@contextlib.contextmanager
def compile_cache(directory: Path | None) -> Iterator[None]:
    """``enable_compile_cache`` for the duration (None: leave the settings alone)."""
    if directory is None:
        yield
        return
    import jax

    old = enable_compile_cache(directory)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        _reset_compile_cache()


def _reset_compile_cache() -> None:
    try:
        from jax._src import compilation_cache
    except ImportError:  # pragma: no cover - JAX moved it: the cache then applies from the next process
        return
    reset = getattr(compilation_cache, "reset_cache", None)
    if reset is not None:
        reset()


SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Processes started inside run XLA's CPU ops on one thread each (``XLA_FLAGS`` appended, restored on
    exit): with one worker per core, per-op threading only adds contention (measured on 2 cores with 2
    workers: ~18 % less wall time per run, identical results)."""
    old = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{old} {SINGLE_THREAD_XLA_FLAGS}" if old else SINGLE_THREAD_XLA_FLAGS
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = old


def _worker_init(cache_dir: str | None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if cache_dir:
        enable_compile_cache(Path(cache_dir))  # for the worker's lifetime


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_grid(
    runs: Sequence[Any],
    *,
    workers: int = 1,
    cache_dir: Path | None = None,
    max_runs: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    """Train/evaluate the runs not done yet (at most ``max_runs`` of them); returns counts."""
    todo = [r for r in runs if load_result(r) is None]
    skipped = len(runs) - len(todo)
    if max_runs is not None:
        todo = todo[: max(0, max_runs)]
    n = len(runs)
    echo(
        f"{n} runs: {skipped} already done, {len(todo)} to run"
        + (f" on {workers} workers" if workers > 1 else "")
    )
    t_start = time.perf_counter()
    done = 0

    def report(run: Any, res: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - t_start
        eta = elapsed / done * (len(todo) - done)
        if "losses" in res:  # an upcycling-experiment job
            what = "held-out CE " + ", ".join(f"{k} {v:.3f}" for k, v in res["losses"].items())
        else:
            what = (
                f"acc {res['accuracy']:.3f} (last {res['last_accuracy']:.3f}), ce {res['ce']:.3f}, "
                f"loss {res['train_loss']:.3f}"
            )
        echo(
            f"[{skipped + done}/{n}] {run.key}: {what} | {res['wall_s']:.0f}s"
            f" | elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)}"
        )

    if workers <= 1 or len(todo) <= 1:
        with compile_cache(cache_dir):
            for run in todo:
                echo(f"[{skipped + done + 1}/{n}] {run.key} ...")
                report(run, execute(run))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with (
            single_threaded_children(),
            ctx.Pool(
                min(workers, len(todo)),
                initializer=_worker_init,
                initargs=(str(cache_dir) if cache_dir else None,),
            ) as pool,
        ):
            by_index = {r.index: r for r in todo}
            for res_index, res in pool.imap_unordered(_execute_indexed, todo):
                report(by_index[res_index], res)
    return {"total": n, "skipped": skipped, "ran": done, "remaining": n - skipped - done}


def _execute_indexed(run: Any) -> tuple[int, dict[str, Any]]:
    return run.index, execute(run)


def run_experiment(
    spec: ExperimentSpec,
    *,
    workers: int | None = None,
    max_runs: int | None = None,
    echo: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Set up, train every pending run, write the report; returns a summary (counts + paths). Holds the
    output directory's run lock (a second experiment into it is refused)."""
    import jax

    if jax.process_count() > 1:
        raise ExperimentError("the experiment runner is single-host; run it on one process (any devices)")
    from train.run_lock import locked_run_dir

    with locked_run_dir(spec.out_dir, "wuneng experiment"):
        return _run_experiment(spec, workers=workers, max_runs=max_runs, echo=echo, only=only)


def _run_experiment(
    spec: ExperimentSpec,
    *,
    workers: int | None,
    max_runs: int | None,
    echo: Callable[[str], None],
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs, table = setup(spec, echo, only)
    echo(f"experiment {spec.name}: {len(spec.variants)} variants × grid → {out}")
    echo("parameters (matched to " + spec.reference + "):\n" + format_param_table(table))
    (out / "params.json").write_text(json.dumps(table, indent=1))
    cache = out / "jax_cache" if spec.compile_cache else None
    counts = run_grid(runs, workers=workers or spec.workers, cache_dir=cache, max_runs=max_runs, echo=echo)
    files = write_report(spec, runs, table)
    elapsed = time.perf_counter() - t0
    echo(f"{counts['ran']} runs in {_fmt_s(elapsed)}; results in {out}: " + ", ".join(p.name for p in files))
    if counts["remaining"]:
        echo(f"{counts['remaining']} runs still to do: run the same command again to continue")
    return {**counts, "wall_s": elapsed, "files": [str(p) for p in files]}


# --------------------------------------------------------------------------------------------
# CLI


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="wuneng experiment")
    p.add_argument("config", help="experiment YAML (configs/experiments/<name>.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (train.steps=50)")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes (default: config)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (resume later)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the grid and the parameter counts, train nothing"
    )
    p.add_argument("--report-only", action="store_true", help="rewrite tables and plots from finished runs")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names to run (and report); `upcycle` selects the upcycling experiment",
    )
    return p


def run(args: argparse.Namespace) -> int:
    spec = load_experiment(args.config, args.overrides)
    if args.workers is not None and args.workers < 1:
        raise ExperimentError(f"--workers must be >= 1, got {args.workers}")
    only = [t for t in args.tasks.split(",") if t] if args.tasks else None
    if args.dry_run or args.report_only:
        runs, table = setup(spec, only=only)
        print("parameters (matched to " + spec.reference + "):\n" + format_param_table(table))
        if args.report_only:
            files = write_report(spec, runs, table)
            print("wrote " + ", ".join(str(p) for p in files))
            return 0
        for r in runs:
            state = "done" if load_result(r) else "todo"
            print(f"  {r.index:>4} {state}  {r.key}  ({r.run_dir})")
        print(f"{len(runs)} runs")
        return 0
    try:
        run_experiment(spec, workers=args.workers, max_runs=args.max_runs, only=only)
    except Preempted as e:
        print(f"wuneng experiment: {e}", file=sys.stderr)
        return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())


__all__ = ["Preempted", "execute", "run_experiment", "run_grid", "setup"]

"""The experiment report: ``results.csv`` / ``results.json`` (one row per run), ``summary.md`` (seed
means per task × variant × sequence length, the parameter table) and PNG plots (``accuracy_vs_seq_len.png``,
``loss_curves.png``), all written into the experiment directory from the runs' ``result.json`` and
``metrics.jsonl`` files (so they can be rebuilt at any time: ``wuneng experiment ... --report-only``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.experiments.spec import ExperimentSpec, RunSpec

CSV_FIELDS = (
    "task",
    "kind",
    "seq_len",
    "variant",
    "family",
    "seed",
    "params",
    "steps",
    "train_loss",
    "accuracy",
    "last_accuracy",
    "seq_accuracy",
    "ce",
    "balanced_accuracy",
    "recall_accuracy",
    "state_accuracy",
    "scored",
    "rows",
    "wall_s",
    "cpu_s",
)
METRICS = (
    "accuracy",
    "last_accuracy",
    "seq_accuracy",
    "ce",
    "train_loss",
    "balanced_accuracy",
    "recall_accuracy",
    "state_accuracy",
)
RESULT_FILE = "result.json"  # in each run directory, written by train.experiments.runner.execute


def load_result(run: Any) -> dict[str, Any] | None:
    """The run's (or upcycling job's) result if it is complete for exactly this configuration, else None."""
    path = Path(run.run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return res if res.get("fingerprint") == run.fingerprint else None


def collect(runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """The results of the finished runs of the grid (in grid order)."""
    rows = []
    for r in runs:
        if not isinstance(r, RunSpec):
            continue
        res = load_result(r)
        if res is not None:
            rows.append({k: res.get(k, float("nan")) for k in CSV_FIELDS})
    return rows


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed statistics per (task, seq_len, variant): ``<metric>_mean/_std/_se/_min/_max`` and ``seeds``
    (``_se`` = the standard error of the seed mean, ``std / sqrt(seeds)``)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["seq_len"], row["variant"]), []).append(row)
    out = []
    for (task, seq_len, variant), members in groups.items():
        agg: dict[str, Any] = {"task": task, "seq_len": seq_len, "variant": variant, "seeds": len(members)}
        agg["params"] = members[0]["params"]
        for m in METRICS:
            vals = [
                float(x[m]) for x in members if x.get(m) not in (None, "") and not math.isnan(float(x[m]))
            ]
            agg[f"{m}_mean"] = statistics.fmean(vals) if vals else float("nan")
            agg[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            agg[f"{m}_se"] = agg[f"{m}_std"] / math.sqrt(len(vals)) if vals else float("nan")
            agg[f"{m}_min"] = min(vals) if vals else float("nan")
            agg[f"{m}_max"] = max(vals) if vals else float("nan")
        out.append(agg)
    return out


def _cell(agg: dict[str, Any] | None, metric: str, digits: int = 3) -> str:
    if agg is None:
        return "–"
    mean = agg[f"{metric}_mean"]
    if math.isnan(mean):
        return "n/a"
    if agg["seeds"] > 1:
        return f"{mean:.{digits}f} ± {agg[f'{metric}_se']:.{digits}f}"
    return f"{mean:.{digits}f}"


def _task_line(spec: ExperimentSpec, task_name: str) -> str:
    task = next(t for t in spec.tasks if t.name == task_name)
    if task.is_lm:
        return f"language modelling on the token store `{task.params['store']}` (next-token accuracy on its eval split)"
    parts = []
    for n in task.seq_lens:
        d = task.describe(n)
        d.pop("kind", None)
        d.pop("seq_len", None)
        parts.append(f"T={n}: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    return f"`{task.kind}` — " + "; ".join(parts)


def summary_markdown(
    spec: ExperimentSpec,
    rows: Sequence[dict[str, Any]],
    aggs: Sequence[dict[str, Any]],
    table: Sequence[dict],
) -> str:
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.source:
        lines += [
            f"Config: `{spec.source}`; seeds {list(spec.seeds)}; held-out examples per point: "
            f"{spec.eval_examples} (eval seed {spec.eval_seed}).",
            "",
        ]
    lines += [
        "## Parameters (matched to `" + spec.reference + "`)",
        "",
        "| vocab | variant | family | parameters | vs reference | tuned |",
        "|---|---|---|---:|---:|---|",
    ]
    for p in table:
        tuned = ", ".join(f"{k}={v}" for k, v in p["tuned"].items()) or "reference"
        lines.append(
            f"| {p['vocab_size']} | {p['variant']} | {p['family']} | {p['params']:,} | "
            f"{100 * p['rel_to_reference']:+.1f}% | {tuned} |"
        )
    index = {(a["task"], a["seq_len"], a["variant"]): a for a in aggs}
    for task in spec.tasks:
        metrics = [("accuracy", "accuracy at the scored positions")]
        if task.kind == "state_tracking":
            metrics.append(("last_accuracy", "accuracy at the last position (product of the whole sequence)"))
        if task.kind == "mqar":
            metrics.append(("seq_accuracy", "sequences with every query answered"))
        if task.kind == "recall_state":
            metrics = [
                (
                    "balanced_accuracy",
                    "balanced accuracy: mean of the recall and the state-tracking accuracy",
                ),
                ("recall_accuracy", "recall accuracy (query keys)"),
                ("state_accuracy", "state-tracking accuracy (running products)"),
            ]
        if task.is_lm:
            metrics.append(("ce", "held-out cross-entropy (nats/token)"))
        lines += ["", f"## Task `{task.name}`", "", _task_line(spec, task.name)]
        for metric, title in metrics:
            lines += ["", f"**{title}** (`{metric}`)", ""]
            lines.append("| variant | " + " | ".join(f"T={n}" for n in task.seq_lens) + " |")
            lines.append("|---|" + "---:|" * len(task.seq_lens))
            for v in [v.name for v in spec.task_variants(task)]:
                cells = [_cell(index.get((task.name, n, v)), metric) for n in task.seq_lens]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
    n_runs = len(rows)
    wall = sum(float(r["wall_s"]) for r in rows)
    cpu = sum(float(r["cpu_s"]) for r in rows)
    lines += [
        "",
        f"{n_runs} runs; summed per-run wall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min "
        "(compile + train + held-out eval; runs overlap when `workers` > 1).",
    ]
    return "\n".join(lines) + "\n"


def _colors(variants: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _chance(task: Any) -> float | None:
    """Accuracy of a uniform guess over the answer tokens (None for language modelling)."""
    if task.kind == "mqar":
        return 1.0 / task.synthetic(task.seq_lens[0]).num_values
    if task.kind == "state_tracking":
        return 1.0 / task.synthetic(task.seq_lens[0]).vocab_size
    if task.kind == "recall_state":
        t = task.synthetic(task.seq_lens[0])
        return (1.0 / t.num_values + 1.0 / t.perm_group.order) / 2
    return None


def headline_metric(task: Any) -> str:
    """The metric a task is plotted and compared by."""
    return "balanced_accuracy" if task.kind == "recall_state" else "accuracy"


def plot_accuracy(spec: ExperimentSpec, aggs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, headline_metric(t)) for t in spec.tasks]
    panels += [(t, "last_accuracy") for t in spec.tasks if t.kind == "state_tracking"]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    colors = _colors([v.name for v in spec.variants])
    index = {(a["task"], a["seq_len"], a["variant"]): a for a in aggs}
    for ax, (task, metric) in zip(axes.flat, panels, strict=False):
        for v in spec.task_variants(task):
            pts = [
                (n, index[(task.name, n, v.name)]) for n in task.seq_lens if (task.name, n, v.name) in index
            ]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ys = [a[f"{metric}_mean"] for _, a in pts]
            se = [a[f"{metric}_se"] for _, a in pts]
            ax.errorbar(xs, ys, yerr=se, marker="o", ms=4, capsize=2, label=v.name, color=colors[v.name])
        chance = _chance(task)
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(task.seq_lens))
        ax.set_xticklabels([str(n) for n in task.seq_lens])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{task.name} ({task.kind})" + (" — last position" if metric == "last_accuracy" else ""))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{spec.name}: held-out accuracy vs sequence length (mean over seeds ± standard error)")
    fig.tight_layout(rect=(0, 0.08 if nrows == 1 else 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(spec: ExperimentSpec, aggs: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per task and sequence length: each variant's headline metric, mean ± standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, n) for t in spec.tasks for n in t.seq_lens]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.4 * nrows), squeeze=False)
    colors = _colors([v.name for v in spec.variants])
    index = {(a["task"], a["seq_len"], a["variant"]): a for a in aggs}
    for ax, (task, n) in zip(axes.flat, panels, strict=False):
        metric = headline_metric(task) if not task.is_lm else "ce"
        names = [v.name for v in spec.task_variants(task) if (task.name, n, v.name) in index]
        means = [index[(task.name, n, v)][f"{metric}_mean"] for v in names]
        ses = [index[(task.name, n, v)][f"{metric}_se"] for v in names]
        ax.bar(range(len(names)), means, yerr=ses, capsize=3, color=[colors[v] for v in names])
        chance = _chance(task)
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([v.replace("wuneng_", "wn_") for v in names], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
        seeds = max((index[(task.name, n, v)]["seeds"] for v in names), default=0)
        ax.set_title(f"{task.name} ({task.kind}), T={n}, {seeds} seeds", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"{spec.name}: held-out metric per variant (mean ± standard error over seeds; dashed: chance)"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train_curve(run_dir: Path) -> dict[int, float]:
    from train.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    return {int(r["step"]): float(r["loss"]) for r in read_jsonl(path, "train")} if path.exists() else {}


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(spec: ExperimentSpec, runs: Sequence[RunSpec], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(t.seq_lens) for t in spec.tasks)
    nrows = len(spec.tasks)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colors = _colors([v.name for v in spec.variants])
    done = {r.index for r in runs if load_result(r) is not None}
    for i, task in enumerate(spec.tasks):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(task.seq_lens):
                ax.axis("off")
                continue
            n = task.seq_lens[j]
            for v in spec.task_variants(task):
                curves = [
                    _train_curve(Path(r.run_dir))
                    for r in runs
                    if r.index in done and r.task.name == task.name and r.seq_len == n and r.variant == v.name
                ]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ys = [statistics.fmean(c[s] for c in curves) for s in steps]
                ax.plot(
                    steps, _smooth(ys, max(1, len(steps) // 30)), label=v.name, color=colors[v.name], lw=1.2
                )
            ax.set_title(f"{task.name}, T={n}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("train loss", fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{spec.name}: training loss (mean over seeds, moving average)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    spec: ExperimentSpec, runs: Sequence[RunSpec], table: Sequence[dict[str, Any]]
) -> list[Path]:
    """Write results.csv, results.json, summary.md and the two plots; returns their paths."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [r for r in runs if not isinstance(r, RunSpec)]
    runs = [r for r in runs if isinstance(r, RunSpec)]
    selected = {r.task.name for r in runs}
    if selected and selected != {t.name for t in spec.tasks}:  # `--tasks`: report the selected tasks only
        spec = dataclasses.replace(spec, tasks=tuple(t for t in spec.tasks if t.name in selected))
    if spec.upcycle is not None and not jobs:  # `--tasks` without `upcycle`
        spec = dataclasses.replace(spec, upcycle=None)
    rows = collect(runs)
    aggs = aggregate(rows)
    paths = [out / "results.csv", out / "results.json", out / "summary.md"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(
        json.dumps(
            {
                "experiment": spec.name,
                "config": spec.source,
                "runs_total": len(runs),
                "runs_done": len(rows),
                "params": list(table),
                "runs": rows,
                "summary": aggs,
            },
            indent=1,
        )
    )
    text = summary_markdown(spec, rows, aggs, table)
    up_results = []
    if spec.upcycle is not None:
        from train.experiments import upcycle_value

        up_results = [res for res in (load_result(j) for j in jobs) if res is not None]
        text += upcycle_value.markdown(spec.upcycle, up_results)
        up = {"results": up_results, "summary": upcycle_value.summarize(up_results) if up_results else {}}
        (out / "upcycle.json").write_text(json.dumps(up, indent=1))
        paths.append(out / "upcycle.json")
    paths[2].write_text(text)
    if rows:
        plot_accuracy(spec, aggs, out / "accuracy_vs_seq_len.png")
        plot_bars(spec, aggs, out / "accuracy_bars.png")
        plot_losses(spec, runs, out / "loss_curves.png")
        paths += [out / "accuracy_vs_seq_len.png", out / "accuracy_bars.png", out / "loss_curves.png"]
    if up_results:
        upcycle_value.plot(up_results, out / "upcycle_losses.png")
        paths.append(out / "upcycle_losses.png")
    return paths

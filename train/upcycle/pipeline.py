"""``wuneng upcycle PIPELINE.yaml``: align -> distill -> sft, each from the previous stage's checkpoint,
then a Hugging Face-style WuNeng export.

Pipeline file (``configs/upcycle/pipeline.yaml``)::

    root: runs/upcycle            # stage run directories: root/<stage name>
    base: path/to/Qwen2.5-0.5B-Instruct   # the Qwen2 to upcycle: HF dir | qwen2 run dir | preset/mapping
    tokenizer: null               # data.tokenizer of every stage [base/tokenizer.json when present]
    export: null                  # the WuNeng directory written at the end [root/export]
    export_dtype: null            # its tensor dtype [the parameters', float32]
    common: {...}                 # merged into every stage's config
    stages:                       # in order; a config file (relative to this file) or {config: file, ...fields}
      align: align.yaml
      distill: distill.yaml
      sft: {config: sft.yaml, steps: 2000}

A stage's config = its file, then ``common``, then the mapping's extra fields, then the wiring
(``run_dir = root/<name>``; ``stage.init_from`` = ``base`` for the first stage, the previous stage's run
directory after; ``stage.teacher`` = ``base`` for a distill stage that names none; ``data.tokenizer``),
then the command line's ``<name>.<key>=value`` overrides (``common.<key>=value``, ``base=...`` and the
other top-level keys change the pipeline file itself).

Resume: a stage whose run directory holds a checkpoint at its ``steps`` is complete and skipped; a
partial one resumes (the Trainer's auto-resume). Each stage records the step of the previous stage it
started from (``root/<name>/upcycle_stage.json``) and refuses to continue from a different one. The
export records its source step too and is rewritten only when the last stage moved on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from train.config import ConfigError, TrainConfig, apply_override, dump_yaml, from_dict
from train.run_lock import locked_run_dir
from wuneng_jax.files import read_yaml

log = logging.getLogger(__name__)

PIPELINE_KEYS = ("root", "base", "tokenizer", "export", "export_dtype", "common", "stages")
STAGE_RECORD = "upcycle_stage.json"
EXPORT_RECORD = "upcycle_export.json"
#: Files copied from a Hugging Face base directory into the export (tokenizer and chat template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


@dataclasses.dataclass
class Pipeline:
    root: Path
    base: Any
    export: Path
    export_dtype: str | None
    stages: list[tuple[str, TrainConfig]]


def _merge(into: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge (``over`` wins; mappings merge key by key, anything else is replaced)."""
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), Mapping):
            into[k] = _merge(dict(into[k]), v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} {str(path)!r} must hold a YAML mapping")
    return dict(data)


def _auto_tokenizer(base: Any) -> str | None:
    if isinstance(base, str) and (Path(base) / "tokenizer.json").is_file():
        return str(Path(base) / "tokenizer.json")
    return None


def load_pipeline(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Pipeline:
    """Read a pipeline file (or mapping) with ``key=value`` overrides -> the resolved stage configs."""
    if isinstance(source, Mapping):
        raw, here = copy.deepcopy(dict(source)), Path.cwd()
    else:
        raw, here = _read_yaml(Path(source), "pipeline file"), Path(source).parent
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, Mapping) or not stages_raw:
        raise ConfigError(
            "pipeline field `stages`: a mapping {name: config file | {config: file, ...}} is required"
        )
    per_stage: dict[str, list[str]] = {name: [] for name in stages_raw}
    for item in overrides:
        key = item.partition("=")[0].strip()
        head = key.split(".")[0]
        if head in per_stage and "." in key:
            per_stage[head].append(item[len(head) + 1 :])
        elif head in PIPELINE_KEYS:
            apply_override(raw, item)
        else:
            raise ConfigError(
                f"override {item!r}: `{head}` is neither a pipeline field ({', '.join(PIPELINE_KEYS)}) nor a "
                f"stage ({', '.join(per_stage)})"
            )
    unknown = sorted(set(raw) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(f"pipeline field `{unknown[0]}`: unknown; fields: {', '.join(PIPELINE_KEYS)}")
    if not raw.get("root"):
        raise ConfigError("pipeline field `root`: required (the directory holding the stage runs)")
    if raw.get("base") is None:
        raise ConfigError(
            "pipeline field `base`: required: the Qwen2 model to upcycle (a Hugging Face directory, a qwen2 run "
            "directory or a preset); e.g. `wuneng upcycle configs/upcycle/pipeline.yaml base=path/to/Qwen2.5-0.5B`"
        )
    root = Path(raw["root"])
    base = raw["base"]
    common = raw.get("common") or {}
    if not isinstance(common, Mapping):
        raise ConfigError("pipeline field `common`: expected a mapping of training-config fields")
    tokenizer = raw.get("tokenizer") or _auto_tokenizer(base)
    stages: list[tuple[str, TrainConfig]] = []
    previous: str | None = None
    for name, entry in stages_raw.items():
        if isinstance(entry, str):
            entry = {"config": entry}
        if not isinstance(entry, Mapping) or "config" not in entry:
            raise ConfigError(
                f"pipeline field `stages.{name}`: a config file path or {{config: file, ...fields}}"
            )
        entry = dict(entry)
        file = Path(entry.pop("config"))
        if not file.is_absolute() and not file.is_file():
            file = here / file
        cfg_raw = _merge(_read_yaml(file, f"stage {name!r} config"), common)
        cfg_raw = _merge(cfg_raw, entry)
        cfg_raw["run_dir"] = str(root / name)
        stage = dict(cfg_raw.get("stage") or {})
        stage["init_from"] = copy.deepcopy(base) if previous is None else previous
        if stage.get("kind") == "distill" and stage.get("teacher") is None:
            stage["teacher"] = copy.deepcopy(base)
        cfg_raw["stage"] = stage
        if tokenizer is not None:
            cfg_raw.setdefault("data", {})["tokenizer"] = tokenizer
        for item in per_stage[name]:
            apply_override(cfg_raw, item)
        try:
            cfg = from_dict(cfg_raw)
            if cfg.data.chat.files:  # fail now, not after the earlier stages have run
                from train.data.chat import ChatDataError, expand_files

                try:
                    expand_files(cfg.data.chat.files)
                except ChatDataError as e:
                    raise ConfigError(str(e)) from e
        except ConfigError as e:
            raise ConfigError(f"stage {name!r}: {e}") from e
        stages.append((name, cfg))
        previous = cfg.run_dir
    export = Path(raw["export"]) if raw.get("export") else root / "export"
    return Pipeline(root, base, export, raw.get("export_dtype"), stages)


# ----------------------------------------------------------------------------------------------------
# Running


def _record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STAGE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def run_pipeline(
    pipe: Pipeline,
    *,
    echo: Callable[[str], None] = print,
    trainer_factory: Callable[[TrainConfig], Any] | None = None,
) -> dict[str, Any]:
    """Run the stages in order (skipping complete ones, resuming a partial one), then export.

    Returns ``{"stages": {name: "skipped" | "ran" | "preempted"}, "export": path or None}``; a preempted
    stage (SIGTERM, Ctrl-C) stops the pipeline (run the command again to continue). Holds ``root``'s run
    lock (``train.run_lock``): a second pipeline into the same root is refused.
    """

    if trainer_factory is None:
        from train.trainer import Trainer

        trainer_factory = lambda cfg: Trainer(cfg, echo=echo)  # noqa: E731
    import jax

    with locked_run_dir(pipe.root, "wuneng upcycle"):
        return _run_stages(pipe, echo, trainer_factory, primary=jax.process_index() == 0)


def _run_stages(
    pipe: Pipeline,
    echo: Callable[[str], None],
    trainer_factory: Callable[[TrainConfig], Any],
    *,
    primary: bool,
) -> dict[str, Any]:
    from train.upcycle.sources import latest_step

    status: dict[str, str] = {}
    previous: tuple[str, Path] | None = None
    for name, cfg in pipe.stages:
        run_dir = Path(cfg.run_dir)
        done = latest_step(run_dir)
        source_step = None if previous is None else latest_step(previous[1])
        record = _record(run_dir)
        if done is not None and record is not None and record.get("init_step") != source_step:
            raise ConfigError(
                f"stage {name!r} in {run_dir} started from step {record.get('init_step')} of stage "
                f"{previous[0] if previous else '-'}, which now ends at step {source_step}; delete {run_dir} to "
                "redo this stage (and the later ones) from the new weights"
            )
        if done is not None and done >= cfg.steps:
            echo(f"== stage {name} ({cfg.stage.kind}): complete at step {done}, skipped")
            status[name] = "skipped"
            previous = (name, run_dir)
            continue
        if cfg.stage.kind == "distill" and cfg.stage.teacher == pipe.base and cfg.stage.ce_weight == 0:
            echo(
                f"== note: stage {name} distils from the base model itself: the upcycled model starts at KL = 0 "
                "(the upcycling identity), where the gradient vanishes; a larger teacher "
                f"({name}.stage.teacher=...) or {name}.stage.ce_weight > 0 makes this stage move the weights"
            )
        if done is None and primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / STAGE_RECORD).write_text(
                json.dumps(
                    {
                        "stage": name,
                        "kind": cfg.stage.kind,
                        "init_from": _plain(cfg.stage.init_from),
                        "init_step": source_step,
                    },
                    indent=1,
                )
            )
        how = "resuming" if done is not None else "starting"
        echo(f"== stage {name} ({cfg.stage.kind}): {how} in {run_dir}, {cfg.steps} steps")
        result = trainer_factory(cfg).run()
        if result.preempted:
            echo(
                f"== stage {name} stopped at step {result.final_step} (SIGTERM / Ctrl-C); run the command again "
                "to resume"
            )
            status[name] = "preempted"
            return {"stages": status, "export": None}
        status[name] = "ran"
        previous = (name, run_dir)
    last = Path(pipe.stages[-1][1].run_dir)
    tokenizer = pipe.stages[-1][1].data.tokenizer
    export = export_if_stale(
        last, pipe.export, dtype=pipe.export_dtype, base=pipe.base, tokenizer=tokenizer, echo=echo
    )
    return {"stages": status, "export": export}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------------
# Export


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    base: Any = None,
    tokenizer: str | None = None,
) -> tuple[Path | None, int]:
    """Write the newest checkpoint of the WuNeng run ``run_dir`` as a WuNeng directory (``config.json`` +
    safetensors; ``docs/wuneng_format.md``), with the tokenizer files of ``base`` when it is a Hugging Face
    directory, else the run's ``tokenizer`` (``data.tokenizer``: ``wuneng generate OUT`` then needs no
    ``--tokenizer``). Returns ``(out, step)`` (``out`` is None on processes other than the first, which writes)."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from train.config import MESH_AXES
    from train.upcycle.sources import load_source, open_source
    from wuneng_jax.convert.hf_wuneng import save_wuneng
    from wuneng_jax.models.wuneng import WuNengConfig
    from wuneng_jax.sharding import DEFAULT_RULES

    src = open_source(str(run_dir), "export")
    if not isinstance(src.cfg, WuNengConfig):
        raise ConfigError(f"{run_dir} holds a {src.family} model; the export writes WuNeng models")
    # Host memory: the weights go to numpy anyway, and need not fit one accelerator.
    cpu = np.array(jax.devices("cpu")[:1]).reshape((1,) * len(MESH_AXES))
    mesh = Mesh(cpu, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    model = load_source(src, mesh=mesh, rules=DEFAULT_RULES)  # every process restores (orbax is collective)
    if jax.process_index() != 0:
        return None, int(src.step)
    out = save_wuneng(model, src.cfg, out, dtype=dtype, overwrite=True)
    if isinstance(base, str) and (Path(base) / "config.json").is_file():
        for name in TOKENIZER_FILES:
            if (Path(base) / name).is_file():
                shutil.copy2(Path(base) / name, out / name)
    if tokenizer is not None:
        from train.data.tokenizer import load_tokenizer, save_tokenizer

        save_tokenizer(load_tokenizer(tokenizer), out)
    return out, int(src.step)


def export_if_stale(
    run_dir: Path,
    out: Path,
    *,
    dtype: str | None,
    base: Any,
    tokenizer: str | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """:func:`export_run` unless ``out`` already holds the export of the run's newest step."""
    from train.upcycle.sources import latest_step

    step = latest_step(run_dir)
    rec_path = out / EXPORT_RECORD
    want = {"source": str(Path(run_dir).absolute()), "step": step, "dtype": dtype, "tokenizer": tokenizer}
    if rec_path.is_file() and json.loads(rec_path.read_text()) == want:
        echo(f"== export {out}: up to date (step {step} of {run_dir})")
        return out
    out, step = export_run(run_dir, out, dtype=dtype, base=base, tokenizer=tokenizer)
    if out is not None:  # the primary process writes
        rec_path.write_text(json.dumps(want, indent=1))
    echo(
        f"== exported step {step} of {run_dir} to {out} (load with wuneng_jax.convert.hf_wuneng.load_wuneng)"
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser(p):
    p.add_argument("pipeline", help="pipeline YAML (configs/upcycle/pipeline.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="base=..., root=..., common.<key>=..., <stage>.<key>=... (e.g. align.steps=100)",
    )
    p.add_argument("--dry-run", action="store_true", help="print each stage's resolved config and exit")
    return p


def run(args) -> int:
    pipe = load_pipeline(args.pipeline, args.overrides)
    if args.dry_run:
        for name, cfg in pipe.stages:
            print(f"# ---- stage {name}\n" + dump_yaml(cfg))
        print(f"# export: {pipe.export}")
        return 0
    run_pipeline(pipe)
    return 0

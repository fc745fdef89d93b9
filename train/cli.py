"""The ``wuneng`` command.

    wuneng train CONFIG.yaml [key=value ...]       train (resumes from run_dir), prints/saves the config
    wuneng prepare-data INPUT... --out STORE       tokenise a corpus into a token store

Overrides are dotted paths into the config (``optimizer.lr=1e-3``, ``mesh.fsdp=4``, ``model.num_layers=4``),
values parsed as YAML. Planned subcommands (``eval``, ``generate``, ``compile``, ``params``) register in
:data:`COMMANDS` the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config YAML (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--verbose", action="store_true", help="print the whole resolved config at start-up, not a summary"
    )


def _train(args: argparse.Namespace) -> int:
    from train.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg))
        return 0
    from train.trainer import Trainer

    Trainer(cfg, verbose=args.verbose).run()  # a preempted run saved its checkpoint: also a clean exit
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    from train.data.prepare import build_parser

    build_parser(p)


def _prepare(args: argparse.Namespace) -> int:
    from train.data.prepare import run

    return run(args)


def _generate_args(p: argparse.ArgumentParser) -> None:
    from train.generate import build_parser

    build_parser(p)


def _generate(args: argparse.Namespace) -> int:
    from train.generate import run

    return run(args)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from train.evaluate import build_parser

    build_parser(p)


def _eval(args: argparse.Namespace) -> int:
    from train.evaluate import run

    return run(args)


def _upcycle_args(p: argparse.ArgumentParser) -> None:
    from train.upcycle.pipeline import build_parser

    build_parser(p)


def _upcycle(args: argparse.Namespace) -> int:
    from train.upcycle.pipeline import run

    return run(args)


def _compile_args(p: argparse.ArgumentParser) -> None:
    from train.aot.compile import build_parser

    build_parser(p)


def _compile(args: argparse.Namespace) -> int:
    from train.aot.compile import platform_defaults, run

    platform_defaults()  # before any JAX backend starts: libtpu only as the TPU compiler
    return run(args)


def _experiment_args(p: argparse.ArgumentParser) -> None:
    from train.experiments.runner import build_parser

    build_parser(p)


def _experiment(args: argparse.Namespace) -> int:
    from train.experiments.runner import run

    return run(args)


COMMANDS: list[Command] = [
    ("train", _train_args, _train),
    ("prepare-data", _prepare_args, _prepare),
    ("generate", _generate_args, _generate),
    ("eval", _eval_args, _eval),
    ("upcycle", _upcycle_args, _upcycle),
    ("compile", _compile_args, _compile),
    ("experiment", _experiment_args, _experiment),
]

_HELP = {
    "train": "train a model from a YAML config (+ key=value overrides); resumes from run_dir",
    "prepare-data": "tokenise text/jsonl files or the embedded stdlib corpus into a token store",
    "generate": "generate text from a run directory, a Hugging Face Qwen2/WuNeng dir or a BlinkDL RWKV-7 file",
    "eval": "perplexity on a token store, multiple-choice accuracy, lm-eval tasks",
    "upcycle": "align -> distill -> sft from a Qwen2 checkpoint to WuNeng, then a Hugging Face-style export "
    "(resumable)",
    "compile": "ahead-of-time compile the train step for a TPU topology: per-chip memory, FLOPs, fits or not",
    "experiment": "train ablation variants on synthetic tasks over seeds and sequence lengths; table + plots",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wuneng", description="WuNeng (attention + RWKV-7 state) in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_args, fn in COMMANDS:
        p = sub.add_parser(name, help=_HELP.get(name), description=_HELP.get(name))
        add_args(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wuneng`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may follow options (`train c.yaml --dry-run steps=5`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command != "compile":  # compile sets up libtpu as its compiler itself
        from train.platform import pin_cpu_without_accelerator

        pin_cpu_without_accelerator()  # before any JAX backend starts: no libtpu probe on a CPU host
    from train.checkpoint import CheckpointError
    from train.mesh import CoordinatorUnreachable
    from train.run_lock import RunLockError
    from train.signals import ABORT_EXIT_CODE
    from train.trainer import TrainingDiverged

    try:
        return int(args._fn(args))
    except TrainingDiverged as e:
        return _error(args.command, e, 1)
    except (ValueError, CheckpointError, RunLockError, CoordinatorUnreachable, *_USER_OS_ERRORS) as e:
        return _error(args.command, e, 2)  # ConfigError, MeshError, StoreError are ValueErrors
    except KeyboardInterrupt:
        print(f"wuneng {args.command}: interrupted", file=sys.stderr)
        return ABORT_EXIT_CODE


# Operating-system errors a user's paths cause (not bugs): reported as one line naming the path.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _error(command: str, error: BaseException, code: int) -> int:
    """One line on stderr, ``wuneng COMMAND: error: ...``; returns the exit code."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror.lower()}"
    print(f"wuneng {command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

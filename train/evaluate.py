"""``wuneng eval``: perplexity over a token store, multiple-choice accuracy, lm-eval tasks.

    wuneng eval runs/demo                              # perplexity on the run's own held-out split
    wuneng eval runs/demo --store runs/data/stdlib --seq-len 128 --batch-size 16     # any token store
    wuneng eval runs/demo --mc questions.jsonl                                       # acc / acc_norm
    wuneng eval path/to/Qwen2.5-0.5B --tasks hellaswag,arc_easy --limit 100          # lm-eval (optional dep)

Perplexity (:func:`perplexity`) runs the held-out split in the same packed rows as training's eval
(``train.data.pipeline.eval_dataset``: documents never attend to each other, each document's first token
is not predicted, padding is masked), as one jitted program sharded over a data-parallel mesh of every
device, with a progress bar. ``ppl = exp(Σ CE / #target tokens)``.

Multiple choice (:func:`load_mc_jsonl`): one JSON object per line, ``{"context": str, "choices": [str, ...],
"gold": int}`` (``query``/``label`` are accepted as aliases). The continuation of each choice is scored after
the context exactly as lm-eval does (trailing context spaces move into the continuation); ``acc_norm``
divides by the choice's length in characters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------


def _not_finite(what: str) -> ValueError:
    """The error for a non-finite evaluation result (never reported as a number)."""
    return ValueError(
        f"{what} (not finite): the model's parameters are not finite (a diverged checkpoint?) or its logits "
        "overflow in its compute dtype; check the checkpoint, or evaluate with --dtype float32"
    )


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per target token (nats)
    tokens: int  # target tokens scored
    batches: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        d = dataclasses.asdict(self)
        d["bits_per_token"] = self.nll / math.log(2)
        return d


def _place_model(model: Any, mesh: Any, rules: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, state placed by the logical rules, its shardings)`` on ``mesh``."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from train.mesh import mesh_context

    graphdef, state = nnx.split(model)
    with mesh_context(mesh, rules):
        specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return graphdef, jax.device_put(state, shardings), shardings


def perplexity(
    model: Any,
    store: Any,
    *,
    seq_len: int,
    batch_size: int,
    split: str = "eval",
    max_batches: int | None = None,
    mesh: Any = None,
    rules: Any = None,
    progress: bool = True,
    vocab_tile: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token store split (a ``TokenStore`` or a path).

    ``batch_size`` is the global batch (rows of ``seq_len`` tokens), split over the mesh's batch axes
    (default mesh: data parallel over every device). ``max_batches`` caps the number of batches.
    ``vocab_tile``: ids per vocabulary tile of the loss (``wuneng_jax.layers.vocab_tiling``; 0 = full
    logits; default ``DEFAULT_VOCAB_TILE``).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from train.config import MeshConfig
    from train.data import pipeline
    from train.mesh import make_mesh, mesh_context
    from train.train_step import BATCH_KEYS, batch_spec, check_batch_shape, model_ce_sums
    from wuneng_jax.layers.vocab_tiling import DEFAULT_VOCAB_TILE
    from wuneng_jax.sharding import DEFAULT_RULES

    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    tile = DEFAULT_VOCAB_TILE if vocab_tile is None else vocab_tile
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    rules = DEFAULT_RULES if rules is None else rules
    check_batch_shape(batch_size, seq_len, 1, mesh, rules)
    store = pipeline.open_store(store, split)
    vocab = int(model.cfg.vocab_size)
    if store.vocab_size > vocab:
        raise ValueError(
            f"the token store has vocabulary size {store.vocab_size} but the model only {vocab}: "
            "evaluate with the model's own tokenizer/store"
        )
    store.check_ids(vocab, "the model's vocab_size")
    n_proc = jax.process_count()
    if batch_size % n_proc:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {n_proc} processes")
    ds = pipeline.eval_dataset(
        store, seq_len=seq_len, local_batch=batch_size // n_proc, max_batches=max_batches
    )
    graphdef, state, state_sh = _place_model(model, mesh, rules)
    spec = batch_spec(rules)
    batch_sh = NamedSharding(mesh, spec)

    def step(state, batch):
        m = nnx.merge(graphdef, state)
        ce, _ = model_ce_sums(m, batch, tile)
        return ce, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    with mesh_context(mesh, rules):
        fn = jax.jit(
            step,
            in_shardings=(state_sh, {k: batch_sh for k in BATCH_KEYS}),
            out_shardings=NamedSharding(mesh, PartitionSpec()),
        )
        t0 = time.perf_counter()
        sums = []
        it = range(len(ds))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"perplexity ({store.split})", unit="batch")
        for i in it:
            local = ds[i]
            batch = pipeline.make_global_batch({k: local[k] for k in BATCH_KEYS}, mesh, spec)
            sums.append(fn(state, batch))
        ce = sum(float(c) for c, _ in jax.device_get(sums))
        n = sum(float(c) for _, c in jax.device_get(sums))
    if n == 0:
        raise ValueError(f"split {store.split!r} of {store.path} has no token to score (empty split?)")
    nll = ce / n
    if not math.isfinite(nll):
        raise _not_finite(f"perplexity on split {store.split!r} of {store.path}: the loss is {nll}")
    return PerplexityResult(math.exp(nll), nll, int(n), len(ds), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------


def load_mc_jsonl(path: str | Path, tokenizer: Any) -> list[Any]:
    """``MCQuestion``s from a jsonl file (module docstring for the format)."""
    from train.data.tokenizer import encode_pair
    from wuneng_jax.eval import MCQuestion

    questions = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        context = rec.get("context", rec.get("query"))
        choices, gold = rec.get("choices"), rec.get("gold", rec.get("label"))
        if not isinstance(context, str) or not isinstance(choices, list) or not isinstance(gold, int):
            raise ValueError(
                f'{path}:{n}: expected {{"context": str, "choices": [str, ...], "gold": int}}, got keys '
                f"{sorted(rec)}"
            )
        try:
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ValueError(f'"choices" must list at least 2 strings, got {choices!r}')
            pairs = [encode_pair(tokenizer, context, c) for c in choices]
            questions.append(
                MCQuestion(pairs[0][0], [p[1] for p in pairs], gold, norm_lengths=[len(c) for c in choices])
            )
        except ValueError as e:
            raise ValueError(
                f'{path}:{n}: {e}; each line needs {{"context": str, "choices": [str, str, ...], "gold": index}}'
            ) from None
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def multiple_choice(
    model: Any,
    questions: Sequence[Any],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
):
    """``MCResult`` (acc, acc_norm) of ``model`` on ``questions``; a non-finite log-likelihood is an error
    (:func:`check_mc_finite`), not a guess."""
    from wuneng_jax.eval import LoglikelihoodScorer, score_multiple_choice

    scorer = LoglikelihoodScorer(model, batch_size=batch_size, max_length=max_length)
    return check_mc_finite(score_multiple_choice(scorer, questions, progress=progress))


def check_mc_finite(result: Any) -> Any:
    """``result`` (an ``MCResult``) when every choice's log-likelihood is finite; else a ValueError."""
    bad = sum(not math.isfinite(ll) for lls in result.loglikelihoods for ll in lls)
    if bad:
        raise _not_finite(f"multiple choice: {bad} choice log-likelihoods are nan or infinite")
    return result


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from train.generate import add_model_args

    p = p or argparse.ArgumentParser(prog="wuneng eval", description=__doc__.split("\n")[0])
    add_model_args(p)
    g = p.add_argument_group("perplexity")
    g.add_argument(
        "--store", default=None, help="token store to compute perplexity on (default for a run dir: its own)"
    )
    g.add_argument("--split", default="eval", help="store split (default: eval)")
    g.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's, else 512)")
    g.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    g = p.add_argument_group("multiple choice / lm-eval")
    g.add_argument("--mc", default=None, help="multiple-choice questions (jsonl: context, choices, gold)")
    g.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval tasks (needs `pip install lm-eval`)"
    )
    g.add_argument("--include-path", default=None, help="extra lm-eval task directory (local task YAMLs)")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (global)")
    p.add_argument("--max-length", type=int, default=None, help="longest scored input (default: the model's)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from train.generate import load_model, load_tokenizer_for

    loaded = load_model(args.source, dtype=args.dtype, step=args.step, seed=args.seed)
    store = args.store
    if not (store or args.mc or args.tasks):
        if loaded.store is None:
            raise ValueError(
                "nothing to evaluate: give --store (perplexity), --mc FILE.jsonl and/or --tasks T1,T2"
            )
        store = loaded.store  # a run directory: perplexity on its own token store
    results: dict[str, Any] = {"source": str(args.source), "family": loaded.cfg.family}
    progress = not args.no_progress
    if store:
        seq_len = args.seq_len or loaded.seq_len or 512
        r = perplexity(
            loaded.model,
            store,
            split=args.split,
            seq_len=seq_len,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            progress=progress,
        )
        results["perplexity"] = {**r.as_dict(), "store": store, "split": args.split, "seq_len": seq_len}
        print(
            f"perplexity {r.perplexity:.4f} (nll {r.nll:.4f} nats/token, {r.tokens:,} tokens, {r.batches} batches, "
            f"{r.seconds:.1f}s)"
        )
    if args.mc:
        tokenizer = load_tokenizer_for(loaded, args.tokenizer)
        res = multiple_choice(
            loaded.model,
            load_mc_jsonl(args.mc, tokenizer),
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=progress,
        )
        results["multiple_choice"] = {**res.as_dict(), "file": args.mc, "predictions": res.predictions}
        print(f"multiple choice: acc {res.acc:.4f}  acc_norm {res.acc_norm:.4f}  ({res.n} questions)")
    if args.tasks:
        from train.lm_eval_adapter import run_lm_eval

        tokenizer = load_tokenizer_for(loaded, args.tokenizer)
        out = run_lm_eval(
            loaded,
            tokenizer,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            batch_size=args.batch_size,
            max_length=args.max_length,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path,
        )
        results["lm_eval"] = out
        for task, metrics in out.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))
            print(f"{task}: {shown}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1, default=str))
        print(f"results written to {args.output}", file=sys.stderr)
    return 0

"""``wuneng prepare-data``: tokenise text / jsonl files or the embedded corpus into a token store.

    python -m train.data.prepare stdlib --out data/stdlib                   # embedded corpus, byte-level
    python -m train.data.prepare a.jsonl docs/ --out gs://b/data --tokenizer tokenizer.json --workers 4

Input files (units, see ``train.data.sources``) are tokenised in parallel by worker processes and
appended to the store in input order, so the result does not depend on the worker count. Each
document gets the tokenizer's EOS id appended; empty documents are skipped. Document number g
(counting every non-empty document in input order) goes to the ``eval`` split when
``floor((g + 1) * eval_fraction) > floor(g * eval_fraction)``: an even spread of exactly that fraction.

Resumable: the manifest (the store's single commit point) records how many inputs are done; it is
rewritten every ``commit_every_s`` seconds and at the end, after the arrays it describes. Re-running
with the same arguments after a crash or ``max_inputs`` stop continues from the last commit; a store
only reads as complete after the final manifest write. Different arguments on an existing store are
an error unless ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from train.data import corpus, store
from train.data.sources import InputUnit, Utf8Check, expand_inputs, read_documents
from train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

_DESCRIPTION = (
    "Tokenise text/jsonl files, directories or the embedded Python-stdlib corpus ('stdlib') into a token "
    "store (zarr3 arrays via tensorstore), in parallel and resumably."
)
_ENCODE_BATCH = 256  # documents per encode_batch call
_PARALLEL_MIN_BYTES = 64 << 20  # workers=None uses one process below this much input

# ------------------------------------------------------------------------------------- worker side

_WORKER: dict = {}


def _init_worker(
    tok_desc: dict, tok_json: bytes | None, text_field: str, dtype: str, accept_invalid_utf8: bool = False
) -> None:
    if tok_desc["kind"] == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = HFTokenizer.from_json_bytes(
            tok_json, name=tok_desc["path"], eos_token=tok_desc["eos_token"], pad_token=tok_desc["pad_token"]
        )
    _WORKER.update(tok=tok, text_field=text_field, dtype=np.dtype(dtype), accept=accept_invalid_utf8)


def _encode_docs(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]
    return [np.asarray(ids, dtype) for ids in tok.encode_batch(texts)]


def tokenize_unit(unit: InputUnit) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tokens of all non-empty documents, each followed by EOS; their lengths; number of empty ones;
    number of undecodable UTF-8 sequences replaced)."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    eos = np.asarray([tok.eos_id], dtype)
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    empty = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal empty
        for ids in _encode_docs(tok, batch, dtype):
            if len(ids) == 0:
                empty += 1
                continue
            parts.extend((ids, eos))
            lengths.append(len(ids) + 1)
        batch.clear()

    check = Utf8Check(unit.path, accept=_WORKER["accept"])
    for text in read_documents(unit, text_field=_WORKER["text_field"], check=check):
        batch.append(text)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    return tokens, np.asarray(lengths, np.int64), empty, check.replaced


# ------------------------------------------------------------------------------------- main side


def eval_mask(first_doc: int, n_docs: int, eval_fraction: float) -> np.ndarray:
    """bool [n_docs]: which of documents ``first_doc .. first_doc + n_docs - 1`` go to the eval split."""
    g = np.arange(first_doc, first_doc + n_docs, dtype=np.float64)
    return np.floor((g + 1) * eval_fraction) > np.floor(g * eval_fraction)


def _identity(
    tok_desc: dict, units: list[InputUnit], eval_fraction: float, text_field: str, chunk: int
) -> dict:
    """The manifest fields that must match for a store to be resumed (tokenizer path may differ)."""
    return {
        "tokenizer": {k: v for k, v in tok_desc.items() if k != "path"},
        "inputs": [u.describe() for u in units],
        "eval_fraction": float(eval_fraction),
        "text_field": text_field,
        "chunk_tokens": int(chunk),
    }


def _results(units: list[InputUnit], workers: int, initargs: tuple):
    """Yields tokenize_unit(u) for each unit, in order, with at most 2*workers units in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        for u in units:
            yield tokenize_unit(u)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        todo = iter(units)
        for u in todo:
            pending.append(pool.apply_async(tokenize_unit, (u,)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            res = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(tokenize_unit, (nxt,)))
            yield res


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "byte",
    *,
    eos_token: str | None = None,
    eval_fraction: float = 0.01,
    text_field: str = "text",
    workers: int | None = None,
    chunk_tokens: int = store.DEFAULT_CHUNK_TOKENS,
    stdlib_max_files: int | None = corpus.DEFAULT_MAX_FILES,
    stdlib_max_bytes: int | None = corpus.DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    max_inputs: int | None = None,
    commit_every_s: float = 10.0,
    progress: bool = True,
    accept_invalid_utf8: bool = False,
) -> dict:
    """Tokenises ``inputs`` into the token store at ``out_dir`` (local path or kvstore URL); returns its manifest.

    Args:
      inputs: files, directories, glob patterns, or ``"stdlib"`` (``train.data.sources``).
      tokenizer: ``"byte"``, a tokenizer.json path, or a tokenizer object.
      eos_token: the document separator of a tokenizer.json tokenizer (found automatically when None).
      eval_fraction: fraction of documents held out in the ``eval`` split, in [0, 1).
      text_field: the jsonl field holding the document text.
      workers: tokenising processes (None: 1 below 64 MiB of input, else min(4, CPUs, inputs));
        1 = in this process. The store does not depend on it.
      chunk_tokens: zarr chunk length of the token arrays.
      stdlib_max_files / stdlib_max_bytes: limits of the embedded corpus.
      overwrite: delete an existing store at ``out_dir`` first.
      max_inputs: stop (store left incomplete, resumable) after this many more inputs.
      commit_every_s: seconds between manifest commits (resume granularity); 0 = after every input.
      progress: show a tqdm bar (bytes of input, rate and ETA).
      accept_invalid_utf8: keep binary / mostly non-UTF-8 files (undecodable bytes become U+FFFD)
        instead of refusing them (``train.data.sources``); the manifest counts the replacements.

    A complete store with the same arguments is returned unchanged; an incomplete one is resumed.
    """
    out_dir = os.fspath(out_dir)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if max_inputs is not None and max_inputs < 0:
        raise ValueError(f"max_inputs must be >= 0 or None, got {max_inputs}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    tok_desc = tok.describe()
    units = expand_inputs(inputs, stdlib_max_files=stdlib_max_files, stdlib_max_bytes=stdlib_max_bytes)
    ident = _identity(tok_desc, units, eval_fraction, text_field, chunk_tokens)

    manifest = None
    if overwrite:
        store.delete_store(out_dir)
    else:
        manifest = store.read_manifest(out_dir)
    if manifest is None:
        if not store.store_is_empty(out_dir):
            raise ValueError(
                f"{out_dir!r} exists, is not empty and holds no token store manifest: choose a new or empty "
                "directory, or pass overwrite=True (CLI: --overwrite) to delete its contents"
            )
        manifest = store.new_manifest(
            tokenizer=tok_desc,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            chunk_tokens=chunk_tokens,
            inputs=ident["inputs"],
            inputs_done=0,
            docs_seen=0,
            empty_docs_skipped=0,
            eval_fraction=float(eval_fraction),
            text_field=text_field,
            created_by="train.data.prepare",
            python=sys.version.split()[0],
        )
        if isinstance(tok, HFTokenizer):
            store.write_tokenizer_file(out_dir, tok.json_bytes)
        store.write_manifest(out_dir, manifest)
    else:
        old = _identity(
            manifest.get("tokenizer", {}),
            [InputUnit(**u) for u in manifest.get("inputs", [])],
            manifest.get("eval_fraction", -1.0),
            manifest.get("text_field", ""),
            manifest.get("chunk_tokens", -1),
        )
        diff = [k for k in ident if ident[k] != old[k]]
        if diff:
            raise ValueError(
                f"the token store at {out_dir!r} was made with different {', '.join(diff)}: re-run with the same "
                "arguments to resume it, use a new output directory, or pass overwrite=True (CLI: --overwrite)"
            )
        if manifest.get("complete"):
            return manifest

    writer = store.StoreWriter(out_dir, manifest)
    done = int(manifest["inputs_done"])
    docs_seen = int(manifest["docs_seen"])
    empty = int(manifest["empty_docs_skipped"])
    replaced = int(manifest.get("invalid_utf8_replaced", 0))
    todo = units[done:] if max_inputs is None else units[done : done + max_inputs]
    if workers is None:  # process start-up costs more than it saves on small inputs
        small = sum(u.size for u in todo) < _PARALLEL_MIN_BYTES
        workers = 1 if small else max(1, min(4, os.cpu_count() or 1, len(todo)))
    initargs = (
        tok_desc,
        tok.json_bytes if isinstance(tok, HFTokenizer) else None,
        text_field,
        manifest["dtype"],
        accept_invalid_utf8,
    )

    bar = tqdm(
        total=sum(u.size for u in units),
        initial=sum(u.size for u in units[:done]),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"prepare-data {os.path.basename(out_dir.rstrip('/')) or out_dir}",
        disable=not progress,
        dynamic_ncols=True,
    )
    last_commit = time.monotonic()
    n_tok = sum(int(c["n_tokens"]) for c in writer.counts.values())
    try:
        for unit, (tokens, lengths, n_empty, n_replaced) in zip(
            todo, _results(todo, workers, initargs), strict=True
        ):
            is_eval = eval_mask(docs_seen, len(lengths), eval_fraction)
            tok_eval = np.repeat(is_eval, lengths)
            writer.append("train", tokens[~tok_eval], lengths[~is_eval])
            writer.append("eval", tokens[tok_eval], lengths[is_eval])
            docs_seen += len(lengths)
            empty += n_empty
            replaced += n_replaced
            done += 1
            bar.update(unit.size)
            n_tok += len(tokens)
            bar.set_postfix(docs=docs_seen, tokens=n_tok, refresh=False)
            if time.monotonic() - last_commit >= commit_every_s:
                writer.commit(
                    inputs_done=done,
                    docs_seen=docs_seen,
                    empty_docs_skipped=empty,
                    invalid_utf8_replaced=replaced,
                )
                last_commit = time.monotonic()
        fields = {
            "inputs_done": done,
            "docs_seen": docs_seen,
            "empty_docs_skipped": empty,
            "invalid_utf8_replaced": replaced,
        }
        if done < len(units):
            return writer.commit(**fields)
        return writer.finalize(**fields)
    finally:
        bar.close()


def summary(path: str, manifest: dict) -> str:
    """One human-readable paragraph about a store."""
    s = manifest["splits"]
    state = (
        "complete"
        if manifest.get("complete")
        else f"INCOMPLETE ({manifest['inputs_done']}/{len(manifest['inputs'])} inputs)"
    )
    return (
        f"token store {path}: {state}; tokenizer {manifest['tokenizer']['kind']} (vocab {manifest['vocab_size']}, "
        f"eos {manifest['eos_id']}, {manifest['dtype']}); train {s['train']['n_docs']} docs / "
        f"{s['train']['n_tokens']} tokens; eval {s['eval']['n_docs']} docs / {s['eval']['n_tokens']} tokens"
        + (f"; content hash {manifest['content_hash'][:16]}" if manifest.get("content_hash") else "")
        + (
            f"\nwarning: {manifest['invalid_utf8_replaced']} undecodable UTF-8 byte sequences were replaced by U+FFFD"
            if manifest.get("invalid_utf8_replaced")
            else ""
        )
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The prepare-data arguments (added to ``parser`` when given, e.g. a CLI subcommand parser)."""
    p = parser or argparse.ArgumentParser(prog="wuneng prepare-data", description=_DESCRIPTION)
    p.add_argument(
        "inputs",
        nargs="+",
        help="text/jsonl files, directories, glob patterns, or 'stdlib' (the embedded Python-stdlib corpus)",
    )
    p.add_argument("--out", "-o", required=True, help="store directory (local path or gs://... URL)")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json path")
    p.add_argument(
        "--eos-token", default=None, help="EOS token of a tokenizer.json tokenizer (auto-detected)"
    )
    p.add_argument("--eval-fraction", type=float, default=0.01, help="held-out fraction of documents")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenising processes (default: 1 below 64 MiB of input, else min(4, CPUs))",
    )
    p.add_argument("--chunk-tokens", type=int, default=store.DEFAULT_CHUNK_TOKENS, help="zarr chunk length")
    p.add_argument("--stdlib-max-files", type=int, default=corpus.DEFAULT_MAX_FILES)
    p.add_argument("--stdlib-max-bytes", type=int, default=corpus.DEFAULT_MAX_BYTES)
    p.add_argument("--max-inputs", type=int, default=None, help="stop after this many inputs (resumable)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    p.add_argument(
        "--accept-invalid-utf8",
        action="store_true",
        help="keep binary or mostly non-UTF-8 files (undecodable bytes become U+FFFD) instead of refusing them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Runs prepare-data from parsed arguments (for a CLI that embeds ``build_parser``)."""
    manifest = prepare(
        args.inputs,
        args.out,
        args.tokenizer,
        eos_token=args.eos_token,
        eval_fraction=args.eval_fraction,
        text_field=args.text_field,
        workers=args.workers,
        chunk_tokens=args.chunk_tokens,
        stdlib_max_files=args.stdlib_max_files,
        stdlib_max_bytes=args.stdlib_max_bytes,
        overwrite=args.overwrite,
        max_inputs=args.max_inputs,
        progress=not args.no_progress,
        accept_invalid_utf8=args.accept_invalid_utf8,
    )
    print(summary(args.out, manifest))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``wuneng prepare-data ARGS`` / ``python -m train.data.prepare ARGS``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

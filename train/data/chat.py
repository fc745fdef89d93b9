"""Chat (SFT) data: jsonl conversations -> template -> tokens with an assistant-only loss mask -> packed rows.

Input: jsonl files, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Rendering (:class:`train.config.ChatTemplateConfig`, default ChatML as Qwen2.5)::

    prefix
    <|im_start|>{role}\\n  CONTENT  <|im_end|>  \\n        (per message: turn_start, content, turn_end, separator)
    suffix

Every piece is tokenised on its own and the pieces concatenated (so the mask boundaries are exact);
the tokens of a trained message's content and its ``turn_end`` (the end-of-turn token the model must
learn to emit) are *trained*, everything else (system/user turns, the ``<|im_start|>assistant\\n``
header, separators) is context only.

Packing (one conversation = one segment, never split across rows; greedy in order): per row,
``tokens[t]`` is a conversation token, ``targets[t]`` the next token of the same conversation,
``loss_mask[t] = 1`` exactly when that next token is trained, ``segment_ids`` numbers the
conversations in the row (0 = padding) and ``positions`` restart at 0 for each — the conventions of
``train.data.packing``, so the model, the loss and the attention mask see each conversation alone.

Rows are built once in memory (deterministic for given files, tokenizer and ``seq_len``), then served by
the same grain chain as the token store (shuffle per epoch, repeat, per-host shard, batch), so
iterator state in checkpoints resumes exactly. :func:`sample_conversations` generates the embedded
synthetic set (arithmetic, string edits, facts about the set itself) used by tests and the demo.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from train.config import ChatDataConfig, ChatTemplateConfig
from train.data.packing import ROW_KEYS, empty_row

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


class ChatDataError(ValueError):
    """A chat file or record is malformed."""


# ----------------------------------------------------------------------------------------------------
# Reading


def expand_files(patterns: Sequence[str]) -> list[str]:
    """Paths and globs -> a sorted, de-duplicated file list (each pattern must match something)."""
    out: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise ChatDataError(f"data.chat.files: {pat!r} matches no file")
        out.extend(h for h in hits if h not in out)
    return out


def check_conversation(messages: Any, where: str) -> Conversation:
    """Validate one record's messages: a non-empty list of ``{role: str, content: str}``."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ChatDataError(
                f"{where}: message {i} must be an object with string `role` and `content`, got {m!r}"
            )
        if not m["role"]:
            raise ChatDataError(f"{where}: message {i} has an empty role")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_jsonl(paths: Iterable[str], messages_field: str = "messages") -> list[Conversation]:
    """All conversations of the jsonl files (blank lines skipped); errors name file and line."""
    convs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatDataError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or messages_field not in rec:
                    raise ChatDataError(f"{where}: expected an object with a {messages_field!r} list")
                convs.append(check_conversation(rec[messages_field], where))
    return convs


# ----------------------------------------------------------------------------------------------------
# Rendering and tokenising


def render(messages: Conversation, template: ChatTemplateConfig) -> list[tuple[str, bool]]:
    """The conversation as ``(text, trained)`` pieces (their concatenation is the rendered text)."""
    if template.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": template.default_system}, *messages]
    pieces: list[tuple[str, bool]] = []
    if template.prefix:
        pieces.append((template.prefix, False))
    for m in messages:
        trained = m["role"] in template.train_roles
        pieces.append((template.turn_start.format(role=m["role"]), False))
        if m["content"]:
            pieces.append((m["content"], trained))
        pieces.append((template.turn_end, trained))
        if template.turn_separator:
            pieces.append((template.turn_separator, False))
    if template.suffix:
        pieces.append((template.suffix, False))
    return pieces


def tokenize(pieces: Sequence[tuple[str, bool]], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n], trained bool [n])``: each piece encoded alone, then concatenated."""
    encoded = tokenizer.encode_batch([text for text, _ in pieces])
    ids = np.asarray([i for e in encoded for i in e], np.int32)
    trained = np.asarray([t for e, (_, t) in zip(encoded, pieces, strict=True) for _ in e], bool)
    return ids, trained


# ----------------------------------------------------------------------------------------------------
# Packing


def pack_conversations(
    docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, *, overlong: str = "truncate"
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Greedy in-order packing of ``(ids, trained)`` conversations into rows of ``seq_len``.

    Returns ``rows`` (each key of ``train.data.packing.ROW_KEYS``: ``[R, seq_len]``) and counts
    (``conversations``, ``truncated``, ``dropped``, ``rows``, ``trained_tokens``). A conversation longer
    than ``seq_len`` is cut to its first ``seq_len`` tokens (``truncate``) or skipped (``drop``).
    """
    rows: list[dict[str, np.ndarray]] = []
    stats = {"conversations": 0, "truncated": 0, "dropped": 0, "rows": 0, "trained_tokens": 0}
    row, fill, seg = None, seq_len, 0
    for ids, trained in docs:
        n = len(ids)
        if n == 0:
            continue
        if n > seq_len:
            if overlong == "drop":
                stats["dropped"] += 1
                continue
            ids, trained, n = ids[:seq_len], trained[:seq_len], seq_len
            stats["truncated"] += 1
        if fill + n > seq_len:
            row = empty_row(seq_len, pad_id)
            rows.append(row)
            fill, seg = 0, 0
        seg += 1
        sl = slice(fill, fill + n)
        row["tokens"][sl] = ids
        row["targets"][fill : fill + n - 1] = ids[1:]
        row["segment_ids"][sl] = seg
        row["positions"][sl] = np.arange(n, dtype=np.int32)
        row["loss_mask"][fill : fill + n - 1] = trained[1:].astype(np.float32)
        stats["trained_tokens"] += int(trained[1:].sum())
        stats["conversations"] += 1
        fill += n
    stats["rows"] = len(rows)
    if not rows:
        return {
            k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS
        }, stats
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}, stats


class Rows:
    """Random-access rows (a grain data source): ``rows[i]`` is a dict of ``[seq_len]`` arrays; indices at
    or past the packed count (``pad_to`` rounding) are empty rows."""

    def __init__(self, packed: dict[str, np.ndarray], seq_len: int, pad_id: int, *, pad_to_multiple: int = 1):
        self.packed = packed
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.num_rows = len(packed["tokens"])
        self._len = -(-self.num_rows // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} is out of range for {self._len} rows")
        if i >= self.num_rows:
            return empty_row(self.seq_len, self.pad_id)
        return {k: v[i] for k, v in self.packed.items()}


def split_eval(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean ``[n]``: True for the held-out conversations (a fixed pseudo-random ``fraction``; at
    least one when ``fraction > 0`` and ``n >= 2``)."""
    held = np.zeros((n,), bool)
    if fraction <= 0 or n < 2:
        return held
    k = min(n - 1, max(1, round(fraction * n)))
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    return held


def build_rows(
    conversations: Sequence[Conversation], cfg: ChatDataConfig, tokenizer: Any, seq_len: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """``(train_rows, eval_rows, stats)`` for the conversations under ``cfg``."""
    held = split_eval(len(conversations), cfg.eval_fraction)
    docs = [tokenize(render(c, cfg.template), tokenizer) for c in conversations]
    vocab = int(tokenizer.vocab_size)
    for ids, _ in docs:
        if len(ids) and int(ids.max()) >= vocab:
            raise ChatDataError(f"token id {int(ids.max())} >= the tokenizer's vocabulary size {vocab}")
    train_docs = [d for d, h in zip(docs, held, strict=True) if not h and d[1].any()]
    eval_docs = [d for d, h in zip(docs, held, strict=True) if h and d[1].any()]
    untrained = sum(1 for d in docs if not d[1].any())
    if untrained:
        log.warning(
            "%d conversation(s) have no %s turn and are left out",
            untrained,
            "/".join(cfg.template.train_roles),
        )
    pad = int(tokenizer.pad_id)
    train, s_train = pack_conversations(train_docs, seq_len, pad, overlong=cfg.overlong)
    ev, s_eval = pack_conversations(eval_docs, seq_len, pad, overlong=cfg.overlong)
    if s_train["rows"] == 0:
        raise ChatDataError(
            "no training conversation left (empty files, all held out, or all dropped as longer than seq_len)"
        )
    return train, ev, {"train": s_train, "eval": s_eval}


# ----------------------------------------------------------------------------------------------------
# The embedded sample set


_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket")
_COLORS = {
    "apple": "red",
    "river": "blue",
    "stone": "grey",
    "cloud": "white",
    "tiger": "orange",
    "lemon": "yellow",
}


def sample_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """``n`` synthetic conversations with learnable answers (arithmetic, reversing/upper-casing/counting
    letters, colours of things), some multi-turn, some with a system message. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[Conversation] = []

    def one() -> tuple[str, str]:
        kind = int(rng.integers(5))
        w = str(rng.choice(_WORDS))
        if kind == 0:
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        if kind == 1:
            return f"Reverse the word {w}.", w[::-1]
        if kind == 2:
            return f"Write {w} in capital letters.", w.upper()
        if kind == 3:
            return f"How many letters are in {w}?", f"{w} has {len(w)} letters."
        thing = str(rng.choice(list(_COLORS)))
        return f"What colour is a {thing}?", f"A {thing} is usually {_COLORS[thing]}."

    for i in range(n):
        msgs: Conversation = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are a concise assistant."})
        for _ in range(1 + int(rng.integers(2))):
            q, a = one()
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def write_jsonl(path: str | os.PathLike, conversations: Iterable[Conversation]) -> str:
    """Write conversations as a jsonl file (``{"messages": [...]}`` per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------------
# grain pipelines and the Trainer hook


def load_conversations(cfg: ChatDataConfig) -> list[Conversation]:
    if cfg.sample:
        return sample_conversations(cfg.sample)
    return read_jsonl(expand_files(cfg.files), cfg.messages_field)


def train_iterator(
    rows: Rows, *, local_batch: int, seed: int, shuffle: bool = True, num_threads: int = 2, prefetch: int = 4
):
    """Shuffled (per epoch), repeated, per-host batches of ``rows`` (a ``grain.DatasetIterator``)."""
    import grain
    import jax

    from train.data.pipeline import read_options

    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed)
    pi, pc = jax.process_index(), jax.process_count()
    ds = ds.repeat(None)[pi::pc].batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(read_options(num_threads, prefetch)))


def eval_batches(rows: Rows, *, local_batch: int, max_batches: int, num_threads: int = 2, prefetch: int = 4):
    """Unshuffled eval batches (rows padded with empty ones to whole global batches), re-iterable."""
    import grain
    import jax

    from train.data.pipeline import read_options

    pi, pc = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(rows)[pi::pc].batch(local_batch, drop_remainder=True)[: max(0, max_batches)]
    return ds.to_iter_dataset(read_options(num_threads, prefetch))


def data_factory(trainer: Any) -> tuple[Any, Any]:
    """``Trainer`` data hook for ``data.chat`` configs: ``(train_iterator, eval_batches or None)``."""
    import jax

    from train.config import ConfigError
    from train.data.tokenizer import load_tokenizer

    cfg = trainer.cfg
    d = cfg.data
    tok = load_tokenizer(d.tokenizer)
    vocab = int(getattr(trainer.model_cfg, "vocab_size", tok.vocab_size))
    if tok.vocab_size > vocab:
        raise ConfigError(
            f"config field `data.tokenizer`: the tokenizer has {tok.vocab_size} ids but the model only {vocab}"
        )
    try:
        convs = load_conversations(d.chat)
        train, ev, stats = build_rows(convs, d.chat, tok, cfg.seq_len)
    except (ChatDataError, OSError) as e:
        raise ConfigError(f"config field `data.chat`: {e}") from e
    trainer.tokenizer = tok
    s = stats["train"]
    trainer.echo(
        f"chat data: {s['conversations']} conversations in {s['rows']} rows of {cfg.seq_len} tokens "
        f"({s['trained_tokens']:,} trained tokens; {s['truncated']} truncated, {s['dropped']} dropped); "
        f"{stats['eval']['conversations']} held out"
    )
    seed = cfg.seed if d.seed is None else d.seed
    it = train_iterator(
        Rows(train, cfg.seq_len, tok.pad_id),
        local_batch=trainer.local_batch,
        seed=seed,
        shuffle=d.shuffle,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
    )
    eval_ds = None
    if stats["eval"]["rows"]:
        eval_local = trainer.local_batch // cfg.grad_accum_steps
        rows = Rows(ev, cfg.seq_len, tok.pad_id, pad_to_multiple=eval_local * jax.process_count())
        eval_ds = eval_batches(
            rows,
            local_batch=eval_local,
            max_batches=cfg.eval.batches,
            num_threads=d.num_threads,
            prefetch=d.prefetch,
        )
    return it, eval_ds

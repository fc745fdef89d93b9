"""Token store: tokenised documents in zarr3 arrays (tensorstore), readable from local disk or a bucket.

Layout of a store at ``PATH`` (a local directory or a tensorstore kvstore URL such as ``gs://b/dir``)::

    PATH/manifest.json          # the commit point: written last, atomically (one key write)
    PATH/tokenizer.json         # copy of the tokenizer file (Hugging Face tokenizers only)
    PATH/<split>/tokens/        # zarr3 uint16 (vocab <= 65536) or uint32 [n_tokens], zstd-compressed chunks
    PATH/<split>/offsets/       # zarr3 int64 [n_docs + 1]; document i = tokens[offsets[i]:offsets[i+1]]

Splits are ``train`` and ``eval`` (the held-out split; may be empty). Every stored document ends with
the tokenizer's EOS id (appended by ``prepare``) and is never empty.

The manifest records the tokenizer, vocab size, EOS/PAD ids, dtype, per-split counts, content
hashes and largest token ids (``max_id``, checked against a model's vocabulary when a split is
opened for training or evaluation), and the progress of ``prepare`` (``complete``, ``inputs_done``).
Arrays are only trusted up to the counts of the last manifest written: a crash between an array write and the manifest write
leaves extra data that the next ``prepare`` run truncates, and a store whose manifest does not say
``"complete": true`` refuses to open for reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT = "wuneng-token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "eval")
DEFAULT_CHUNK_TOKENS = 1 << 16
OFFSETS_CHUNK = 1 << 16
_HASH_BLOCK = 1 << 24  # tokens read per step when hashing a split

_CONTEXT: ts.Context | None = None
_CONTEXT_LOCK = threading.Lock()


class StoreError(ValueError):
    """A token store is missing, incomplete, corrupt or does not match what was asked for."""


def context() -> ts.Context:
    """The process-wide tensorstore context (chunk cache; shared so ``memory://`` stores persist)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 128 << 20}})
        return _CONTEXT


def kvstore_spec(path: str | os.PathLike) -> ts.KvStore.Spec:
    """Directory-like kvstore spec for a local path or a tensorstore URL (``gs://``, ``s3://``, ``file://``, ``memory://``)."""
    path = os.fspath(path)
    if "://" in path:
        return ts.KvStore.Spec(path if path.endswith("/") else path + "/")
    return ts.KvStore.Spec({"driver": "file", "path": os.path.abspath(path) + "/"})


def _kvstore(path: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(path), context=context()).result()


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ----------------------------------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The store's manifest, or None when ``PATH/manifest.json`` does not exist."""
    path = os.fspath(path)
    r = _kvstore(path).read(MANIFEST).result()
    if r.state != "value":
        return None
    try:
        manifest = json.loads(r.value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(
            f"token store {path!r}: {MANIFEST} is not valid JSON ({e}); re-run prepare-data"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"token store {path!r}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(
            f"token store {path!r} has format version {manifest.get('version')}, this code reads {VERSION}"
        )
    return manifest


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Writes the manifest as one key (atomic on local disk and object stores)."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    _kvstore(os.fspath(path)).write(MANIFEST, data).result()


def new_manifest(
    *, tokenizer: dict, vocab_size: int, eos_id: int, pad_id: int, chunk_tokens: int, **extra: Any
) -> dict:
    """A fresh, incomplete manifest with empty splits."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "pad_id": int(pad_id),
        "dtype": token_dtype(vocab_size),
        "chunk_tokens": int(chunk_tokens),
        "splits": {s: {"n_docs": 0, "n_tokens": 0} for s in SPLITS},
        **extra,
    }


# -------------------------------------------------------------------------------------------------- arrays


def _array_spec(path: str, key: str) -> dict:
    return {"driver": "zarr3", "kvstore": (kvstore_spec(path) / (key + "/")).to_json()}


def _create_array(path: str, key: str, dtype: str, chunk: int, shape: int) -> ts.TensorStore:
    spec = _array_spec(path, key)
    spec["metadata"] = {
        "shape": [shape],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
        "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 3}},
        ],
    }
    spec["create"] = True
    spec["delete_existing"] = True
    return ts.open(spec, context=context()).result()


def _open_array(path: str, key: str) -> ts.TensorStore:
    try:
        return ts.open({**_array_spec(path, key), "open": True}, context=context()).result()
    except ValueError as e:
        raise StoreError(f"token store {path!r}: array {key!r} is missing or unreadable ({e})") from e


def _scan_split(
    tokens: ts.TensorStore, offsets: ts.TensorStore, n_tokens: int, n_docs: int
) -> tuple[str, int]:
    """``(hash, max_id)``: sha256 over the split's tokens (little-endian, stored dtype) followed by its
    offsets (int64 LE), and the largest token id (-1 for an empty split)."""
    h = hashlib.sha256()
    max_id = -1
    for a in range(0, n_tokens, _HASH_BLOCK):
        block = tokens[a : min(a + _HASH_BLOCK, n_tokens)].read().result()
        h.update(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes())
        max_id = max(max_id, int(block.max()))
    h.update(np.ascontiguousarray(offsets[: n_docs + 1].read().result(), dtype="<i8").tobytes())
    return h.hexdigest(), max_id


def _combined_hash(split_hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(split_hashes, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- reader


class TokenStore:
    """Random access to one split of a complete token store.

    ``len(store)`` = number of documents; ``store.document(i)`` = document i's ids (ending with EOS);
    ``store.read(start, stop)`` = the split's token stream ``[start, stop)``; ``store.offsets`` =
    int64 ``[n_docs + 1]`` document boundaries (held in memory). Works for any tensorstore kvstore
    path (local directory, ``gs://...``). Picklable (re-opens by path), so grain worker processes
    can use it.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = os.fspath(path)
        self.split = split
        self._open()

    def _open(self) -> None:
        path, split = self.path, self.split
        m = read_manifest(path)
        if m is None:
            raise StoreError(
                f"no token store at {path!r} ({MANIFEST} is missing): create it with "
                f"`wuneng prepare-data INPUT... --out {path}`"
            )
        if not m.get("complete"):
            raise StoreError(
                f"token store {path!r} is incomplete (prepare-data stopped after {m.get('inputs_done', 0)} of "
                f"{len(m.get('inputs', []))} inputs): re-run prepare-data with the same arguments to resume it"
            )
        for field in ("splits", "dtype", "vocab_size", "eos_id", "pad_id", "tokenizer"):
            if field not in m:
                raise StoreError(
                    f"token store {path!r}: manifest field {field!r} is missing; re-run prepare-data"
                )
        if split not in m["splits"]:
            raise ValueError(f"token store {path!r} has no split {split!r}; it has {sorted(m['splits'])}")
        info = m["splits"][split]
        n_tokens, n_docs = int(info["n_tokens"]), int(info["n_docs"])
        tokens = _open_array(path, f"{split}/tokens")
        offsets_arr = _open_array(path, f"{split}/offsets")
        if str(tokens.dtype.numpy_dtype) != m["dtype"]:
            raise StoreError(
                f"token store {path!r}: {split}/tokens has dtype {tokens.dtype.numpy_dtype}, manifest says {m['dtype']}"
            )
        if tuple(tokens.shape) != (n_tokens,):
            raise StoreError(
                f"token store {path!r}: {split}/tokens has shape {tuple(tokens.shape)}, manifest says "
                f"({n_tokens},): the store is corrupt; re-create it with prepare-data --overwrite"
            )
        if tuple(offsets_arr.shape) != (n_docs + 1,):
            raise StoreError(
                f"token store {path!r}: {split}/offsets has shape {tuple(offsets_arr.shape)}, manifest says "
                f"({n_docs + 1},): the store is corrupt; re-create it with prepare-data --overwrite"
            )
        offsets = np.asarray(offsets_arr.read().result(), dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != n_tokens or (n_docs and np.any(np.diff(offsets) <= 0)):
            raise StoreError(
                f"token store {path!r}: {split}/offsets are inconsistent (must start at 0, increase strictly "
                f"and end at n_tokens={n_tokens}): the store is corrupt; re-create it with prepare-data --overwrite"
            )
        self.manifest = m
        self.offsets = offsets
        self._tokens = tokens
        self._offsets_arr = offsets_arr

    def __getstate__(self) -> dict:
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.path, self.split = state["path"], state["split"]
        self._open()

    def __repr__(self) -> str:
        return f"TokenStore({self.path!r}, split={self.split!r}, docs={len(self)}, tokens={self.num_tokens})"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["pad_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest.get("content_hash", ""))

    @property
    def max_token_id(self) -> int:
        """The split's largest token id (-1 when empty): recorded by ``prepare``, else read once."""
        info = self.manifest["splits"][self.split]
        if "max_id" not in info:  # a store written before the manifest recorded it
            info["max_id"] = _scan_split(self._tokens, self._offsets_arr, self.num_tokens, len(self))[1]
        return int(info["max_id"])

    def check_ids(self, vocab_size: int, field: str = "model.vocab_size") -> None:
        """Refuse a split whose token ids do not fit the store's tokenizer or a model's ``vocab_size``."""
        limit = min(vocab_size, self.vocab_size)
        if self.max_token_id >= limit:
            owner = (
                f"{field} is {vocab_size}" if limit == vocab_size else f"its manifest says vocab_size {limit}"
            )
            raise StoreError(
                f"token store {self.path!r}, split {self.split!r}: holds token id {self.max_token_id} but {owner}; "
                f"ids must be < vocab_size: re-create the store with the model's tokenizer (prepare-data "
                f"--overwrite) or use a model with vocab_size > {self.max_token_id}"
            )

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of this split's stream (stored dtype)."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"read({start}, {stop}) is outside [0, {self.num_tokens}]")
        if start == stop:
            return np.zeros((0,), self.dtype)
        return self._tokens[start:stop].read().result()

    def document(self, i: int) -> np.ndarray:
        """Document i's token ids (the last one is EOS)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} is out of range for {n} documents")
        i %= n
        return self.read(self.offsets[i], self.offsets[i + 1])

    def tokenizer(self):
        """The tokenizer the store was made with (from the copy kept in the store for tokenizer.json files)."""
        from train.data.tokenizer import ByteTokenizer, HFTokenizer

        desc = self.manifest["tokenizer"]
        if desc["kind"] == "byte":
            return ByteTokenizer()
        r = _kvstore(self.path).read(TOKENIZER_FILE).result()
        if r.state != "value":
            raise StoreError(f"token store {self.path!r}: {TOKENIZER_FILE} is missing")
        return HFTokenizer.from_json_bytes(
            r.value,
            name=f"{self.path}/{TOKENIZER_FILE}",
            eos_token=desc["eos_token"],
            pad_token=desc["pad_token"],
        )

    def verify(self) -> None:
        """Re-hashes the split's arrays and compares with the manifest (reads the whole split)."""
        info = self.manifest["splits"][self.split]
        want = info.get("hash")
        got, _ = _scan_split(self._tokens, self._offsets_arr, self.num_tokens, len(self))
        if want != got:
            raise StoreError(
                f"token store {self.path!r}: split {self.split!r} content hash {got[:16]}... does not match the "
                f"manifest's {str(want)[:16]}...: the data is corrupt; re-create it with prepare-data --overwrite"
            )


# -------------------------------------------------------------------------------------------------- writer


class StoreWriter:
    """Appends documents to the splits of an incomplete store; nothing is durable before ``commit``.

    On construction the arrays are created (empty store) or truncated to the manifest's counts
    (resume), so data written after the last commit of a crashed run is discarded.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict, *, flush_tokens: int = 1 << 24):
        self.path = os.fspath(path)
        self.manifest = manifest
        self.flush_tokens = flush_tokens
        dtype, chunk = manifest["dtype"], int(manifest["chunk_tokens"])
        self._np_dtype = np.dtype(dtype)
        self._tokens: dict[str, ts.TensorStore] = {}
        self._offsets: dict[str, ts.TensorStore] = {}
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in manifest["splits"]}
        self._pending_tokens = 0
        self.counts = {s: dict(v) for s, v in manifest["splits"].items()}
        for split, c in self.counts.items():
            n_tokens, n_docs = int(c["n_tokens"]), int(c["n_docs"])
            if n_tokens == 0 and n_docs == 0:
                self._tokens[split] = _create_array(self.path, f"{split}/tokens", dtype, chunk, 0)
                off = _create_array(self.path, f"{split}/offsets", "int64", OFFSETS_CHUNK, 1)
                off[0:1].write(np.zeros((1,), np.int64)).result()
                self._offsets[split] = off
                continue
            tok = _open_array(self.path, f"{split}/tokens")
            off = _open_array(self.path, f"{split}/offsets")
            if tok.shape[0] < n_tokens or off.shape[0] < n_docs + 1:
                raise StoreError(
                    f"token store {self.path!r}: split {split!r} arrays are shorter than the manifest's counts "
                    "(the store is corrupt): pass overwrite=True (CLI: --overwrite) to start again"
                )
            last = int(off[n_docs].read().result())
            if last != n_tokens:
                raise StoreError(
                    f"token store {self.path!r}: split {split!r} offsets end at {last}, manifest says {n_tokens} "
                    "(the store is corrupt): pass overwrite=True (CLI: --overwrite) to start again"
                )
            self._tokens[split] = tok.resize(exclusive_max=[n_tokens]).result()
            self._offsets[split] = off.resize(exclusive_max=[n_docs + 1]).result()

    def append(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Queues documents for ``split``: ``tokens`` is their concatenation, ``lengths`` their sizes (> 0)."""
        lengths = np.asarray(lengths, np.int64)
        if len(lengths) == 0:
            return
        if int(lengths.sum()) != len(tokens) or np.any(lengths <= 0):
            raise ValueError("append: lengths must be positive and sum to len(tokens)")
        self._pending[split].append((np.asarray(tokens, self._np_dtype), lengths))
        self._pending_tokens += len(tokens)
        if self._pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        """Writes queued documents to the arrays (not yet durable: the manifest still has the old counts)."""
        for split, parts in self._pending.items():
            if not parts:
                continue
            toks = np.concatenate([p[0] for p in parts])
            lens = np.concatenate([p[1] for p in parts])
            c = self.counts[split]
            n0, d0 = int(c["n_tokens"]), int(c["n_docs"])
            n1, d1 = n0 + len(toks), d0 + len(lens)
            tok = self._tokens[split].resize(exclusive_max=[n1]).result()
            tok[n0:n1].write(toks).result()
            off = self._offsets[split].resize(exclusive_max=[d1 + 1]).result()
            off[d0 + 1 : d1 + 1].write(n0 + np.cumsum(lens)).result()
            self._tokens[split], self._offsets[split] = tok, off
            c["n_tokens"], c["n_docs"] = n1, d1
            parts.clear()
        self._pending_tokens = 0

    def commit(self, **fields: Any) -> dict:
        """Flushes, then writes the manifest with the new counts and ``fields``: the durable checkpoint."""
        self.flush()
        self.manifest.update(fields)
        self.manifest["splits"] = {s: dict(c) for s, c in self.counts.items()}
        write_manifest(self.path, self.manifest)
        return self.manifest

    def finalize(self, **fields: Any) -> dict:
        """Flushes, hashes every split and writes the manifest with ``complete: true``."""
        self.flush()
        hashes = {}
        for split, c in self.counts.items():
            c["hash"], c["max_id"] = _scan_split(
                self._tokens[split], self._offsets[split], int(c["n_tokens"]), int(c["n_docs"])
            )
            hashes[split] = c["hash"]
        return self.commit(complete=True, content_hash=_combined_hash(hashes), **fields)


def delete_store(path: str | os.PathLike) -> None:
    """Deletes every key under ``path`` (the whole store)."""
    _kvstore(os.fspath(path)).delete_range(ts.KvStore.KeyRange()).result()


def store_is_empty(path: str | os.PathLike) -> bool:
    """True when nothing exists under ``path``."""
    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        return True
    return len(_kvstore(path).list().result()) == 0


def write_tokenizer_file(path: str | os.PathLike, data: bytes) -> None:
    _kvstore(os.fspath(path)).write(TOKENIZER_FILE, data).result()

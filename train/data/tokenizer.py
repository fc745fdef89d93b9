"""Tokenizers with one small interface: a byte-level tokenizer and a Hugging Face ``tokenizers`` wrapper.

Interface (``Tokenizer`` protocol)::

    tok.encode(text) -> list[int]          # no special tokens added
    tok.encode_batch(texts) -> list[list[int]]
    tok.decode(ids) -> str                 # special ids (EOS, PAD) are dropped
    tok.eos_id, tok.pad_id, tok.vocab_size
    tok.describe() -> dict                 # JSON description stored in a token store's manifest

``vocab_size`` is the tokenizer's own size (258 for bytes); rounding it up for a model's embedding
table (e.g. to a multiple of 64) is the model config's business.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 258

# Searched in this order when a tokenizer.json is given without an explicit EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def describe(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 = EOS (document separator), 257 = PAD."""

    eos_id = BYTE_EOS_ID
    pad_id = BYTE_PAD_ID
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i not in (BYTE_EOS_ID, BYTE_PAD_ID):
                raise ValueError(
                    f"ByteTokenizer.decode: id {i} is outside the vocabulary [0, {BYTE_VOCAB_SIZE})"
                )
        return out.decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Args:
      path: the ``tokenizer.json`` file, or a directory holding one.
      eos_token: the document separator token (e.g. ``"<|endoftext|>"``); found among
        ``EOS_CANDIDATES`` when None.
      pad_token: the padding token; EOS is used when None (padding is always masked out of the loss).
    """

    def __init__(
        self, path: str | os.PathLike, *, eos_token: str | None = None, pad_token: str | None = None
    ):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"tokenizer file {path!r} does not exist: pass 'byte' or the path of a tokenizer.json file"
            )
        with open(path, "rb") as f:
            self._setup(f.read(), path, eos_token, pad_token)

    @classmethod
    def from_json_bytes(
        cls, data: bytes, *, name: str, eos_token: str | None = None, pad_token: str | None = None
    ) -> HFTokenizer:
        """From the contents of a tokenizer.json file (``name`` is used in messages)."""
        self = cls.__new__(cls)
        self._setup(bytes(data), name, eos_token, pad_token)
        return self

    def _setup(self, data: bytes, path: str, eos_token: str | None, pad_token: str | None) -> None:
        from tokenizers import Tokenizer as _HFTok

        self.path = path
        self._json_bytes = data
        try:
            self._tok = _HFTok.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a plain Exception
            raise ValueError(f"tokenizer file {path!r} is not a valid tokenizers JSON file: {e}") from e
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.eos_token = eos_token if eos_token is not None else self._find_eos()
        self._eos_id = self._token_id(self.eos_token, "eos_token")
        self.pad_token = pad_token if pad_token is not None else self.eos_token
        self._pad_id = self._token_id(self.pad_token, "pad_token")
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._special_ids = {
            int(i) for i, t in self._tok.get_added_tokens_decoder().items() if getattr(t, "special", False)
        } | {self._eos_id, self._pad_id}

    def _find_eos(self) -> str:
        for cand in EOS_CANDIDATES:
            if self._tok.token_to_id(cand) is not None:
                return cand
        raise ValueError(
            f"tokenizer {self.path!r} has none of the usual EOS tokens {EOS_CANDIDATES}: "
            "pass eos_token= (CLI: --eos-token) naming its document separator token"
        )

    def _token_id(self, token: str, field: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{field}={token!r} is not in the vocabulary of tokenizer {self.path!r}")
        return int(tid)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def json_bytes(self) -> bytes:
        """The tokenizer.json contents (copied into token stores so they are self-contained)."""
        return self._json_bytes

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(
            [int(i) for i in ids if int(i) not in self._special_ids], skip_special_tokens=True
        )

    def describe(self) -> dict:
        return {
            "kind": "hf",
            "path": self.path if "://" in self.path else os.path.abspath(self.path),
            "sha256": self.sha256,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, eos_token={self.eos_token!r})"


def load_tokenizer(spec: str | os.PathLike | Tokenizer, *, eos_token: str | None = None) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; a tokenizer.json path (or a directory holding one) -> HFTokenizer."""
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"tokenizer must be 'byte' or a tokenizer.json path, got {spec!r}")
    if os.fspath(spec) in ("byte", "bytes"):
        if eos_token is not None:
            raise ValueError(
                "eos_token applies only to tokenizer.json tokenizers; the byte tokenizer's EOS is 256"
            )
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)


#: Beside a model directory without ``tokenizer.json``: which built-in tokenizer it was trained with.
SPEC_FILE = "wuneng_tokenizer.json"


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    """Keep ``tok`` with a model directory: ``tokenizer.json`` (unless one is there) or :data:`SPEC_FILE`."""
    directory = Path(directory)
    if isinstance(tok, HFTokenizer):
        if not (directory / "tokenizer.json").is_file():
            (directory / "tokenizer.json").write_bytes(tok.json_bytes)
        return
    (directory / SPEC_FILE).write_text(json.dumps({"kind": tok.describe()["kind"]}) + "\n")


def tokenizer_of_dir(directory: str | os.PathLike) -> str | None:
    """The tokenizer spec kept with a model directory (a ``tokenizer.json`` path or ``"byte"``), or None."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return str(directory / "tokenizer.json")
    if (directory / SPEC_FILE).is_file():
        from wuneng_jax.files import read_json

        return str(read_json(directory / SPEC_FILE).get("kind"))
    return None


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split: trailing context spaces move into the continuation, the
    continuation tokens are ``encode(context + continuation)`` past ``encode(context)``; an empty
    context becomes the EOS token (something to condition on)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no token")
    return (ctx or [tokenizer.eos_id]), cont

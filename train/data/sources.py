"""Raw inputs for prepare-data: text files, jsonl files, directories and the embedded stdlib corpus.

An input is expanded into *units* (one file each; the unit of parallel work and of resume):

- ``stdlib``: the embedded corpus (``train.data.corpus``), each ``.py`` file a text unit;
- a directory: every regular file under it (recursively, hidden files and ``__pycache__`` skipped),
  in sorted relative-path order;
- a glob pattern (``*``, ``?``, ``[``): its matches, sorted;
- a file: ``.jsonl`` / ``.jsonl.gz`` is a jsonl unit (one document per non-blank line, the string in
  its ``text`` field), anything else a text unit (the whole file is one document, ``.gz`` decompressed).

Text is read as UTF-8. A file that is not text (NUL bytes: binary) or whose undecodable byte sequences
exceed :data:`INVALID_UTF8_LIMIT` of its bytes is refused, naming the file and the count, unless
``accept_invalid_utf8`` (CLI ``--accept-invalid-utf8``); accepted undecodable sequences become U+FFFD
and are counted (``prepare`` reports the total).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from train.data import corpus


@dataclass(frozen=True)
class InputUnit:
    """One input file: ``kind`` is ``"text"`` (one document) or ``"jsonl"`` (one per line)."""

    kind: str
    path: str
    size: int

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "size": self.size}


def _unit(path: str) -> InputUnit:
    kind = "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "text"
    return InputUnit(kind, os.path.abspath(path), os.path.getsize(path))


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def expand_inputs(
    inputs: Sequence[str | os.PathLike],
    *,
    stdlib_max_files: int | None = corpus.DEFAULT_MAX_FILES,
    stdlib_max_bytes: int | None = corpus.DEFAULT_MAX_BYTES,
) -> list[InputUnit]:
    """Input names -> units, in a deterministic order (see the module docstring)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError(
            "no inputs given: pass text/jsonl files, directories, or 'stdlib' for the embedded corpus"
        )
    units: list[InputUnit] = []
    for item in inputs:
        name = os.fspath(item)
        if name == corpus.STDLIB:
            files = corpus.stdlib_files(stdlib_max_files, stdlib_max_bytes)
            units.extend(InputUnit("text", str(p), p.stat().st_size) for p in files)
        elif os.path.isdir(name):
            files = _walk(name)
            if not files:
                raise ValueError(f"input directory {name!r} contains no files")
            units.extend(_unit(f) for f in files)
        elif any(c in name for c in "*?["):
            files = sorted(f for f in glob.glob(name, recursive=True) if os.path.isfile(f))
            if not files:
                raise ValueError(f"input pattern {name!r} matches no files")
            units.extend(_unit(f) for f in files)
        elif os.path.isfile(name):
            units.append(_unit(name))
        else:
            raise ValueError(
                f"input {name!r} does not exist: pass text/jsonl files, directories, glob patterns, "
                f"or {corpus.STDLIB!r} for the embedded corpus"
            )
    return units


INVALID_UTF8_LIMIT = 0.01  # refuse a file when more than this fraction of its bytes does not decode
_REPLACEMENT = "\ufffd"


class Utf8Check:
    """Decodes one file's bytes as UTF-8 (U+FFFD for undecodable sequences) and counts the replacements;
    :meth:`finish` refuses a binary or mostly undecodable file unless ``accept``."""

    def __init__(self, path: str, accept: bool):
        self.path = path
        self.accept = accept
        self.replaced = 0
        self.size = 0
        self.binary = False

    def decode(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        self.replaced += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
        self.size += len(raw)
        self.binary = self.binary or b"\x00" in raw
        return text

    def finish(self) -> int:
        """The number of replaced sequences (raises when the file is refused)."""
        if self.accept or not (self.binary or self.replaced > INVALID_UTF8_LIMIT * self.size):
            return self.replaced
        what = (
            "it holds NUL bytes (a binary file?)"
            if self.binary
            else f"{self.replaced} byte sequences of its {self.size} bytes are not valid UTF-8"
        )
        raise ValueError(
            f"{self.path}: not UTF-8 text: {what}; remove it from the inputs or convert it to UTF-8, or pass "
            "--accept-invalid-utf8 to keep it with U+FFFD in place of the undecodable bytes"
        )


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_documents(
    unit: InputUnit, *, text_field: str = "text", check: Utf8Check | None = None
) -> Iterator[str]:
    """The documents of one unit, in file order. ``check`` (default: refuse invalid UTF-8) decodes and
    counts; it is finished (and may raise) after the last document."""
    check = check or Utf8Check(unit.path, accept=False)
    yield from _documents(unit, text_field, check)
    check.finish()


def _documents(unit: InputUnit, text_field: str, check: Utf8Check) -> Iterator[str]:
    if unit.kind == "text":
        with _open_bytes(unit.path) as f:  # newlines as text mode reads them: \r\n and \r become \n
            yield check.decode(f.read()).replace("\r\n", "\n").replace("\r", "\n")
        return
    if unit.kind != "jsonl":
        raise ValueError(f"unknown input kind {unit.kind!r} for {unit.path!r}")
    with _open_bytes(unit.path) as f:
        for lineno, raw in enumerate(f, 1):
            line = check.decode(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{unit.path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(obj, dict) or text_field not in obj:
                raise ValueError(
                    f"{unit.path}:{lineno}: no {text_field!r} field; pass text_field= (CLI: --text-field) "
                    "naming the field that holds the document text"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{unit.path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            yield text

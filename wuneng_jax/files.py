"""Reading YAML and JSON files with errors that name the file, the line and the problem.

A malformed file raises :class:`FileFormatError` (a ``ValueError``) such as
``configs/x.yaml:3:6: malformed YAML (expected ',' or ']', but got ':'); fix the file there`` instead of a
parser traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class FileFormatError(ValueError):
    """A file exists but is not valid YAML / JSON text."""


def _text(path: Path, kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not a {kind} text file (byte {e.start} is not UTF-8)") from None


def read_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML file (None when empty)."""
    path = Path(path)
    try:
        return yaml.safe_load(_text(path, "YAML"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileFormatError(f"{where}: malformed YAML ({problem}); fix the file at that line") from None


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file."""
    path = Path(path)
    try:
        return json.loads(_text(path, "JSON"))
    except json.JSONDecodeError as e:
        raise FileFormatError(
            f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file or copy it again from its source"
        ) from None

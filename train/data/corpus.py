"""The embedded default corpus: the Python standard library's own ``.py`` files (no download needed).

Found through ``sysconfig.get_paths()["stdlib"]``; third-party packages (``site-packages``) and the
stdlib's test suites are left out. Files are picked in a fixed pseudo-random order (the sha256 of
their relative POSIX path, so the sample spreads over the whole library instead of its first
packages alphabetically) until a file count or byte budget is reached, and returned sorted by
relative path: deterministic for a given Python installation. Each file is one document; the demo
tokenises it byte-level.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

STDLIB = "stdlib"  # the input name that selects this corpus in prepare-data
DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_BYTES = 4 << 20
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__"}
)


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    path = Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise ValueError(
            f"the Python standard library directory {path} does not exist; pass input files instead"
        )
    return path


def stdlib_files(
    max_files: int | None = DEFAULT_MAX_FILES, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> list[Path]:
    """Standard-library ``.py`` files, sorted by relative path.

    Candidates are visited in order of ``sha256(relative path)``; a file is taken when it keeps the
    total within ``max_bytes`` (None = no limit), until ``max_files`` files are taken (None = no
    limit). Empty files are skipped.
    """
    if max_files is not None and max_files <= 0:
        raise ValueError(f"max_files must be positive or None, got {max_files}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    root = stdlib_dir()
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                size = p.stat().st_size
                if size > 0:
                    rel = p.relative_to(root).as_posix()
                    found.append((hashlib.sha256(rel.encode()).hexdigest(), rel, p, size))
    found.sort()
    picked: list[tuple[str, Path]] = []
    total = 0
    for _, rel, p, size in found:
        if max_files is not None and len(picked) >= max_files:
            break
        if max_bytes is not None and total + size > max_bytes:
            continue
        picked.append((rel, p))
        total += size
    out = [p for _, p in sorted(picked)]
    if not out:
        raise ValueError(f"no standard-library .py files found under {root} within max_bytes={max_bytes}")
    return out

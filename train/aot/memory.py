"""Per-chip memory of a compiled program: XLA's memory analysis, the compiler's out-of-memory verdict and
the largest buffers (from the buffer assignment the compiler dumps).

All sizes are bytes on one chip (the SPMD-partitioned program runs the same on every chip). The total is
``arguments + outputs - aliased + temporaries + generated code`` (donated state buffers are reused for the
outputs: that is the alias); the TPU compiler itself refuses a program whose total exceeds the HBM it
can use (a little less than the chip's HBM: v5e 15.75 GiB of 16, v6e 31.25 GiB of 32).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer on a chip: ``kind`` argument / output / temporary, a readable ``name``, its per-chip shape."""

    kind: str
    name: str
    shape: str
    nbytes: int


@dataclasses.dataclass(frozen=True)
class MemoryUsage:
    """XLA's ``memory_analysis()`` of a compiled program, per chip, in bytes."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled: Any) -> MemoryUsage:
        m = compiled.memory_analysis()
        return cls(
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
            temporaries=int(m.temp_size_in_bytes),
            code=int(m.generated_code_size_in_bytes),
        )

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


_OOM_PATTERNS = (
    # "Ran out of memory on HBM, the total memory required for HLO temporaries (26.84G) exceeds available
    # HBM (15.75G)."
    re.compile(r"required for .*?\(([\d.]+)([KMGT]?)\).*?available HBM \(([\d.]+)([KMGT]?)\)", re.S),
    # "Used 20.1G of 15.75G hbm. Exceeded hbm capacity by 4.4G."
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.S),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def is_out_of_memory(error: BaseException | str) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def parse_out_of_memory(error: BaseException | str) -> tuple[int | None, int | None]:
    """``(required, available)`` bytes from the TPU compiler's out-of-memory message (None when absent)."""
    text = str(error)
    for pattern in _OOM_PATTERNS:
        m = pattern.search(text)
        if m:
            need = float(m.group(1)) * _UNITS[m.group(2)]
            have = float(m.group(3)) * _UNITS[m.group(4)]
            return int(need), int(have)
    return None, None


# --------------------------------------------------------------------------------------------
# Buffer assignment (``--xla_dump_to``): the largest temporaries, named by their JAX source op

_ALLOC = re.compile(r"^allocation \d+: size (\d+)(.*):\s*$")
_VALUE = re.compile(r"^ value: <\d+ ([^ >]+)[^>]*> \(size=(\d+),offset=\d+\): (\S+)")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"')


def _short_op(op_name: str) -> str:
    """``jit(step)/jvp(Qwen2)/.../dot_general`` -> the last few path components."""
    parts = [p for p in op_name.split("/") if p]
    return "/".join(parts[-3:])


def dumped_files(dump_dir: str, suffix: str) -> list[str]:
    return sorted(glob.glob(os.path.join(dump_dir, f"*{suffix}")))


def largest_temporaries(dump_dir: str, limit: int = 5) -> list[Buffer]:
    """The largest HBM temporaries of the (last) program the compiler dumped into ``dump_dir``."""
    assignments = dumped_files(dump_dir, "after_optimizations-buffer-assignment.txt")
    if not assignments:
        return []
    path = assignments[-1]
    values: dict[str, tuple[int, str]] = {}
    in_temp = False
    with open(path, errors="replace") as f:
        for line in f:
            m = _ALLOC.match(line)
            if m:
                attrs = m.group(2)
                in_temp = "preallocated-temp" in attrs and "color" not in attrs  # color 0 = HBM
                continue
            v = _VALUE.match(line) if in_temp and "): (" not in line else None  # tuples alias their parts
            if v is None:
                in_temp = in_temp and line.startswith(" ")  # a non-indented line ends the allocation
                continue
            name, size, shape = re.sub(r"\{.*\}$", "", v.group(1)), int(v.group(2)), v.group(3)
            if size > values.get(name, (0, ""))[0]:
                values[name] = (size, re.sub(r"\{[^}]*\}", "", shape))
    # rematerialised copies (``fusion.12.remat3``) are one value recomputed: count them with their original
    groups: dict[str, list[tuple[int, str]]] = {}
    for name, (size, shape) in values.items():
        groups.setdefault(re.sub(r"\.remat\d*$", "", name), []).append((size, shape))
    top = sorted(groups.items(), key=lambda kv: -max(kv[1])[0])[:limit]
    ops = _op_names(path.replace("-buffer-assignment.txt", ".txt"), {name for name, _ in top})
    out = []
    for name, copies in top:
        size, shape = max(copies)
        label = f"{name} ({_short_op(ops[name])})" if name in ops else name
        if len(copies) > 1:
            label += f" [{len(copies)} copies: rematerialised]"
        out.append(Buffer("temporary", label, shape, size))
    return out


def _op_names(hlo_path: str, wanted: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if not wanted or not os.path.exists(hlo_path):
        return out
    with open(hlo_path, errors="replace") as f:
        for line in f:
            if "op_name=" not in line:
                continue
            m = _OP_NAME.match(line)
            if m and m.group(1) in wanted:
                out[m.group(1)] = m.group(2)
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


__all__ = [
    "Buffer",
    "MemoryUsage",
    "fmt_bytes",
    "is_out_of_memory",
    "largest_temporaries",
    "parse_out_of_memory",
]

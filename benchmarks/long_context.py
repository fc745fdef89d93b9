"""Long context on a TPU slice, from the TPU compiler: per-chip memory of the train step against the context
length, with the sequence whole on each chip (``sequence=1``) and split over chips (``sequence>1``).

    python3 benchmarks/long_context.py                       # WuNeng-1.5B on v5p:2x2x1, 8K..(until it stops fitting)
    python3 benchmarks/long_context.py --presets qwen2.5-1.5b --sequence 1 4
    python3 benchmarks/long_context.py --markdown            # the table from the cache only
    python3 benchmarks/long_context.py --plot                # benchmarks/results/long_context_memory.png

Every point is one ``wuneng compile`` of the full-depth train step (``build_train`` + ``compile_train``, the
layers scanned) for the slice's compile-only devices, with ``dtype=bfloat16 remat=full mesh.data=1``, the
TPU kernels (Pallas ``wkv7``; splash attention unless ``--seq-attention`` says otherwise for ``sequence>1``)
and this layout on ``C`` chips (v5p:2x2x1: ``C = 4``):

* ``sequence=1``: ``mesh.fsdp=C``, ``global_batch_size=C``: one whole row of ``T`` tokens per chip, the float32
  parameters, gradients and Adam moments sharded over the ``C`` chips (FSDP);
* ``sequence=S>1``: ``mesh.fsdp=C/S mesh.sequence=S``, ``global_batch_size=C/S``: each row split over ``S``
  chips (``T/S`` tokens per chip), the state sharded over ``fsdp × sequence`` (the default rules map ``embed`` to
  both: every chip holds ``1/C`` of it, as with ``sequence=1``).

Each point runs in a child process (``--one KEY``) with a wall-clock limit (``--timeout``), so a compile that
takes too long or crashes is recorded as such and the loop goes on. Results are cached by key in
``benchmarks/results/long_context.json`` (resumable; ``--redo`` recompiles). For each ``sequence>1`` point the
compiled program's collectives are read from the optimized HLO (all-gathers, reduce-scatters, collective
permutes with their per-chip result sizes and source ops), which gives the size of the all-gathered
attention keys/values against the per-chip total: the most a ring (``ppermute`` of K/V blocks) could save.
These are the TPU compiler's figures (memory analysis and its out-of-memory verdicts), not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "long_context.json"
PLOT = ROOT / "benchmarks" / "results" / "long_context_memory.png"
CONTEXTS = tuple(2**k for k in range(13, 21))  # 8K .. 1M
PRESETS = ("wuneng-1.5b", "qwen2.5-1.5b")
GIB = 1024**3
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Points (pure logic)


@dataclasses.dataclass(frozen=True)
class Point:
    preset: str
    topology: str
    chips: int
    seq_len: int
    sequence: int
    attention: str  # splash | xla

    @property
    def key(self) -> str:
        return (
            f"{self.preset}|{self.topology}|T={self.seq_len}|sequence={self.sequence}|attn={self.attention}"
        )

    @property
    def fsdp(self) -> int:
        return self.chips // self.sequence

    @property
    def global_batch_size(self) -> int:
        # one row per fsdp group: a row is whole on a chip (sequence=1) or split over S chips
        return self.fsdp

    @property
    def tokens_per_chip(self) -> int:
        return self.global_batch_size * self.seq_len // self.chips

    def overrides(self) -> dict[str, Any]:
        """The training-config values of this point (``wuneng compile`` ``key=value`` overrides)."""
        out: dict[str, Any] = {
            "model": self.preset,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "dtype": "bfloat16",
            "remat": "full",
            "mesh.data": 1,
            "mesh.fsdp": self.fsdp,
            "mesh.sequence": self.sequence,
        }
        if self.attention != "splash":
            out["model.attention_impl"] = self.attention
        return out

    def command(self) -> str:
        def fmt(v: Any) -> str:
            return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

        args = " ".join(f"{k}={fmt(v)}" for k, v in self.overrides().items())
        return f"wuneng compile configs/demo.yaml topology={self.topology} {args}"

    @classmethod
    def from_key(cls, key: str, chips: int) -> Point:
        preset, topology, t, s, a = key.split("|")
        return cls(preset, topology, chips, int(t[2:]), int(s[9:]), a[5:])


def chips_of(topology: str) -> int:
    n = 1
    for d in topology.split(":", 1)[1].split("x"):
        n *= int(d)
    return n


def fmt_tokens(n: int) -> str:
    return f"{n // 1024**2}M" if n >= 1024**2 and n % 1024**2 == 0 else f"{n // 1024}K"


def longest_fitting(
    entries: dict[str, dict[str, Any]], preset: str, topology: str, sequence: int
) -> int | None:
    """The longest context of the cached points of ``(preset, topology, sequence)`` that the compiler says fits,
    provided every shorter cached point fits too (else the first failure bounds it)."""
    rows = sorted(
        (e["seq_len"], e["status"])
        for e in entries.values()
        if e["preset"] == preset and e["topology"] == topology and e["sequence"] == sequence
    )
    best = None
    for t, status in rows:
        if status != "fits":
            break
        best = t
    return best


def first_failure(
    entries: dict[str, dict[str, Any]], preset: str, topology: str, sequence: int
) -> int | None:
    rows = sorted(
        (e["seq_len"], e["status"])
        for e in entries.values()
        if e["preset"] == preset and e["topology"] == topology and e["sequence"] == sequence
    )
    return next((t for t, s in rows if s != "fits"), None)


class Progress:
    """``[i/n] elapsed, rate, ETA`` for a loop of slow steps (cached steps count as done at once)."""

    def __init__(self, total: int, note: str = "", unit: str = "compiles"):
        self.total, self.done, self.timed, self.seconds = total, 0, 0, 0.0
        self.note, self.unit = note, unit
        self.t0 = time.perf_counter()

    def step(self, seconds: float | None) -> str:
        self.done += 1
        if seconds is not None:
            self.timed += 1
            self.seconds += seconds
        left = self.total - self.done
        per = self.seconds / self.timed if self.timed else None
        eta = "n/a" if per is None else _fmt_s(per * left)
        rate = "n/a" if per is None else f"{60 / per:.2f} {self.unit}/min"
        return f"[{self.done}/{self.total}] elapsed {_fmt_s(time.perf_counter() - self.t0)}, {rate}, ETA {eta}{self.note}"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------------
# Collectives in the optimized HLO (pure logic)

_SHAPE = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(all-gather|all-gather-start|reduce-scatter|"
                    r"collective-permute|collective-permute-start|all-reduce|all-reduce-start|all-to-all)\(")  # fmt: skip
_OPNAME = re.compile(r'op_name="([^"]+)"')
_DIMS = re.compile(r"dimensions=\{([\d,]*)\}")


def shape_bytes(text: str) -> int:
    """Bytes of the array shapes in an HLO type string (``bf16[1,4,8]`` or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def collectives(hlo_text: str, min_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """Collective ops of an optimized HLO module with a per-chip result of at least ``min_bytes``: kind, name,
    result shape, bytes (async ``*-start`` ops: the last tuple element, the result), gathered/scattered
    dimension, computation they sit in and the JAX op that made them."""
    out, comp = [], None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and "{" in line and ("(" in line):
            m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)", line)
            comp = m.group(1) if m else comp
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rtype, kind = m.groups()
        shapes = [f"{d}[{s}]" for d, s in _SHAPE.findall(rtype)]
        if kind.endswith("-start") and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2 :]  # (operands, results): the results
        result = ", ".join(shapes)
        nbytes = shape_bytes(result)
        if nbytes < min_bytes:
            continue
        op = _OPNAME.search(line)
        dims = _DIMS.search(line)
        out.append(
            {
                "kind": kind.removesuffix("-start"),
                "name": name,
                "shape": result,
                "bytes": nbytes,
                "dimensions": dims.group(1) if dims else None,
                "computation": comp,
                "op_name": _short(op.group(1)) if op else None,
            }
        )
    return out


_REPORT_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*(\d+);\s*(.*)$")
_UNIT = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def heap_allocations(report_text: str, limit: int = 12) -> list[dict[str, Any]]:
    """The largest HBM allocations of the compiler's memory-usage report (``*memory-usage-report.txt``:
    allocations by size, each with the shapes of the values that share it over the program's life)."""
    out = []
    in_hbm = False
    for line in report_text.splitlines():
        if line.startswith("Memory Space:"):
            in_hbm = "color=0" in line
            continue
        m = _REPORT_ROW.match(line) if in_hbm else None
        if m:
            size = int(float(m.group(1)) * _UNIT.get(m.group(2), 1))
            out.append({"bytes": size, "values": int(m.group(3)), "shapes": m.group(4).strip()[:400]})
            if len(out) >= limit:
                break
    return out


def heap_total(report_text: str) -> int | None:
    """The HBM heap (temporaries) of the compiler's memory-usage report (``Total bytes`` of color 0)."""
    m = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", report_text)
    return int(m.group(1)) if m else None


def failure_limit(entry: dict[str, Any]) -> str | None:
    """Which memory a refusal ran out of: ``HBM`` (the chip's memory), ``SMEM`` (a Mosaic kernel's scalar
    memory, e.g. splash's prefetched mask tables), or None for a program that fits / was not compiled."""
    if entry.get("status") != "does not fit":
        return None
    return "SMEM" if "space=smem" in (entry.get("error") or "") else "HBM"


def _short(op_name: str, n: int = 5) -> str:
    return "/".join([p for p in op_name.split("/") if p][-n:])


def result_dims(c: dict[str, Any]) -> list[int]:
    """The dimensions of a collective's (first) result array."""
    m = _SHAPE.search(c["shape"])
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def is_sequence_gather(c: dict[str, Any], seq_len: int, sequence: int) -> bool:
    """A collective holding a whole sequence on every chip: an all-gather whose gathered dimension is
    ``seq_len``; a reduce-scatter (its transpose) that scatters one back to ``seq_len / sequence``; an
    all-reduce of a full-length array (XLA:TPU reduces the gathered K/V gradients as an all-reduce inside a
    reduce-scatter fusion). These are the buffers that do not fall with the sequence axis."""
    dims = result_dims(c)
    if c["kind"] == "all-reduce":
        return seq_len in dims
    if c["kind"] not in ("all-gather", "reduce-scatter") or not c.get("dimensions"):
        return False
    want = seq_len if c["kind"] == "all-gather" else seq_len // sequence
    return any(int(d) < len(dims) and dims[int(d)] == want for d in c["dimensions"].split(","))


def is_attention_kv(c: dict[str, Any], kv_dims: tuple[int, int] | None = None) -> bool:
    """A collective of attention keys/values (or their gradients): named so by its op, or (the gather XLA
    inserts at the attention's ``shard_map`` boundary carries the producer's name) shaped ``[..., T, G, D]``
    with ``kv_dims = (G, D)``."""
    op = (c.get("op_name") or "").lower()
    if c["kind"] not in ("all-gather", "reduce-scatter", "all-reduce"):
        return False
    if kv_dims is not None and tuple(result_dims(c)[-2:]) == tuple(kv_dims):
        return True
    return "attention" in op or "splash" in op or "mha" in op


def ring_saving(kv: list[dict[str, Any]], sequence: int, total_bytes: int) -> dict[str, Any]:
    """What a ring could save at most. A ring holds 2 of the ``sequence`` K/V blocks (the one in use and the one
    in flight) where the all-gather holds all ``S``, and passes partial dK/dV blocks around instead of reducing
    full-length ones, so it saves at most ``(1 - 2/S)`` of the full-length K/V buffers one attention call has
    live: the all-gathered K and V (the largest set in one computation: the scan runs one layer at a time, remat
    recomputes the gather in the backward pass) plus, in the backward pass, the two largest full-length
    dK/dV reductions. An upper bound (it assumes all of them live at the per-chip peak)."""
    by_comp: dict[str, int] = {}
    for c in kv:
        if c["kind"] == "all-gather":
            by_comp[c["computation"] or "?"] = by_comp.get(c["computation"] or "?", 0) + c["bytes"]
    gathered = max(by_comp.values(), default=0)
    reductions = sorted(
        (
            c["bytes"] * (sequence if c["kind"] == "reduce-scatter" else 1)
            for c in kv
            if c["kind"] != "all-gather"
        ),
        reverse=True,
    )
    reduced = sum(reductions[:2])
    keep = 2 / sequence if sequence > 2 else 1.0
    saving = int((gathered + reduced) * (1 - keep))
    return {
        "gathered_kv_bytes_one_call": gathered,
        "gathered_kv_bytes_by_computation": by_comp,
        "reduced_dkv_bytes_one_call": reduced,
        "ring_saving_bytes_at_most": saving,
        "ring_saving_fraction_of_total": saving / total_bytes if total_bytes else None,
    }


# --------------------------------------------------------------------------------------------
# Compiling one point (child process)


def predicted_speed(hlo_text: str, target: Any, chip: Any, point: Point) -> dict[str, Any]:
    """The roofline estimate of the compiled step (``benchmarks/roofline.py``): step time, tokens/s per chip,
    MFU; the compiler's estimates, not measurements."""
    from benchmarks.roofline import predict, speed
    from train.metrics import flops_dims, flops_per_token

    dims = flops_dims(target.model_cfg, target.n_params)
    per_token = flops_per_token(dims, point.seq_len)
    attention = 8.0 * dims.attn_layers * dims.attn_heads * dims.attn_head_dim * point.seq_len
    roofline = predict(
        hlo_text,
        peak_flops=chip.peak_flops,
        hbm_bandwidth=chip.hbm_bandwidth,
        ici_bandwidth=chip.ici_bandwidth,
        attention_flops=attention * point.tokens_per_chip,
    )
    fast = speed(
        roofline,
        model_flops_per_token=per_token["total"],
        tokens_per_chip=point.tokens_per_chip,
        peak_flops=chip.peak_flops,
    )
    return {**roofline, **fast, "model_flops_per_token": per_token["total"]}


def train_config(point: Point, **extra: Any) -> Any:
    """The training config of ``point`` (its :meth:`Point.overrides`, then ``extra`` dotted-key overrides such
    as ``model.num_layers``), as ``wuneng compile`` builds it."""
    from train.config import load_config

    raw: dict[str, Any] = {"run_dir": "unused", "data": {"store": "unused"}, "steps": 1000}
    values = {**point.overrides(), **extra}
    return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def compile_one(point: Point, keep_dump: str | None = None) -> dict[str, Any]:
    from train.aot.compile import build_train, compile_train, platform_defaults
    from train.aot.memory import dumped_files, largest_temporaries
    from train.aot.topology import parse_topology

    platform_defaults()
    cfg = train_config(point)
    topo = parse_topology(point.topology)
    t0 = time.perf_counter()
    target = build_train(cfg, topo)
    build_s = time.perf_counter() - t0
    dump = keep_dump or tempfile.mkdtemp(prefix="wuneng_lc_")
    try:
        report, _ = compile_train(target, keep_dump=dump)
        colls: list[dict[str, Any]] = []
        predicted = None
        hlo = dumped_files(dump, "after_optimizations.txt")
        if hlo:
            hlo_text = Path(hlo[-1]).read_text(errors="replace")
            colls = collectives(hlo_text)
            if report.status == "fits":
                predicted = predicted_speed(hlo_text, target, topo.chip, point)
        temporaries = [dataclasses.asdict(b) for b in largest_temporaries(dump, 3)]
        reports = dumped_files(dump, "memory-usage-report.txt")
        report_text = Path(reports[-1]).read_text(errors="replace") if reports else ""
        heap, heap_bytes = heap_allocations(report_text), heap_total(report_text)
    finally:
        if keep_dump is None:
            shutil.rmtree(dump, ignore_errors=True)
    entry: dict[str, Any] = {
        **dataclasses.asdict(point),
        "code": host_info().get("git"),
        "code_dirty": host_info().get("git_dirty"),
        "key": point.key,
        "global_batch_size": point.global_batch_size,
        "tokens_per_chip": point.tokens_per_chip,
        "mesh": dict(target.mesh.shape),
        "impls": target.impls,
        "n_params": target.n_params,
        "status": report.status,
        "memory": report.memory.to_dict() if report.memory else None,
        "used_bytes": report.used_bytes,
        "available_bytes": report.available_bytes,
        "hbm_bytes": report.hbm_bytes,
        "compile_s": round(report.compile_s, 1),
        "build_s": round(build_s, 1),
        "largest": [dataclasses.asdict(b) for b in report.largest[:6]],
        "largest_temporaries": temporaries,
        "error": (report.error or "")[:1500] or None,
        "collectives": sorted(colls, key=lambda c: -c["bytes"])[:40],
        "heap_allocations": heap,
        "hbm_heap_bytes": heap_bytes,
        "predicted": predicted,
        "command": point.command(),
    }
    mc = target.model_cfg
    kv_dims = (int(mc.num_kv_heads), int(mc.head_dim)) if hasattr(mc, "num_kv_heads") else None
    for c in entry["collectives"]:
        c["sequence_gather"] = point.sequence > 1 and is_sequence_gather(c, point.seq_len, point.sequence)
        c["attention_kv"] = c["sequence_gather"] and is_attention_kv(c, kv_dims)
    if point.sequence > 1 and entry["used_bytes"]:
        kv = [
            c
            for c in colls
            if is_sequence_gather(c, point.seq_len, point.sequence) and is_attention_kv(c, kv_dims)
        ]
        entry["ring"] = ring_saving(kv, point.sequence, entry["used_bytes"])
        entry["ring"]["kv_collectives"] = sorted(kv, key=lambda c: -c["bytes"])[:12]
    return entry


# --------------------------------------------------------------------------------------------
# Cache, loop, table, plot


class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("points", {})
        self.data.setdefault("usable_hbm", {})

    def save(self) -> None:
        self.data["host"] = host_info()
        self.data["summary"] = summary(self.data["points"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def summary(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Longest fitting context per (preset, topology, sequence) and the ring bound of each sequence>1 point."""
    out: dict[str, Any] = {"longest_fitting": {}, "ring_vs_all_gather": {}}
    for series in sorted({(e["preset"], e["topology"], e["sequence"]) for e in points.values()}):
        fail = first_failure(points, *series)
        failed = next((e for e in points.values() if (e["preset"], e["topology"], e["sequence"], e["seq_len"]) == (*series, fail)), None)  # fmt: skip
        out["longest_fitting"]["|".join(map(str, series))] = {
            "fits": longest_fitting(points, *series),
            "first_refused": fail,
            "refused_for": (failure_limit(failed) or failed["status"]) if failed else None,
        }
    for key, e in points.items():
        if e.get("ring"):
            r = e["ring"]
            out["ring_vs_all_gather"][key] = {
                "total_bytes": e["used_bytes"],
                **{k: r[k] for k in ("gathered_kv_bytes_one_call", "reduced_dkv_bytes_one_call", "ring_saving_bytes_at_most", "ring_saving_fraction_of_total")},
            }  # fmt: skip
    return out


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "target": "TPU compiler (libtpu), ahead-of-time on compile-only devices; the host is a CPU",
    }
    try:
        from importlib.metadata import version

        info.update({k: version(k) for k in ("jax", "jaxlib", "libtpu")})
    except Exception:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "wuneng_jax", "pallas_kernels", "train"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        info["git_dirty"] = [line.strip() for line in dirty if line.strip()]  # uncommitted model/kernel files
    except Exception:
        pass
    return info


def verdict(entry: dict[str, Any]) -> str:
    """``fits, 8.02 GiB/chip, 51.1 s`` for a log line."""
    used = entry.get("used_bytes")
    return (
        f"{entry['status']}, {used / GIB if used else float('nan'):.2f} GiB/chip, {entry.get('compile_s')} s"
    )


def run_point(point: Point, timeout: float, keep_dump: str | None) -> dict[str, Any]:
    """Compile ``point`` in a child process (wall-clock limit ``timeout``); the entry (dated), or a timeout/crash
    entry."""
    entry = _run_child(point, timeout, keep_dump)
    entry["date"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return entry


def _run_child(point: Point, timeout: float, keep_dump: str | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--one", point.key, "--chips", str(point.chips), "--one-out", out]
    if keep_dump:
        cmd += ["--keep-dump", keep_dump]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        text = Path(out).read_text() if Path(out).stat().st_size else ""
        if proc.returncode == 0 and text:
            return json.loads(text)
        status, error = "crashed", (proc.stderr or proc.stdout)[-1500:]
    except subprocess.TimeoutExpired:
        status, error = (
            "timeout",
            f"compile did not finish within {timeout:.0f} s (wall clock, shared 2-core host)",
        )
    finally:
        Path(out).unlink(missing_ok=True)
    return {
        **dataclasses.asdict(point),
        "key": point.key,
        "global_batch_size": point.global_batch_size,
        "tokens_per_chip": point.tokens_per_chip,
        "status": status,
        "error": error,
        "compile_s": round(time.perf_counter() - t0, 1),
        "used_bytes": None,
        "memory": None,
        "command": point.command(),
    }


def usable_hbm(cache: Cache, topology: str) -> int | None:
    """The HBM the TPU compiler lets a program use on this generation (the fit table measured it)."""
    gen = topology.split(":")[0]
    if gen in cache.data["usable_hbm"]:
        return int(cache.data["usable_hbm"][gen])
    fit = ROOT / "benchmarks" / "results" / "tpu_fit_table.json"
    if fit.exists():
        have = json.loads(fit.read_text()).get("usable_hbm", {}).get(gen)
        if have:
            cache.data["usable_hbm"][gen] = int(have)
            return int(have)
    return None


def loop(cache: Cache, args: argparse.Namespace) -> None:
    plan: list[list[Point]] = []  # one series per (preset, sequence): stop at the first failure
    chips = chips_of(args.topology)
    for preset in args.presets:
        for s in args.sequence:
            attn = "splash" if s == 1 else args.seq_attention
            plan.append([Point(preset, args.topology, chips, t, s, attn) for t in args.contexts])
    prog = Progress(sum(len(p) for p in plan), " (upper bound: points past the first failure are skipped)")
    for series in plan:
        stop = False
        for point in series:
            cached = cache.data["points"].get(point.key)
            reuse = (
                cached is not None and not args.redo and (cached["status"] != "timeout" or args.skip_timeouts)
            )
            if stop or reuse:
                note = "skipped (an earlier context did not fit)" if stop else f"cached: {cached['status']}"
                if cached and not cached["status"] == "fits":
                    stop = True
                print(f"{prog.step(None)}  {point.key}: {note}", flush=True)
                continue
            print(f"  compiling {point.key} ({point.tokens_per_chip} tokens per chip) ...", flush=True)
            entry = run_point(point, args.timeout, args.keep_dump)
            cache.data["points"][point.key] = entry
            usable_hbm(cache, point.topology)
            cache.save()
            print(f"{prog.step(entry['compile_s'])}  {point.key}: {verdict(entry)}", flush=True)
            if entry["status"] != "fits":
                stop = True


def markdown(cache: Cache) -> str:
    pts = cache.data["points"]
    hbm = cache.data["usable_hbm"]
    lines = [
        "| model | slice: layout | context T | tokens / chip | arguments | temporaries | total / chip | fits | compile | largest temporary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        pts.values(), key=lambda e: (e["preset"], e["topology"], e["sequence"], e["attention"], e["seq_len"])
    )
    for e in order:
        m = e.get("memory") or {}
        layout = f"fsdp={e['chips'] // e['sequence']} × sequence={e['sequence']}"
        if e["attention"] != "splash":
            layout += f", attention {e['attention']}"
        total = e.get("used_bytes")
        status = {"fits": "yes", "does not fit": "**no**"}.get(e["status"], e["status"])
        if e["status"] == "does not fit" and e.get("available_bytes") and total:
            status += f" (needs {total / GIB:.1f} of {e['available_bytes'] / GIB:.2f})"
        elif failure_limit(e) == "SMEM":
            m_ = re.search(
                r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\).*?:: (\w+)", e["error"]
            )
            status += (
                f" (SMEM: {int(m_.group(1)) >> 20} MiB of {int(m_.group(2)) >> 20} MiB in `{m_.group(3)}`)"
                if m_
                else " (SMEM)"
            )
        tmp = next((b for b in e.get("largest", []) if b["kind"] == "temporary"), None)
        big = f"{tmp['nbytes'] / GIB:.2f} GiB `{tmp['shape']}`" if tmp else "—"
        lines.append(
            f"| {e['preset']} | {e['topology']}: {layout} | {fmt_tokens(e['seq_len'])} | {fmt_tokens(e['tokens_per_chip'])} "
            f"| {_gib(m.get('arguments'))} | {_gib(m.get('temporaries'))} | {_gib(total)} | {status} "
            f"| {e['compile_s']:.0f} s | {big} |"
        )
    lines.append("")
    for preset in sorted({e["preset"] for e in pts.values()}):
        for topo in sorted({e["topology"] for e in pts.values() if e["preset"] == preset}):
            gen = topo.split(":")[0]
            for s in sorted(
                {e["sequence"] for e in pts.values() if e["preset"] == preset and e["topology"] == topo}
            ):
                best = longest_fitting(pts, preset, topo, s)
                fail = first_failure(pts, preset, topo, s)
                lines.append(
                    f"* {preset} on {topo}, sequence={s}: longest context that fits "
                    f"**{fmt_tokens(best) if best else 'none'}**"
                    + (f" ({fmt_tokens(fail)}: {_status_of(pts, preset, topo, s, fail)})" if fail else "")
                    + (f"; usable HBM {hbm[gen] / GIB:.2f} GiB" if gen in hbm else "")
                )
    return "\n".join(lines)


def _status_of(pts: dict[str, dict[str, Any]], preset: str, topo: str, s: int, t: int) -> str:
    e = next(
        e
        for e in pts.values()
        if (e["preset"], e["topology"], e["sequence"], e["seq_len"]) == (preset, topo, s, t)
    )
    if e["status"] == "does not fit":
        return f"the compiler refuses it, out of {failure_limit(e)}"
    return e["status"]


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f} GiB"


def plot(cache: Cache, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = cache.data["points"]
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple, list] = {}
    for e in pts.values():
        series.setdefault((e["preset"], e["topology"], e["sequence"], e["attention"]), []).append(e)
    for (preset, _topo, s, attn), es in sorted(series.items()):
        es = sorted(es, key=lambda e: e["seq_len"])
        xs = [e["seq_len"] for e in es if e.get("used_bytes")]
        ys = [e["used_bytes"] / GIB for e in es if e.get("used_bytes")]
        label = f"{preset}, sequence={s}" + (f" ({attn})" if attn != "splash" else "")
        (line,) = ax.plot(xs, ys, "o-" if s == 1 else "s--", label=label)
        bad = [
            (e["seq_len"], e["used_bytes"] / GIB) for e in es if e.get("used_bytes") and e["status"] != "fits"
        ]
        if bad:
            ax.plot(*zip(*bad, strict=True), "x", color="red", markersize=10)
        top = max(cache.data["usable_hbm"].values(), default=96 * GIB) / GIB
        for e in es:  # refused before a total was known (another memory, a timeout): marked at the HBM line
            if e.get("used_bytes") is None and e["status"] != "fits":
                what = failure_limit(e) or e["status"]
                ax.plot([e["seq_len"]], [top], "x", color=line.get_color(), markersize=10)
                ax.annotate(f"{what}", (e["seq_len"], top), textcoords="offset points", xytext=(0, 6 + 10 * (s > 1)),
                            ha="center", fontsize=7, color=line.get_color())  # fmt: skip
    for gen, hbm in cache.data["usable_hbm"].items():
        ax.axhline(hbm / GIB, color="gray", linestyle=":", label=f"{gen} usable HBM ({hbm / GIB:.1f} GiB)")
    ax.set_xscale("log", base=2)
    ticks = sorted({e["seq_len"] for e in pts.values()})
    ax.set_xticks(ticks, [fmt_tokens(t) for t in ticks])
    ax.set_xlabel("context length T (tokens per row)")
    ax.set_ylabel("per-chip memory (GiB, TPU compiler)")
    topo = ", ".join(sorted({e["topology"] for e in pts.values()}))
    ax.set_title(f"Train step, per-chip memory vs context, {topo} (TPU compiler)", fontsize=10)
    ax.set_ylim(0, max(cache.data["usable_hbm"].values(), default=96 * GIB) / GIB * 1.1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=[PRESETS[0]])
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    p.add_argument("--sequence", nargs="*", type=int, default=[1, 4], help="sequence-axis sizes to compile")
    p.add_argument(
        "--seq-attention", default="splash", choices=("splash", "xla"), help="attention with sequence>1"
    )
    p.add_argument("--timeout", type=float, default=1800, help="wall-clock seconds per compile")
    p.add_argument("--redo", action="store_true", help="recompile cached points")
    p.add_argument("--skip-timeouts", action="store_true", help="do not retry cached timeouts")
    p.add_argument("--keep-dump", help="keep the compiler's dump of each compile here (debugging)")
    p.add_argument("--markdown", action="store_true", help="print the table from the cache only")
    p.add_argument("--plot", action="store_true", help="write the plot from the cache only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    p.add_argument("--chips", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        entry = compile_one(Point.from_key(args.one, args.chips), args.keep_dump)
        Path(args.one_out).write_text(json.dumps(entry))
        return 0
    cache = Cache(Path(args.out))
    if args.markdown:
        print(markdown(cache))
        return 0
    if args.plot:
        plot(cache, PLOT)
        return 0
    loop(cache, args)
    print(markdown(cache))
    plot(cache, PLOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where does a decoder layer's HBM traffic go? qwen2 and WuNeng layers side by side, per fusion, from the
TPU compiler's optimized HLO (no TPU needed: libtpu's AOT compiler, as ``wuneng compile`` runs it).

    python3 benchmarks/layer_traffic.py                       # Qwen2.5-0.5B shapes, v5p:2x2x1, 1 and 2 layers
    python3 benchmarks/layer_traffic.py --families wuneng     # one family (the other's dumps are reused)
    python3 benchmarks/layer_traffic.py --reuse-dump          # re-read the kept HLO dumps (no compile)
    python3 benchmarks/layer_traffic.py --components --json benchmarks/results/layer_traffic_parts.json
                                                              # the WuNeng layer's parts alone (about 2 min)
    python3 benchmarks/layer_traffic.py --full-depth --json benchmarks/results/layer_traffic_full.json
                                                              # the scanned 24-layer steps, per layer and scope

Settings (the issue's): the train step of ``qwen2.5-0.5b`` and ``wuneng-0.5b`` (default WuNeng settings:
``fusion: full``, ``state_query`` on, every layer hybrid), sequence 4096, one sequence per chip
(``global_batch_size`` = 4 chips), FSDP over a v5p:2x2x1, bfloat16 compute, ``remat=full``, the TPU kernels
(splash attention, Pallas ``wkv7``), compiled by :func:`train.aot.compile.build_train` /
:func:`~train.aot.compile.compile_train`.

Figures, all the compiler's estimates, none measured:

* **per layer (compiler)**: XLA's own cost analysis of the whole compiled step (``flops``, ``bytes accessed``,
  ``optimal_seconds``, its roofline estimate) at 1 and 2 layers; one layer = the difference. XLA's cost
  analysis counts a while loop's body once, whatever its trip count, so the layer stack's ``lax.scan`` is
  fully unrolled here (``unroll=True``, benchmark only: same program, no loop) and the depths differ only by
  a layer (the loss's vocabulary-tile loop is the same loop in both and cancels).
* **per fusion**: every top-level instruction of the optimized HLO (fusions, unfused dots, Mosaic kernels,
  copies, collectives), bytes accessed = its operands + its result (a dynamic-slice counts the slice, an
  in-place dynamic-update-slice the update), FLOPs = its dots and convolutions, and a roofline time
  ``max(FLOPs / peak, bytes / HBM bandwidth)`` with the chip's figures (v5p: 459 TFLOP/s bf16, 2.765 TB/s);
  instructions inside a loop count once per trip. Grouped by the model's named scopes (``jax.named_scope`` in
  ``wuneng_jax/models/wuneng_layer.py``; the Qwen2 modules are scoped here, by wrapping their methods), and by
  pass: ``fwd`` (forward), ``remat`` (the forward recomputed in the backward pass, remat=full) and ``bwd``.
  Per-layer rows: the 2-layer program minus the 1-layer one.

Writes ``benchmarks/results/layer_traffic.json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.aot.compile import platform_defaults  # noqa: E402
from train.aot.topology import CHIPS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "layer_traffic.json"
DUMPS = Path("/tmp/wuneng_layer_traffic")
PRESETS = {"qwen2": "qwen2.5-0.5b", "wuneng": "wuneng-0.5b"}

# Named scopes, innermost wins. The Qwen2 ones are added by scope_qwen2_modules(); the WuNeng ones live in
# wuneng_jax/models/wuneng_layer.py.
SCOPES = (
    "rmsnorm",
    "attn_qkv",
    "attn_core",
    "attn_out",
    "mlp",
    "wuneng_qkv",
    "state_proj",
    "state_keys",
    "decay_lora",
    "iclr_lora",
    "gate_lora",
    "wkv7",
    "state_out",
    "state_query",
    "fusion",
    "state_branch",
)

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
FREE = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "copy-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "send-done",
    "recv-done",
    "opt-barrier",
    "iota",
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


# --------------------------------------------------------------------------------------------------------
# Named scopes for the Qwen2 modules (benchmark only: wraps methods, changes no numerics)


def cost_meta(compiled: Any, t0: float) -> dict[str, float]:
    """Compile seconds since ``t0`` and XLA's cost analysis (FLOPs, bytes, roofline seconds) of ``compiled``."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "compile_s": round(time.perf_counter() - t0, 1),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "optimal_seconds": float(cost.get("optimal_seconds", 0.0)),
        "transcendentals": float(cost.get("transcendentals", 0.0)),
    }


@functools.cache
def unroll_layer_stack() -> None:
    """Make the layer stack's ``lax.scan`` fully unrolled (benchmark only; see the module docstring)."""
    import jax

    from wuneng_jax.layers import stack

    class _Lax:
        def __getattr__(self, name):
            return getattr(jax.lax, name)

        @staticmethod
        def scan(*args, **kwargs):
            kwargs["unroll"] = True
            return jax.lax.scan(*args, **kwargs)

    class _Jax:
        lax = _Lax()

        def __getattr__(self, name):
            return getattr(jax, name)

    stack.jax = _Jax()


@functools.cache
def scope_qwen2_modules() -> None:
    import jax

    from wuneng_jax.layers.mlp import SwiGLU
    from wuneng_jax.layers.norms import RMSNorm
    from wuneng_jax.models.qwen2 import Qwen2Attention

    def wrap(cls, method, name):
        fn = getattr(cls, method)

        @functools.wraps(fn)
        def scoped(*a, **k):
            with jax.named_scope(name):
                return fn(*a, **k)

        setattr(cls, method, scoped)

    wrap(RMSNorm, "__call__", "rmsnorm")
    wrap(SwiGLU, "__call__", "mlp")
    wrap(Qwen2Attention, "project_qkv", "attn_qkv")
    wrap(Qwen2Attention, "attend", "attn_core")
    wrap(Qwen2Attention, "out", "attn_out")


# --------------------------------------------------------------------------------------------------------
# Optimized-HLO parsing


ARRAY_LAYOUT = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](?:\{([0-9,]*)(?::([^}]*))?\})?")
PADDED = True  # count the TPU's tiled layouts (minor dims padded to the tile), as the compiler's memory does


def _padded_elements(dims: list[int], layout: str, tiles: str | None) -> int:
    """Elements of an array in its tiled TPU layout: the two minor-most dims (layout order) rounded up to
    the first tile ``T(a,b)``; a second tile ``(p,1)`` packs ``p`` narrow values per 32-bit word along the
    second-minor dim (bf16 ``T(8,128)(2,1)`` is a 16 x 128 tile)."""
    if not dims or not tiles:
        return math.prod(dims) if dims else 1
    t = re.findall(r"\(([0-9,]+)\)", tiles.split("S(")[0])
    first = re.match(r"T\(", tiles)
    if not first or not t:
        return math.prod(dims)
    tile = [int(x) for x in t[0].split(",")]
    pack = [int(x) for x in t[1].split(",")] if len(t) > 1 else [1]
    order = [int(x) for x in layout.split(",") if x] if layout else list(range(len(dims)))[::-1]
    phys = [dims[i] for i in order]  # minor first
    if len(tile) >= 1:
        phys[0] = -(-phys[0] // tile[-1]) * tile[-1]
    if len(tile) >= 2 and len(phys) >= 2:
        rows = tile[-2] * (pack[0] if len(pack) == 2 else 1)
        phys[1] = -(-phys[1] // rows) * rows
    return math.prod(phys)


#: a memory-space annotation other than HBM's (0): ``S(1)`` on-chip VMEM that the compiler's memory-space
#: assignment prefetches into (``copy-start``), ``S(2)`` SMEM (sync flags)
ON_CHIP = re.compile(r"S\([1-9][0-9]*\)")
#: a Pallas kernel's own ``pl.CostEstimate`` in its backend config
DECLARED = re.compile(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"(\d+)","bytes_accessed":"(\d+)"')


def _array_bytes(text: str) -> int:
    """HBM bytes of the arrays in an HLO type (tiled layouts); arrays placed on chip (:data:`ON_CHIP`) are not
    HBM traffic: the ``copy-start`` that prefetched them read HBM once, and their readers read VMEM."""
    total = 0
    for dt, dims, layout, tiles in ARRAY_LAYOUT.findall(text):
        if tiles and ON_CHIP.search(tiles):
            continue
        shape = [int(d) for d in dims.split(",") if d]
        n = _padded_elements(shape, layout, tiles or None) if PADDED else (math.prod(shape) if shape else 1)
        total += int(n * DTYPE_BYTES[dt])
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """``rest`` = ``TYPE opcode(...)...`` -> (TYPE, the remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    # array type with a layout such as bf16[4096,896]{1,0:T(8,128)(2,1)}
    m = re.match(r"\S+?\[[0-9,]*\](\{[^}]*\})?", rest)
    if m:
        return m.group(0), rest[m.end() :].lstrip()
    sp = rest.index(" ")
    return rest[:sp], rest[sp + 1 :]


def _operands(body: str) -> list[str]:
    """Operand names of ``opcode(...)``: the first parenthesised group."""
    start = body.index("(")
    depth = 0
    for i in range(start, len(body)):
        depth += body[i] == "("
        depth -= body[i] == ")"
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", body[start + 1 : i])
    return []


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    op_name: str

    @property
    def out_bytes(self) -> int:
        return _array_bytes(self.type)


def _int_constant(ins: Instr | None) -> int | None:
    """The value of an integer scalar ``constant`` instruction (any width, signed or not), else None."""
    if ins is None or ins.opcode != "constant" or not re.match(r"[su]\d+\[\]", ins.type):
        return None
    m = re.match(r"constant\((-?\d+)\)", ins.attrs)
    return int(m.group(1)) if m else None


def _tuple_index(ins: Instr | None) -> int | None:
    """``i`` of a ``get-tuple-element(..., index=i)``, else None."""
    if ins is None or ins.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """computations (name -> instructions) and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{") and "(" in line:
            header = line.split(" (", 1)[0].strip()
            is_entry = header.startswith("ENTRY")
            name = header.removeprefix("ENTRY").strip().lstrip("%")
            current = comps.setdefault(name, [])
            if is_entry:
                entry = name
            continue
        if current is None or " = " not in line:
            continue
        s = line.strip().removeprefix("ROOT ")
        if not s.startswith("%"):
            continue
        lhs, rest = s.split(" = ", 1)
        type_, body = _split_type(rest)
        m = re.match(r"([\w\-]+)\(", body)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', body)
        current.append(
            Instr(lhs.lstrip("%"), type_, m.group(1), _operands(body), body, op.group(1) if op else "")
        )
    return comps, entry


def _dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
    out = ARRAY.findall(ins.type)
    if not out:
        return 0.0
    out_n = math.prod(int(d) for d in out[0][1].split(",") if d) if out[0][1] else 1
    if ins.opcode == "dot":
        lhs = ARRAY.findall(shapes.get(ins.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        if not lhs or not m:
            return 0.0
        dims = [int(d) for d in lhs[0][1].split(",") if d]
        k = math.prod(dims[int(i)] for i in m.group(1).split(",") if i)
        return 2.0 * out_n * k
    if ins.opcode == "convolution":
        return _conv_flops(ins, shapes, out_n)
    return 0.0


def _conv_flops(ins: Instr, shapes: dict[str, str], out_n: int) -> float:
    """2 x output elements x the kernel taps that land inside the (unpadded) input x input features per
    group: XLA:TPU writes some matmuls as convolutions whose window runs over zero padding (counted 0)."""
    lhs = ARRAY.findall(shapes.get(ins.operands[0], ""))
    kern = ARRAY.findall(shapes.get(ins.operands[1], ""))
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not lhs or not kern or not labels:
        return 0.0
    ldims = [int(d) for d in lhs[0][1].split(",") if d]
    kdims = [int(d) for d in kern[0][1].split(",") if d]
    lhs_l, k_l, out_l = labels.groups()
    out_dims = [int(d) for d in ARRAY.findall(ins.type)[0][1].split(",") if d]
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    pads = re.search(r"pad=([0-9_x\-]+)", window.group(1)) if window else None
    pad_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else None
    taps_per_out = 1.0
    spatial = [c for c in k_l if c.isdigit()]
    for n, c in enumerate(spatial):
        k = kdims[k_l.index(c)]
        n_in = ldims[lhs_l.index(c)]
        n_out = out_dims[out_l.index(c)]
        lo = pad_lo[n] if pad_lo and n < len(pad_lo) else 0
        valid = sum(1 for o in range(n_out) for t in range(k) if 0 <= o + t - lo < n_in)
        taps_per_out *= valid / max(n_out, 1)
    in_features = kdims[k_l.index("i")]
    return 2.0 * out_n * in_features * taps_per_out


@dataclasses.dataclass
class Cost:
    bytes: float = 0.0
    flops: float = 0.0
    count: float = 0.0

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.bytes += other.bytes * times
        self.flops += other.flops * times
        self.count += other.count * times


class Program:
    """The optimized HLO of one compiled step, as a list of executed instructions with trip counts."""

    def __init__(self, text: str):
        self.comps, self.entry = parse_hlo(text)
        self.shapes = {c: {i.name: i.type for i in ins} for c, ins in self.comps.items()}
        for c, ins in self.comps.items():  # fused computations' parameters
            for i in ins:
                if i.opcode == "parameter":
                    self.shapes[c][i.name] = i.type

    def fused_cost(self, comp: str) -> tuple[float, dict[int, float], float | None]:
        """FLOPs of a fused computation, the bytes actually read of parameters used only through
        (dynamic-)slices (by parameter number), and the in-place update bytes when the root is a
        dynamic-update-slice of a parameter (None otherwise)."""
        ins = self.comps.get(comp, [])
        shapes = self.shapes.get(comp, {})
        flops = sum(_dot_flops(i, shapes) for i in ins if i.opcode in ("dot", "convolution"))
        users: dict[str, list[Instr]] = collections.defaultdict(list)
        for i in ins:
            for o in i.operands:
                users[o].append(i)
        sliced: dict[int, float] = {}
        params = {}
        for i in ins:
            if i.opcode == "parameter":
                m = re.search(r"parameter\((\d+)\)", i.attrs)
                if m:
                    params[i.name] = int(m.group(1))
        for name, num in params.items():
            read = self._slice_read(comp, name, users)
            if read is not None:
                sliced[num] = read
        update = None
        root = ins[-1] if ins else None
        if root is not None and root.opcode == "dynamic-update-slice" and root.operands[0] in params:
            update = _array_bytes(shapes.get(root.operands[1], ""))
            sliced[params[root.operands[0]]] = 0.0
        return flops, sliced, update

    def _slice_read(
        self, comp: str, name: str, users: dict[str, list[Instr]], depth: int = 0
    ) -> float | None:
        """Bytes read of a fused computation's parameter ``name`` when it is used only through
        (dynamic-)slices, directly or as the matching parameter of nested fusions (a layer's slice of a stacked
        ``[L, ...]`` array fused into its consumer); None when some use reads it whole."""
        us = users.get(name, [])
        if not us or depth > 4:
            return None
        read = 0.0
        for u in us:
            if u.opcode in ("dynamic-slice", "slice") and u.operands[0] == name:  # not its start index
                read += u.out_bytes
                continue
            called = re.search(r"calls=%([\w.\-]+)", u.attrs) if u.opcode == "fusion" else None
            if called is None:
                return None
            inner = self.comps.get(called.group(1), [])
            inner_users: dict[str, list[Instr]] = collections.defaultdict(list)
            for i in inner:
                for o in i.operands:
                    inner_users[o].append(i)
            for pos in (k for k, o in enumerate(u.operands) if o == name):
                param = next(
                    (i.name for i in inner if i.opcode == "parameter" and f"parameter({pos})" in i.attrs),
                    None,
                )
                part = (
                    None
                    if param is None
                    else self._slice_read(called.group(1), param, inner_users, depth + 1)
                )
                if part is None:
                    return None
                read += part
        return read

    def instr_cost(self, comp: str, ins: Instr) -> Cost | None:
        op = ins.opcode
        if op in FREE or op in ("while", "call", "conditional"):
            return None
        shapes = self.shapes[comp]
        operand_bytes = [_array_bytes(shapes.get(o, "")) for o in ins.operands]
        out = ins.out_bytes
        flops = 0.0
        if op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", ins.attrs)
            if called:
                flops, sliced, update = self.fused_cost(called.group(1))
                for num, b in sliced.items():
                    if num < len(operand_bytes):
                        operand_bytes[num] = b
                if update is not None:
                    out = update
        elif op == "dynamic-slice":
            operand_bytes = [out]
        elif op == "dynamic-update-slice":
            upd = operand_bytes[1] if len(operand_bytes) > 1 else 0
            operand_bytes, out = [upd], upd
        elif op in ("dot", "convolution"):
            flops = _dot_flops(ins, shapes)
        elif (
            op == "copy-start"
        ):  # (destination, source, context): a prefetch reads HBM, an eviction writes it
            first = ARRAY_LAYOUT.search(ins.type)
            out = _array_bytes(first.group(0)) if first else 0
        elif op.endswith("-start"):
            out = 0  # the *-done half is free; count the data moved once
        elif "tpu_custom_call" in ins.attrs and (declared := DECLARED.search(ins.attrs)):
            # a Pallas kernel's declared FLOPs; its bytes the larger of declared and operands + result
            flops = float(declared.group(1))
            return Cost(max(float(sum(operand_bytes) + out), float(declared.group(3))), flops, 1.0)
        return Cost(float(sum(operand_bytes) + out), flops, 1.0)

    def trip_count(self, loop: Instr, comp: str = "") -> int:
        """A while loop's trip count: its known_trip_count, else counted from the loop's own arithmetic: the
        condition ``counter < bound`` (any integer type), the body's ``counter + step`` and the counter's
        initial constant in ``comp``, the loop's computation (0 when not a constant). ``lax.scan`` emits
        ``s32`` counters from 0 by 1; the SPMD partitioner's windowed dot loops (the collective matmuls of
        FSDP over 8 or more chips) ``u32`` counters stepping by 2."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
        if known:
            return int(known.group(1))
        cond = re.search(r"condition=%([\w.\-]+)", loop.attrs)
        body = re.search(r"body=%([\w.\-]+)", loop.attrs)
        cond_ins = self.comps.get(cond.group(1) if cond else "", [])
        if not cond_ins or cond_ins[-1].opcode != "compare" or "direction=LT" not in cond_ins[-1].attrs:
            return 1
        named = {i.name: i for i in cond_ins}
        counter, bound = (named.get(o) for o in cond_ins[-1].operands[:2])
        index = _tuple_index(counter)
        limit = _int_constant(bound)
        if index is None or limit is None:
            return 1
        step, start = 1, 0
        body_ins = self.comps.get(body.group(1) if body else "", [])
        if body_ins and body_ins[-1].opcode == "tuple" and index < len(body_ins[-1].operands):
            named = {i.name: i for i in body_ins}
            nxt = named.get(body_ins[-1].operands[index])
            if nxt is not None and nxt.opcode == "add":
                a, b = (named.get(o) for o in nxt.operands[:2])
                if _tuple_index(a) == index and _int_constant(b) is not None:
                    step = _int_constant(b) or 1
                elif _tuple_index(b) == index and _int_constant(a) is not None:
                    step = _int_constant(a) or 1
        named = {i.name: i for i in self.comps.get(comp, [])}
        init = named.get(loop.operands[0]) if loop.operands else None
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            src = named.get(init.operands[index])
            while src is not None and src.opcode == "copy" and src.operands:
                src = named.get(src.operands[0])
            start = _int_constant(src) or 0
        return max(1, -(-(limit - start) // max(step, 1)))

    def executed(self) -> list[tuple[str, Instr, float]]:
        """(computation, instruction, times executed) for every non-fused instruction reachable from the
        entry: while bodies times their known trip count, conditional branches once each."""
        out: list[tuple[str, Instr, float]] = []

        def visit(comp: str, times: float, depth: int = 0) -> None:
            if depth > 20:
                return
            for i in self.comps.get(comp, []):
                out.append((comp, i, times))
                if i.opcode == "while":
                    body = re.search(r"body=%([\w.\-]+)", i.attrs)
                    if body:
                        visit(body.group(1), times * self.trip_count(i, comp), depth + 1)
                elif i.opcode == "call":
                    called = re.search(r"to_apply=%([\w.\-]+)", i.attrs)
                    if called:
                        visit(called.group(1), times, depth + 1)
                elif i.opcode == "conditional":
                    branches = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                    names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                    for b in names:
                        visit(b, times / max(len(names), 1), depth + 1)

        visit(self.entry, 1.0)
        return out


def classify(ins: Instr) -> tuple[str, str]:
    """(pass, scope) of an instruction from its op_name."""
    name = ins.op_name
    if "rematted_computation" in name:
        phase = "remat"
    elif "transpose(" in name:
        phase = "bwd"
    elif name:
        phase = "fwd"
    else:
        phase = "other"
    scope = None
    best = -1
    for s in SCOPES:
        for m in re.finditer(r"(?<![\w])" + re.escape(s) + r"(?![\w])", name):
            if m.start() > best:
                best, scope = m.start(), s
    if scope is None:
        if ins.opcode in COLLECTIVES or any(ins.opcode.startswith(c) for c in COLLECTIVES):
            scope = "collectives"
        elif ins.opcode.startswith("copy"):
            scope = "copies"
        elif "/while/body/" in name:  # the layer stack is unrolled here: the loss's vocabulary tiles
            scope = "loss vocab-tile loop"
        elif "tpu_custom_call" in ins.attrs:
            scope = "kernel (unscoped)"
        else:
            scope = "outside layers" if "checkpoint" not in name else "layer (unscoped)"
    if ins.opcode in COLLECTIVES or any(ins.opcode.startswith(c + "-") for c in COLLECTIVES):
        scope = f"{scope} [collective]" if scope != "collectives" else scope
    return phase, scope


def table(program: Program) -> dict[tuple[str, str], Cost]:
    """(pass, scope) -> summed cost over the executed instructions."""
    out: dict[tuple[str, str], Cost] = collections.defaultdict(Cost)
    for comp, ins, times in program.executed():
        cost = program.instr_cost(comp, ins)
        if cost is None:
            continue
        out[classify(ins)].add(cost, times)
    return dict(out)


def top_fusions(program: Program, limit: int) -> list[dict[str, Any]]:
    rows = []
    for comp, ins, times in program.executed():
        cost = program.instr_cost(comp, ins)
        if cost is None:
            continue
        phase, scope = classify(ins)
        rows.append(
            {
                "name": ins.name,
                "opcode": ins.opcode,
                "pass": phase,
                "scope": scope,
                "times": times,
                "bytes": cost.bytes * times,
                "flops": cost.flops * times,
                "shape": ins.type[:80],
                "op_name": ins.op_name[-140:],
            }
        )
    return sorted(rows, key=lambda r: -r["bytes"])[:limit]


# --------------------------------------------------------------------------------------------------------
# Compiling


def _cached_dump(dump: Path, program: str, reuse: bool) -> dict[str, Any] | None:
    """The kept compile of ``program`` in ``dump`` (its cost JSON plus optimized HLO) when ``reuse`` and
    both exist; otherwise None, with ``dump`` emptied for a fresh compile."""
    hlo = (
        next(iter(sorted(dump.glob(f"*{program}*.after_optimizations.txt"))), None) if dump.exists() else None
    )
    meta_path = dump / "cost.json"
    if reuse and hlo is not None and meta_path.exists():
        return {**json.loads(meta_path.read_text()), "hlo": hlo.read_text()}
    if dump.exists():
        for f in dump.rglob("*"):
            if f.is_file():
                f.unlink()
    dump.mkdir(parents=True, exist_ok=True)
    return None


def compile_family(family: str, layers: int, reuse: bool, variant: str = "") -> dict[str, Any]:
    """Compile (or re-read) the train step; returns the compiler's totals and the optimized HLO text.
    ``variant`` names the WuNeng dumps (e.g. ``before``) so that two versions of the code can be compared."""
    dump = DUMPS / (f"{family}_{layers}" + (f"_{variant}" if variant and family == "wuneng" else ""))
    meta_path = dump / "cost.json"
    cached = _cached_dump(dump, "jit__lambda", reuse)
    if cached is not None:
        return cached
    from benchmarks.long_context import Point, train_config
    from train.aot.compile import build_train, compile_train
    from train.aot.topology import parse_topology

    scope_qwen2_modules()
    unroll_layer_stack()
    topo = parse_topology("v5p:2x2x1")
    point = Point(PRESETS[family], "v5p:2x2x1", topo.num_chips, 4096, 1, "splash")
    t0 = time.perf_counter()
    target = build_train(train_config(point, **{"model.num_layers": layers}), topo)
    report, compiled = compile_train(target, keep_dump=str(dump))
    if compiled is None:
        raise SystemExit(f"{family} {layers} layers: {report.status}: {report.error}")
    meta = {
        **cost_meta(compiled, t0),
        "temporaries": report.memory.temporaries if report.memory else None,
        "n_params": target.n_params,
    }
    meta_path.write_text(json.dumps(meta))
    hlo = next(iter(sorted(dump.glob("*jit__lambda*.after_optimizations.txt"))))
    print(
        f"  compiled {family} {layers} layers in {meta['compile_s']} s: {meta['flops']:.4g} FLOPs, "
        f"{meta['bytes_accessed']:.4g} B, optimal {meta['optimal_seconds'] * 1e3:.2f} ms",
        flush=True,
    )
    return {**meta, "hlo": hlo.read_text()}


def compile_full_depth(family: str, reuse: bool) -> dict[str, Any]:
    """The full-depth train step as ``wuneng compile`` builds it (the layers scanned, not unrolled), with the
    Qwen2 modules scoped; returns the optimized HLO and :mod:`benchmarks.roofline`'s step prediction."""
    dump = DUMPS / f"{family}_full"
    cached = _cached_dump(dump, "jit__lambda", reuse)
    if cached is not None:
        return cached
    from benchmarks.long_context import Point, predicted_speed, train_config
    from train.aot.compile import build_train, compile_train
    from train.aot.topology import parse_topology

    scope_qwen2_modules()
    topo = parse_topology("v5p:2x2x1")
    point = Point(PRESETS[family], "v5p:2x2x1", topo.num_chips, 4096, 1, "splash")
    t0 = time.perf_counter()
    target = build_train(train_config(point), topo)
    report, compiled = compile_train(target, keep_dump=str(dump))
    if compiled is None:
        raise SystemExit(f"{family} full depth: {report.status}: {report.error}")
    hlo = next(iter(sorted(dump.glob("*jit__lambda*.after_optimizations.txt")))).read_text()
    meta = {
        "compile_s": round(time.perf_counter() - t0, 1),
        "num_layers": int(target.model_cfg.num_layers),
        "predicted": predicted_speed(hlo, target, topo.chip, point),
    }
    (dump / "cost.json").write_text(json.dumps(meta))
    print(f"  compiled {family} at full depth in {meta['compile_s']} s", flush=True)
    return {**meta, "hlo": hlo}


def full_depth(args: argparse.Namespace) -> int:
    """``--full-depth``: both families' scanned steps side by side, per scope and pass, per layer (the loop
    body's instructions once; everything else once per step), with the predicted step times."""
    results: dict[str, Any] = {"settings": {"presets": PRESETS, "seq_len": 4096, "topology": "v5p:2x2x1"}}
    tables, steps = {}, {}
    for fam in PRESETS:
        c = compile_full_depth(fam, args.reuse_dump)
        prog = Program(c.pop("hlo"))
        layers = c["num_layers"]
        per: dict[tuple[str, str], Cost] = collections.defaultdict(Cost)
        for comp, ins, times in prog.executed():
            cost = prog.instr_cost(comp, ins)
            if cost is None:
                continue
            phase, scope = classify(ins)
            if times == layers and scope == "loss vocab-tile loop":  # unscoped work of the scanned layers
                scope = "layer (unscoped)"
            per[(phase, scope)].add(cost, times / layers if times == layers else times)
        tables[fam], steps[fam] = per, c["predicted"]["step_s"]
        results[fam] = {
            **c,
            "by_scope": {
                f"{p}|{sc}": {**dataclasses.asdict(v), "seconds": seconds(v)} for (p, sc), v in per.items()
            },
        }
    results["wuneng_over_qwen2_step"] = steps["wuneng"] / steps["qwen2"]
    print(
        "\nFull-depth steps (scanned layers), the compiler's HLO costed by benchmarks/roofline.py (estimates):"
    )
    for fam in PRESETS:
        print(f"  {fam:7} predicted step {steps[fam] * 1e3:7.2f} ms")
    print(f"  wuneng / qwen2: {results['wuneng_over_qwen2_step']:.3f}x")
    print("\nPer scope and pass: the layer loop's instructions per layer, the rest per step (MB, GFLOP, ms):")
    print(
        f"  {'pass':6} {'scope':30}" + "".join(f" | {f + ' MB':>11} {'GFLOP':>8} {'ms':>7}" for f in PRESETS)
    )
    for key in sorted(set(tables["qwen2"]) | set(tables["wuneng"])):
        cs = [tables[f].get(key, Cost()) for f in PRESETS]
        if all(c.bytes < 1e6 and c.flops < 1e8 for c in cs):
            continue
        print(
            f"  {key[0]:6} {key[1]:30}"
            + "".join(f" | {c.bytes / 1e6:11.1f} {c.flops / 1e9:8.2f} {seconds(c) * 1e3:7.3f}" for c in cs)
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.json}")
    return 0


def compile_isolated(family: str, reuse: bool) -> dict[str, Any]:
    """One decoder layer alone on one v5p chip: forward, remat recomputation and backward of
    ``layer(h, ctx).h`` (``jax.checkpoint`` as ``remat=full`` wraps it; gradients for the float32
    parameters and the input), at the per-chip shapes of the train step (one 4096-token sequence, bfloat16
    compute, splash attention, Pallas ``wkv7``). No FSDP collectives, optimizer, embedding or loss."""
    dump = DUMPS / f"{family}_isolated"
    meta_path = dump / "cost.json"
    cached = _cached_dump(dump, "jit_layer_grad", reuse)
    if cached is not None:
        return cached
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.aot.compile import tpu_model_config
    from train.aot.topology import topology_devices
    from wuneng_jax import config as mc
    from wuneng_jax.layers.context import LayerContext
    from wuneng_jax.models import build_model

    scope_qwen2_modules()
    t = 4096
    cfg = dc.replace(mc.preset(PRESETS[family]), num_layers=1, dtype="bfloat16")
    cfg, _ = tpu_model_config(cfg, t)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    layer = model.layers.view(0)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    dev = topology_devices("v5p:2x2x1")[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    params, rest = jax.tree.map(spec, params), jax.tree.map(spec, rest)
    h = jax.ShapeDtypeStruct((1, t, cfg.hidden_size), jnp.bfloat16, sharding=sh)
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=sh)

    def layer_grad(params, rest, h, tokens):
        segment_ids, _, rope = model.prepare(tokens)
        ctx = LayerContext(rope, segment_ids)

        @jax.checkpoint
        def f(p, x):
            return nnx.merge(graphdef, p, rest)(x, ctx).h

        out, vjp = jax.vjp(f, params, h)
        return vjp(out)

    t0 = time.perf_counter()
    lowered = jax.jit(layer_grad).trace(params, rest, h, tokens).lower()
    compiled = lowered.compile(compiler_options={"xla_dump_to": str(dump), "xla_dump_hlo_as_text": True})
    meta = cost_meta(compiled, t0)
    meta_path.write_text(json.dumps(meta))
    hlo = next(iter(sorted(dump.glob("*jit_layer_grad*.after_optimizations.txt"))))
    print(
        f"  compiled one {family} layer alone in {meta['compile_s']} s: {meta['flops']:.4g} FLOPs, "
        f"{meta['bytes_accessed']:.4g} B, optimal {meta['optimal_seconds'] * 1e3:.2f} ms",
        flush=True,
    )
    return {**meta, "hlo": hlo.read_text()}


def compile_components() -> dict[str, dict[str, float]]:
    """The compiler's cost analysis of the WuNeng layer's parts alone (forward + backward, one v5p chip,
    per-chip shapes), next to the plain output projection they replace or add to: seconds each to compile,
    so a change to one part can be checked before a whole-step compile."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.aot.compile import tpu_model_config
    from train.aot.topology import topology_devices
    from wuneng_jax import config as mc
    from wuneng_jax.layers.linear import linear
    from wuneng_jax.layers.packing import document_starts
    from wuneng_jax.models import build_model
    from wuneng_jax.models import wuneng_layer as W

    t = 4096
    cfg, _ = tpu_model_config(dc.replace(mc.preset(PRESETS["wuneng"]), num_layers=1, dtype="bfloat16"), t)
    sh = jax.sharding.SingleDeviceSharding(topology_devices("v5p:2x2x1")[0])
    spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    params = jax.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)).layers.view(0).self_attn.params())
    params = jax.tree.map(lambda x: spec(x.shape, x.dtype), params)
    b, hh, g, hd, d = 1, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    parts = {
        "o_proj (qwen2)": (lambda p, a: linear(a.reshape(b, t, -1), p["o_kernel"]), [spec((b, t, hh, hd))]),
        "state_query": (W.query_with_state, [spec((b, t, hh, hd)), spec((b, t, g, hd))]),
        "fusion": (
            lambda p, a, r: W.fuse_heads(p, a, r, cfg=cfg),
            [spec((b, t, hh, hd)), spec((b, t, g, hd))],
        ),
        "state_read": (
            lambda p, u, k, v, seg: W.state_read(p, u, k, v, cfg=cfg, reset=document_starts(seg))[0],
            [spec((b, t, d)), spec((b, t, g, hd)), spec((b, t, g * hd)), spec((b, t), jnp.int32)],
        ),
    }
    out = {}
    for name, (f, xs) in parts.items():

        def grads(p, *x, f=f, name=name):
            n = len(x) - (1 if name == "state_read" else 0)
            fixed = x[n:]
            y, vjp = jax.vjp(lambda p, *v: f(p, *v, *fixed), p, *x[:n])
            return vjp(jnp.ones_like(y))

        compiled = jax.jit(grads).trace(params, *xs).lower().compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out[name] = {
            k.replace(" ", "_"): float(cost.get(k, 0.0))
            for k in ("flops", "bytes accessed", "optimal_seconds")
        }
        c = out[name]
        print(
            f"  {name:16} {c['flops'] / 1e9:7.2f} GFLOP {c['bytes_accessed'] / 1e6:8.1f} MB "
            f"optimal {c['optimal_seconds'] * 1e3:6.3f} ms",
            flush=True,
        )
    return out


def seconds(cost: Cost, chip: str = "v5p") -> float:
    peak, bw = CHIPS[chip].peak_flops, CHIPS[chip].hbm_bandwidth
    return max(cost.flops / peak, cost.bytes / bw)


COMPILER_KEYS = ("flops", "bytes_accessed", "optimal_seconds", "transcendentals")


def per_layer_compiler(totals: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """One layer's share of the compiler's cost analysis per family: the difference of two depths; a family
    compiled at one depth only is taken relative to its twin at that depth (their embedding, loss and
    optimizer of non-layer parameters are the same program: same vocabulary and width)."""
    out: dict[str, dict[str, float]] = {}
    for fam, by_depth in totals.items():
        ds = sorted(by_depth)
        if len(ds) > 1:
            lo, hi = ds[0], ds[-1]
            out[fam] = {k: (by_depth[hi][k] - by_depth[lo][k]) / (hi - lo) for k in COMPILER_KEYS}
            out[fam]["method"] = f"({hi}-layer - {lo}-layer) / {hi - lo}"
    for fam, by_depth in totals.items():
        if fam in out:
            continue
        twin = next((f for f in out if f != fam), None)
        d = sorted(by_depth)[0]
        if twin is None or d not in totals[twin]:
            continue
        out[fam] = {k: out[twin][k] + (by_depth[d][k] - totals[twin][d][k]) / d for k in COMPILER_KEYS}
        out[fam]["method"] = f"{twin} per layer + ({fam} - {twin}) at {d} layer(s) / {d}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="depths to compile")
    ap.add_argument(
        "--wuneng-layers",
        type=int,
        nargs="+",
        help="depths for wuneng only (default --layers); one depth is compared with qwen2 at that depth",
    )
    ap.add_argument("--families", nargs="+", default=["qwen2", "wuneng"], choices=list(PRESETS))
    ap.add_argument(
        "--reuse-dump", action="store_true", help=f"re-read the HLO kept under {DUMPS} when present"
    )
    ap.add_argument("--variant", default="", help="names the wuneng dumps (e.g. before, after)")
    ap.add_argument("--isolated", action="store_true", help="also compile one layer alone on one chip")
    ap.add_argument(
        "--components",
        action="store_true",
        help="only the WuNeng layer's parts alone (fast; see compile_components)",
    )
    ap.add_argument(
        "--full-depth",
        action="store_true",
        help="the scanned full-depth steps instead: per-scope table per layer and the predicted step times",
    )
    ap.add_argument("--top", type=int, default=15, help="largest single instructions listed per family")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    platform_defaults()
    if args.full_depth:
        return full_depth(args)
    if args.components:
        scope_qwen2_modules()
        print("WuNeng layer parts alone, forward + backward, one v5p chip (the compiler's cost analysis):")
        parts = compile_components()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"components": parts}, indent=1))
        return 0
    depth_of = {
        f: sorted(set(args.wuneng_layers if f == "wuneng" and args.wuneng_layers else args.layers))
        for f in args.families
    }
    results: dict[str, Any] = {
        "settings": {
            "presets": PRESETS,
            "seq_len": 4096,
            "topology": "v5p:2x2x1",
            "global_batch_size": 4,
            "dtype": "bfloat16",
            "remat": "full",
            "mesh": "data=1 fsdp=4",
            "depths": depth_of,
            "variant": args.variant,
            "chip_roofline": {
                "peak_flops": CHIPS["v5p"].peak_flops,
                "hbm_bytes_per_s": CHIPS["v5p"].hbm_bandwidth,
            },
        },
        "families": {},
    }
    one_layer: dict[str, dict[tuple[str, str], Cost]] = {}
    totals: dict[str, dict[int, dict[str, float]]] = {}
    for fam in args.families:
        totals[fam] = {}
        fam_res: dict[str, Any] = {"totals": {}}
        for n in depth_of[fam]:
            c = compile_family(fam, n, args.reuse_dump, args.variant)
            prog = Program(c.pop("hlo"))
            totals[fam][n] = c
            fam_res["totals"][str(n)] = c
            if n == depth_of[fam][0]:
                one_layer[fam] = table(prog)
                fam_res["largest_instructions"] = top_fusions(prog, args.top)
                fam_res["by_scope_depth"] = n
        if args.isolated:
            c = compile_isolated(fam, args.reuse_dump)
            prog = Program(c.pop("hlo"))
            fam_res["isolated_layer"] = {
                "compiler": c,
                "by_scope": {
                    f"{p}|{sc}": dataclasses.asdict(v) for (p, sc), v in sorted(table(prog).items())
                },
            }
        results["families"][fam] = fam_res
    per_layer = per_layer_compiler(totals)
    for fam, v in per_layer.items():
        results["families"][fam]["per_layer_compiler"] = v
    fams = list(one_layer)
    for fam in fams:
        results["families"][fam]["by_scope"] = {
            f"{p}|{sc}": {**dataclasses.asdict(c), "seconds": seconds(c)}
            for (p, sc), c in sorted(one_layer[fam].items())
        }

    # ---- print
    print("\nPer layer, the compiler's cost analysis (XLA's estimates, not measurements):")
    for fam, c in per_layer.items():
        print(
            f"  {fam:7} {c['flops'] / 1e9:9.1f} GFLOP  {c['bytes_accessed'] / 1e9:8.2f} GB  "
            f"optimal {c['optimal_seconds'] * 1e3:6.3f} ms   [{c['method']}]"
        )
    if "qwen2" in per_layer and "wuneng" in per_layer:
        ratio = per_layer["wuneng"]["optimal_seconds"] / per_layer["qwen2"]["optimal_seconds"]
        results["wuneng_over_qwen2_per_layer"] = ratio
        print(f"  wuneng / qwen2 per layer: {ratio:.3f}x")
    for fam in fams:
        for n, c in sorted(totals[fam].items()):
            print(
                f"  {fam:7} whole step, {n} layer(s): {c['flops'] / 1e9:9.1f} GFLOP {c['bytes_accessed'] / 1e9:8.2f} GB "
                f"optimal {c['optimal_seconds'] * 1e3:6.3f} ms"
            )
    print(
        "\nBy pass and scope, the step at "
        + ", ".join(f"{f} {results['families'][f]['by_scope_depth']} layer(s)" for f in fams)
        + " (HLO instructions x trips; MB, GFLOP, roofline ms at v5p peak / HBM bandwidth):"
    )
    print(f"  {'pass':6} {'scope':30}" + "".join(f" | {f + ' MB':>11} {'GFLOP':>8} {'ms':>7}" for f in fams))
    keys = sorted({k for f in fams for k in one_layer[f]})
    sums = {f: Cost() for f in fams}
    for k in keys:
        cs = [one_layer[f].get(k, Cost()) for f in fams]
        for f, c in zip(fams, cs, strict=True):
            sums[f].add(c)
        if all(c.bytes < 1e6 and c.flops < 1e8 for c in cs):
            continue
        print(
            f"  {k[0]:6} {k[1]:30}"
            + "".join(f" | {c.bytes / 1e6:11.1f} {c.flops / 1e9:8.2f} {seconds(c) * 1e3:7.3f}" for c in cs)
        )
    print(
        f"  {'sum':6} {'':30}"
        + "".join(
            f" | {sums[f].bytes / 1e6:11.1f} {sums[f].flops / 1e9:8.2f} {seconds(sums[f]) * 1e3:7.3f}"
            for f in fams
        )
    )
    for fam in fams:
        print(f"\nLargest single instructions, {fam} (bytes over all trips):")
        for t in results["families"][fam]["largest_instructions"]:
            print(
                f"  {t['bytes'] / 1e6:9.1f} MB {t['flops'] / 1e9:8.2f} GF x{t['times']:g} {t['pass']:5} "
                f"{t['scope']:22} {t['opcode']:12} {t['shape'][:50]}"
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

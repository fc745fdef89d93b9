"""Predicted step time, tokens/s per chip and MFU of a compiled train step, from its optimized HLO.

The compiler's estimates, not measurements (no TPU is needed: libtpu's AOT compiler writes the HLO). XLA's own
``cost_analysis`` counts a ``while`` body once, whatever its trip count, so with the layer stack scanned it
misses all layers but one; here every executed instruction is costed and counted once per loop trip
(:class:`benchmarks.layer_traffic.Program`):

* an instruction's time is its roofline ``max(FLOPs / peak, bytes / HBM bandwidth)`` (bytes = operands +
  result in HBM, TPU tiled layouts; FLOPs = its dots and convolutions), summed with no overlap between
  instructions. Arrays the compiler placed on chip (memory space ``S(1)``, VMEM, filled by an async
  ``copy-start`` prefetch) are not HBM traffic for their readers; the prefetch itself reads HBM once and an
  eviction writes it once (:meth:`benchmarks.layer_traffic.Program.instr_cost`);
* a Pallas kernel that declares a ``pl.CostEstimate`` (``wkv7``, the middle heads) is costed by its
  declaration (its FLOPs; the larger of its declared and its operand + result bytes);
* kernels without one (splash attention in jax 0.10.2: forward, dQ, dK/dV) are costed together as
  ``max(their bytes / HBM bandwidth, causal attention FLOPs / peak)``, the attention FLOPs being forward +
  the remat recomputation + backward: ``8 · L · H · D · T`` per token (``train.metrics``' ``6 · L · H · D · T``
  plus the recomputed forward);
* collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute) move their result's
  bytes over the inter-chip interconnect at the chip's ICI bandwidth, not overlapped with compute.

``step_s`` = the three summed: an estimate that assumes no overlap of communication and compute, and peak
MXU and HBM rates within each instruction. MFU = model FLOPs (``train.metrics.flops_per_token``: forward +
backward, remat recomputation not counted) per step / (chips · peak · ``step_s``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.layer_traffic import COLLECTIVES, DECLARED, Program  # noqa: E402

#: the costing rules' version, stored with every prediction; 2: on-chip (``S(1)``) arrays are not HBM traffic
#: and a stacked operand sliced in a nested fusion costs its slice (version 1 counted both in full); 3: a while
#: loop's trip count from its own counter arithmetic (the SPMD partitioner's windowed collective-matmul loops,
#: ``u32`` counters stepping by 2, were counted once: their matmuls' FLOPs halved under FSDP over 8+ chips)
ROOFLINE_VERSION = 3


def costed_as_current(prediction: Mapping[str, Any], chips: int) -> bool:
    """Whether a stored prediction follows this version's rules: made under it, or under version 2 on at most
    4 chips, where the compiler emitted no windowed loops at the fit table's shapes (all such cells' FLOPs are
    1.18-1.36x the model FLOPs; on 8 or more chips version 2 gave 0.69-1.14x)."""
    version = prediction.get("roofline", 1)
    return version == ROOFLINE_VERSION or (version == 2 and chips <= 4)


def is_collective(opcode: str) -> bool:
    return any(opcode == c or opcode.startswith(c + "-") for c in COLLECTIVES) and not opcode.endswith(
        "-done"
    )


def predict(
    hlo_text: str,
    *,
    peak_flops: float,
    hbm_bandwidth: float,
    ici_bandwidth: float,
    attention_flops: float,
) -> dict[str, float]:
    """The roofline terms of one chip's program (module docstring); ``attention_flops``: per chip per step,
    the FLOPs of the kernels that declare no cost (splash attention)."""
    program = Program(hlo_text)
    ops_s = flops = hbm_bytes = ici_bytes = uncosted_bytes = 0.0
    kernels = uncosted_kernels = 0
    for comp, ins, times in program.executed():
        cost = program.instr_cost(comp, ins)
        if cost is None:
            continue
        if is_collective(ins.opcode):
            ici_bytes += ins.out_bytes * times
            continue
        f, b = cost.flops, cost.bytes
        if "tpu_custom_call" in ins.attrs:
            if DECLARED.search(ins.attrs) is None:
                uncosted_bytes += b * times
                uncosted_kernels += 1
                continue
            kernels += 1  # instr_cost took its declared cost
        flops += f * times
        hbm_bytes += b * times
        ops_s += max(f / peak_flops, b / hbm_bandwidth) * times
    uncosted_s = (
        max(uncosted_bytes / hbm_bandwidth, attention_flops / peak_flops) if uncosted_kernels else 0.0
    )
    ici_s = ici_bytes / ici_bandwidth
    return {
        "step_s": ops_s + uncosted_s + ici_s,
        "ops_s": ops_s,
        "uncosted_kernels_s": uncosted_s,
        "ici_s": ici_s,
        "flops": flops + (attention_flops if uncosted_kernels else 0.0),
        "hbm_bytes": hbm_bytes + uncosted_bytes,
        "ici_bytes": ici_bytes,
        "declared_kernels": kernels,
        "uncosted_kernels": uncosted_kernels,
        "roofline": ROOFLINE_VERSION,
    }


def speed(
    roofline: dict[str, float], *, model_flops_per_token: float, tokens_per_chip: int, peak_flops: float
) -> dict[str, Any]:
    """Predicted tokens/s per chip and MFU from :func:`predict`'s ``step_s``."""
    step = roofline["step_s"]
    return {
        "step_s": step,
        "tokens_per_s_per_chip": tokens_per_chip / step if step > 0 else None,
        "mfu": model_flops_per_token * tokens_per_chip / (peak_flops * step) if step > 0 else None,
    }

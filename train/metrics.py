"""Training metrics: model FLOPs and MFU, device peak FLOP/s, JSONL + TensorBoard writers, progress bar.

Model FLOPs per trained token (``docs/mfu.md`` has the derivation)::

    F = 6 · N_matmul                          dense matmuls, forward + backward (2 + 4 FLOPs per weight)
      + 6 · L_attn · H · D · T                causal attention scores and weighted values
      + 24 · L_state · S · N²                 RWKV-7 / WuNeng state recurrence

- ``N_matmul``: parameters used in matmuls = all parameters minus the input embedding table (a
  lookup costs no FLOPs), plus ``V · d`` again when the output head is tied to that table.
- Attention, per layer and token, forward: ``q kᵀ`` and ``A v`` each cost ``2 · H · D`` FLOPs per
  attended position; causal attention attends to ``(T + 1) / 2 ≈ T / 2`` positions on average, so
  ``2 · H · D · T`` forward and ``6 · H · D · T`` forward + backward (×3). This is PaLM's
  ``12 · L · H · D · T`` halved for the causal mask (MaxText's convention since its PR #1988). ``T``
  is the training row length: packed documents attend to less, which the formula ignores (it
  counts the row as one causal sequence, slightly overcounting).
- RWKV-7 state, per layer, state head and token, forward (state ``S`` is ``N × N``):
  ``S a`` (2N²), ``S += (S a) bᵀ`` (2N²), ``S += v kᵀ`` (2N²), ``o = S r`` (2N²) = ``8 · N²``; the
  elementwise decay ``S · diag(w)`` (N²) is not counted (like norms and activations). ×3 for
  forward + backward: ``24 · S · N²`` per layer. This is the same convention MaxText uses for the
  gated-delta-net recurrence (8 · H · Dk · Dv forward). Chunked kernels execute more FLOPs than
  this (intra-chunk attention-like products); MFU counts the model's FLOPs, not the kernel's.

MFU = F · (tokens/s) / (number of devices · peak FLOP/s per device), with the dense bf16 peak from
:data:`PEAK_FLOPS` (CPU and unknown devices: MFU is reported as n/a).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_clock = time.perf_counter

# Dense bf16 peak FLOP/s per device (not the 2:4-sparse figures). Matched against
# ``device.device_kind`` (lower-cased), first match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("tpu v4", 275e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind; None when unknown (CPU)."""
    kind = device_kind.lower()
    if "cpu" in kind:
        return None
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


@dataclasses.dataclass(frozen=True)
class FlopsDims:
    """The model dimensions the FLOPs formula needs (see the module docstring)."""

    n_params: int  # all parameters
    n_embedding_lookup: int  # parameters of the input embedding table (V · d)
    tied_head: bool  # output head reuses the embedding table
    attn_layers: int = 0
    attn_heads: int = 0
    attn_head_dim: int = 0
    state_layers: int = 0
    state_heads: int = 0
    state_dim: int = 0

    @property
    def n_matmul(self) -> int:
        return self.n_params - self.n_embedding_lookup + (self.n_embedding_lookup if self.tied_head else 0)


def flops_per_token(dims: FlopsDims, seq_len: int) -> dict[str, float]:
    """Training (forward + backward) FLOPs per token, by term, and their ``total``."""
    dense = 6.0 * dims.n_matmul
    attention = 6.0 * dims.attn_layers * dims.attn_heads * dims.attn_head_dim * seq_len
    state = 24.0 * dims.state_layers * dims.state_heads * dims.state_dim**2
    return {"dense": dense, "attention": attention, "state": state, "total": dense + attention + state}


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def flops_dims(model_cfg: Any, n_params: int) -> FlopsDims:
    """Dimensions of a model config for the FLOPs formula.

    A config may define ``flops_dims() -> dict`` (keys of :class:`FlopsDims` except ``n_params``);
    otherwise the qwen2 / rwkv7 / wuneng field names are read.
    """
    if hasattr(model_cfg, "flops_dims"):
        return FlopsDims(n_params=n_params, **model_cfg.flops_dims())
    family = str(_get(model_cfg, "family", default=type(model_cfg).__name__)).lower()
    vocab = int(_get(model_cfg, "vocab_size", default=0))
    width = int(_get(model_cfg, "hidden_size", "n_embd", "d_model", default=0))
    tied = bool(_get(model_cfg, "tie_word_embeddings", "tie_embeddings", default=False))
    base = dict(n_params=n_params, n_embedding_lookup=vocab * width, tied_head=tied)
    if "rwkv" in family:
        n = int(_get(model_cfg, "head_size", default=64))
        return FlopsDims(
            **base,
            state_layers=int(_get(model_cfg, "n_layer", "num_layers", default=0)),
            state_heads=width // n if n else 0,
            state_dim=n,
        )
    layers = int(_get(model_cfg, "num_layers", "n_layer", default=0))
    heads = int(_get(model_cfg, "num_heads", "num_attention_heads", default=0))
    head_dim = int(_get(model_cfg, "head_dim", default=(width // heads if heads else 0)))
    dims = dict(attn_layers=layers, attn_heads=heads, attn_head_dim=head_dim)
    if "wuneng" in family:
        hybrid = _get(model_cfg, "num_hybrid_layers")
        if hybrid is None:
            sel = _get(model_cfg, "hybrid_layers")
            hybrid = len(sel) if isinstance(sel, list | tuple) else layers
        s = int(_get(model_cfg, "state_heads", "num_state_heads", "num_kv_heads", default=heads))
        dims.update(
            state_layers=int(hybrid),
            state_heads=s,
            state_dim=int(_get(model_cfg, "state_dim", "state_size", "state_head_dim", default=head_dim)),
        )
    return FlopsDims(**base, **dims)


# --------------------------------------------------------------------------------------------
# Throughput


class Throughput:
    """Tokens/s, step time, TFLOP/s per device and MFU over a window of steps."""

    def __init__(
        self, flops_per_token: float, tokens_per_step: int, n_devices: int, peak_flops: float | None
    ):
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.n_devices = n_devices
        self.peak = peak_flops
        self._t0: float | None = None
        self._steps = 0

    def start(self) -> None:
        self._t0 = _clock()
        self._steps = 0

    def tick(self, steps: int = 1) -> None:
        self._steps += steps

    def read(self) -> dict[str, float] | None:
        """Metrics of the window since ``start`` (and restart it); None when empty."""
        if self._t0 is None or self._steps == 0:
            self.start()
            return None
        dt = _clock() - self._t0
        steps = self._steps
        self.start()
        tokens_s = steps * self.tokens_per_step / dt
        tflops = self.flops_per_token * tokens_s / self.n_devices / 1e12
        out = {
            "step_time_s": dt / steps,
            "tokens_per_s": tokens_s,
            "tokens_per_s_per_device": tokens_s / self.n_devices,
            "tflops_per_device": tflops,
        }
        if self.peak:
            out["mfu"] = tflops * 1e12 / self.peak
        return out


# --------------------------------------------------------------------------------------------
# Writers


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends ``{"step": s, "kind": ..., **values}`` lines to ``metrics.jsonl`` and scalars to
    TensorBoard (``tb/``, tag ``kind/name``). Only the primary process writes."""

    def __init__(
        self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True, primary: bool = True
    ):
        self.run_dir = Path(run_dir)
        self.primary = primary
        self.path = self.run_dir / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        if not primary:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX is not installed; TensorBoard logging is off")

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if not self.primary:
            return
        if self._jsonl is not None:
            record = {"step": int(step), "kind": kind, **{k: _clean(v) for k, v in values.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drop records with ``step > last_step`` (steps that ran after the checkpoint a run resumes
    from), so ``metrics.jsonl`` reads as one consistent history."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (optionally of one kind)."""
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def format_line(step: int, total: int, values: Mapping[str, Any]) -> str:
    """One human-readable log line."""
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("lr", "lr {:.2e}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("tflops_per_device", "{:.3g} TFLOP/s/dev"),
        ("mfu", "MFU {:.1%}"),
        ("step_time_s", "{:.3f} s/step"),
    ):
        if key in values:
            parts.append(fmt.format(values[key]))
    if "tflops_per_device" in values and "mfu" not in values:
        parts.append("MFU n/a")
    if values.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)

"""wkv7 on an accelerator: impl="pallas" vs impl="chunked" (XLA) vs fla's Triton ``chunk_rwkv7``, same device,
same run, forward and forward+backward, with the FLOP and byte floors of the problem and the achieved fraction.

    python benchmarks/wkv7_gpu.py                       # B=8 T=4096 H=64 N=64, bf16 inputs (the benchmark shape)
    python benchmarks/wkv7_gpu.py --smoke               # tiny shape, runs anywhere (CPU: Pallas interpreter)
    python benchmarks/wkv7_gpu.py --chunk-size 32 --num-warps 8 --num-stages 2
    python benchmarks/wkv7_gpu.py --sweep               # + the fused kernel over chunk / warps / stages

Columns: ``pallas`` (what ``wkv7(impl="pallas")`` computes: the fused chunk kernels, Triton on GPU, Mosaic on
TPU), ``chunked`` (``wkv7(impl="chunked")``: the chunked form in XLA), ``fla`` / ``fla-lb`` (fla's
``chunk_rwkv7`` with default settings / with ``lower_bound=-e^{-1/2}``, the setting fla's RWKV-7 layer uses;
skipped with a printed note when ``fla`` / ``torch`` / CUDA are missing). Before timing, outputs are checked: pallas
vs the sequential reference on one batch row and 8 heads (float32, full T), pallas vs chunked and vs fla on
the whole input. Timings: ``--warmup`` calls then the median of ``--reps`` (JAX: blocked until ready; torch:
``cuda.synchronize``). Forward+backward = the gradient of ``Σ o ⊙ do`` w.r.t. r, log_w, k, v, a, b.

FLOP floor: the sequential recurrence, counted as in ``docs/mfu.md`` (the MaxText convention the MFU metric
uses), per token and head with N = head size::

    forward   S a (2N²) ; + (S a) bᵀ (2N²) ; + v kᵀ (2N²) ; o = S r (2N²)                            =  8 N²
    fwd+bwd   3 x forward                                                                          = 24 N²

i.e. 68.7 / 206.2 GFLOP at B=8 T=4096 H=64 N=64. (Counting the decay S ⊙ w (N²) and the backward product by
product — ∂S += ∂o rᵀ, ∂r, ∂v, ∂k, ∂sa = ∂S b, ∂b, ∂w = Σ_i ∂S ⊙ S_{t-1}, ∂a at 2N² each, ∂S_{t-1} = ∂S ⊙ w
+ ∂sa aᵀ at 3N² — gives 9 N² and 28 N²; the floor keeps the lower, conventional count.) The chunked
algorithms do more arithmetic than this (they trade FLOPs for parallelism), so a fraction of peak computed
from the floor is a lower bound of the hardware's real utilisation.

Byte floor (compulsory HBM traffic: each input read once, each output written once; bf16 = 2 bytes, the
final state float32)::

    forward   read r, log_w, k, v, a, b + write o            = 7 · 2 · BTHN  + write S_T  4 · B H N²
    fwd+bwd   read r, log_w, k, v, a, b, do + write 6 grads  = 13 · 2 · BTHN

i.e. 1.888 GB / 3.490 GB at the default shape. Anything an implementation stores between stages (per-chunk
states, WY factors, ...) is excess traffic on top of this floor.

Achieved fraction = (floor / median time) / peak, against the vendor's dense bf16 tensor peak, the float32
non-tensor peak and the HBM bandwidth of the device (table ``PEAKS``, matched on ``device_kind``; override with
``--peak-bf16-tflops`` / ``--peak-f32-tflops`` / ``--peak-hbm-gbps``). Results go to
``benchmarks/results/wkv7_gpu_<platform>.json`` with the device name and date (``--smoke`` writes to a temporary
directory instead, so a smoke run leaves no result file behind).

The chunked XLA form's exact pairwise fallback (taken only when some |log_w| exceeds the factored bound, never
for RWKV-7 decays) is compiled next to its matmul path inside a ``lax.cond``; at large shapes its buffers can
exceed the device memory. The script compiles the chunked column first and, when the compiled temporaries do
not fit, re-runs it with the matmul path only (valid here: the benchmark's ``log_w`` lies in
``(-e^{-1/2}, 0)``) and records that (``stage_a``; ``--stage-a matmul`` forces it). The fused kernel has no
such fallback: it is exact for every decay.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.util
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager

os.environ.setdefault(
    "XLA_PYTHON_CLIENT_PREALLOCATE", "false"
)  # share the GPU with torch (fla) in one process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from pallas_kernels import wkv7  # noqa: E402
from pallas_kernels import wkv7_chunked as chunked_mod  # noqa: E402
from pallas_kernels.wkv7_chunked import wkv7_chunked  # noqa: E402
from pallas_kernels.wkv7_fused import DEFAULT_CHUNK, FusedConfig, wkv7_fused  # noqa: E402

LOG_W_MIN = -float(np.exp(-0.5))  # RWKV-7: log w = -e^{-1/2} sigmoid(.) lies in (-0.6065, 0)
# Vendor spec sheets (dense, no sparsity): bf16 tensor TFLOP/s, f32 non-tensor TFLOP/s, HBM GB/s. First match wins.
PEAKS = (
    ("H100 PCIe", 756.0, 51.2, 2000.0),
    ("H100 NVL", 835.0, 60.0, 3900.0),
    ("H100", 989.4, 66.9, 3350.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4, 66.9, 4800.0),
    ("A100", 312.0, 19.5, 2039.0),
    ("TPU v4", 275.0, None, 1228.0),
    ("TPU v5 lite", 197.0, None, 819.0),
    ("TPU v5e", 197.0, None, 819.0),
    ("TPU v5", 459.0, None, 2765.0),  # v5p
    ("TPU v6 lite", 918.0, None, 1640.0),
    ("TPU v6e", 918.0, None, 1640.0),
)


# ------------------------------------------------------------------------------------------------ floors


def flop_floor(bsz: int, seq_len: int, heads: int, n: int) -> dict[str, float]:
    token_heads = bsz * seq_len * heads
    return {"fwd": 8.0 * n * n * token_heads, "fwd_bwd": 24.0 * n * n * token_heads}


def byte_floor(bsz: int, seq_len: int, heads: int, n: int, itemsize: int = 2) -> dict[str, float]:
    elems = bsz * seq_len * heads * n
    return {"fwd": 7.0 * itemsize * elems + 4.0 * bsz * heads * n * n, "fwd_bwd": 13.0 * itemsize * elems}


def device_peaks(kind: str, args) -> dict[str, float | None]:
    bf16 = f32 = hbm = None
    for key, p_bf16, p_f32, p_hbm in PEAKS:
        if key.lower() in kind.lower():
            bf16, f32, hbm = p_bf16, p_f32, p_hbm
            break
    return {
        "bf16_tflops": args.peak_bf16_tflops or bf16,
        "f32_tflops": args.peak_f32_tflops or f32,
        "hbm_gbps": args.peak_hbm_gbps or hbm,
    }


# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(bsz: int, seq_len: int, heads: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """RWKV-7-like float32 numpy inputs [B,T,H,N] (rounded to bf16 by the callers) and a cotangent ``do``."""
    rng = np.random.default_rng(seed)
    shape = (bsz, seq_len, heads, n)
    normal = lambda: rng.standard_normal(shape, dtype=np.float32)
    kk = normal()
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = 1 / (1 + np.exp(-normal()))
    # in (-e^{-1/2}, 0) and still >= -e^{-1/2} after bf16 rounding (fla's lower_bound asserts it)
    log_w = np.maximum(LOG_W_MIN / (1 + np.exp(-2 * normal())), -0.6)
    xs = {
        "r": normal() * 0.5,
        "log_w": log_w,
        "k": normal() * 0.5,
        "v": normal() * 0.5,
        "a": -kk,
        "b": kk * iclr,
    }
    xs["do"] = normal()
    return {name: x.astype(np.float32) for name, x in xs.items()}


NAMES = ("r", "log_w", "k", "v", "a", "b")
CHECK_TOL = {  # max|Δ| / max|ref|; fla (bf16 intermediates) is reported, not judged
    "pallas_vs_chunked_o": 8e-3,  # bf16 outputs: one rounding (2^-8) apart at most
    "pallas_vs_chunked_state": 1e-5,
    "pallas_vs_reference_o_f32": 1e-5,
    "pallas_vs_reference_state_f32": 1e-5,
}


# ------------------------------------------------------------------------------------------------ JAX columns


@contextmanager
def stage_a_matmul_only(enabled: bool):
    """Pin stage A to its matmul (factored) path: drops the pairwise fallback's buffers from the program."""
    original = chunked_mod._interaction_matrices
    if enabled:
        chunked_mod._interaction_matrices = chunked_mod._interaction_matrices_factored
    try:
        yield
    finally:
        chunked_mod._interaction_matrices = original


def jax_op(impl: str, chunk: int, cfg: FusedConfig | None) -> Callable:
    """``(r, log_w, k, v, a, b) -> (o, S_T)`` exactly as ``wkv7(impl=...)`` computes it (o in r's dtype), traced
    afresh each time: the public op's jit cache would keep the first stage-A variant of the chunked form."""

    def op(*xs):
        bsz, _, heads, n = xs[0].shape
        s0 = jnp.zeros((bsz, heads, n, n), jnp.float32)
        if impl == "chunked":
            o, s = wkv7_chunked(*[x.astype(jnp.float32) for x in xs], s0, None, chunk_size=chunk)
            return o.astype(xs[0].dtype), s
        return wkv7_fused(*xs, s0, None, chunk, cfg)  # bf16 in and out of the kernel

    return op


def jax_fns(op: Callable) -> tuple[Callable, Callable]:
    fwd = jax.jit(op)

    def loss(xs, do):
        return jnp.sum(op(*xs)[0].astype(jnp.float32) * do)

    fwd_bwd = jax.jit(lambda xs, do: jax.grad(loss)(xs, do))
    return (lambda xs, do: fwd(*xs)), fwd_bwd


def compiled_bytes(fn: Callable, *args) -> tuple[float, float | None]:
    """(bytes the compiled ``fn`` needs: temporaries + arguments + outputs, the device's memory limit or None)."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:  # CPU: nothing to check, skip the extra compile
        return 0.0, None
    mem = jax.jit(fn).trace(*args).lower().compile().memory_analysis()
    return float(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes), float(limit)


# ------------------------------------------------------------------------------------------------ fla column


def fla_columns(inputs: dict[str, np.ndarray], args) -> tuple[dict, dict, np.ndarray | None, str]:
    """Times fla's chunk_rwkv7 (default, and with lower_bound when supported). Returns (times, config, o, note)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("fla") is None:
        return {}, {}, None, "fla column skipped: torch / fla (pip install fla-core) not installed"
    import torch

    if not torch.cuda.is_available():
        return {}, {}, None, "fla column skipped: torch sees no CUDA device"
    from fla.ops.rwkv7 import chunk_rwkv7

    params = inspect.signature(chunk_rwkv7).parameters
    dev = torch.device("cuda")
    to_t = lambda x: torch.from_numpy(x).to(dev).to(torch.bfloat16)
    xs = {name: to_t(inputs[name]) for name in NAMES}
    do = to_t(inputs["do"])
    variants = {"fla": {}}
    if "lower_bound" in params:
        variants["fla-lb"] = {"lower_bound": LOG_W_MIN}

    def call(kw, grad: bool):
        t = {name: x.detach().requires_grad_(grad) for name, x in xs.items()}
        if "log_w" in params:  # some fla versions: chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, ...)
            o = chunk_rwkv7(r=t["r"], k=t["k"], v=t["v"], a=t["a"], b=t["b"], log_w=t["log_w"], **kw)
        else:  # fla-core 0.6: chunk_rwkv7(r, w, k, v, a, b, ...) with w the log decay
            o = chunk_rwkv7(t["r"], t["log_w"], t["k"], t["v"], t["a"], t["b"], **kw)
        o = o[0] if isinstance(o, tuple) else o
        if grad:
            torch.autograd.backward(o, do)
        return o

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    times, o_out = {}, None
    for label, kw in variants.items():
        with torch.no_grad():
            o = call(kw, grad=False)
        if o_out is None:
            o_out = o.float().cpu().numpy()
        times[label, "fwd"] = timed(lambda kw=kw: torch.no_grad()(call)(kw, False))
        times[label, "fwd_bwd"] = timed(lambda kw=kw: call(kw, True))
    import fla

    config = {
        "fla_version": getattr(fla, "__version__", "?"),
        "variants": {k: str(v) for k, v in variants.items()},
    }
    return times, config, o_out, ""


# ------------------------------------------------------------------------------------------------ main


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=None, help="pallas chunk (default: the platform's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--num-warps", type=int, default=4, help="GPU: Triton warps per program")
    p.add_argument("--num-stages", type=int, default=1, help="GPU: Triton pipeline stages")
    p.add_argument(
        "--stage-a",
        choices=("auto", "shipped", "matmul"),
        default="auto",
        help="auto: pin stage A to its matmul path only when the shipped program does not fit the device memory",
    )
    p.add_argument("--no-fla", action="store_true", help="skip the fla column")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks before timing")
    p.add_argument("--peak-bf16-tflops", type=float, default=None)
    p.add_argument("--peak-f32-tflops", type=float, default=None)
    p.add_argument("--peak-hbm-gbps", type=float, default=None)
    p.add_argument(
        "--sweep", action="store_true", help="also time the fused kernel over chunk / launch configs"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shape, 1 rep, results to a temporary directory")
    return p


def sweep_configs(target: str) -> list[tuple[int, FusedConfig]]:
    """(chunk, kernel config) pairs to time the fused kernel with (``--sweep``)."""
    if target == "tpu":
        return [(c, FusedConfig()) for c in (16, 32, 64, 128)]
    return [
        (c, FusedConfig(num_warps=warps, num_stages=stages))
        for c in (16, 32)
        for warps in (4, 8)
        for stages in (1, 2)
    ]


def main(
    argv=None,
    *,
    name: str = "wkv7_gpu",
    with_fla: bool = True,
    description: str = __doc__,
) -> dict:
    args = build_parser(description).parse_args(argv)
    target = "tpu" if jax.default_backend() == "tpu" else "gpu"  # the same harness times a TPU host
    if args.smoke:
        args.batch, args.seq_len, args.heads, args.head_size = 1, 100, 2, 32
        args.chunk_size, args.warmup, args.reps = 16, 1, 1
        common.RESULTS_DIR = tempfile.mkdtemp(prefix="wkv7_smoke_")
    bsz, seq_len, heads, n = args.batch, args.seq_len, args.heads, args.head_size
    chunk = args.chunk_size or DEFAULT_CHUNK[target]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {_dt.date.today()}")
    print(f"shape B={bsz} T={seq_len} H={heads} N={n}, bf16 inputs, chunk {chunk}", flush=True)
    cfg = FusedConfig(num_warps=args.num_warps, num_stages=args.num_stages)
    notes: list[str] = []
    inputs = make_inputs(bsz, seq_len, heads, n)

    times: dict = {}
    fla_cfg: dict = {}
    fla_o = None
    if with_fla and not args.no_fla:
        times, fla_cfg, fla_o, note = fla_columns(inputs, args)
        if not note:
            import torch

            torch.cuda.empty_cache()  # hand fla's cached memory back before the JAX columns
        if note:
            print(note)
            notes.append(note)
        for (label, mode), sec in sorted(
            times.items()
        ):  # printed now: kept in the log if a later part times out
            print(f"{label}: {mode} {sec * 1e3:.3f} ms", flush=True)

    xs = [jnp.asarray(inputs[k], jnp.bfloat16) for k in NAMES]
    do = jnp.asarray(inputs["do"])
    stage_a, outputs = {}, {}
    for label in ("pallas", "chunked"):
        op = jax_op(label, chunk if label == "pallas" else 16, cfg if label == "pallas" else None)
        matmul_only = False
        if label == "chunked":
            need, limit = compiled_bytes(jax_fns(op)[1], xs, do) if args.stage_a == "auto" else (0.0, None)
            matmul_only = args.stage_a == "matmul" or (limit is not None and need > 0.9 * limit)
            stage_a[label] = "as shipped (matmul path + pairwise fallback)"
            if matmul_only:
                why = (
                    f"with the pairwise fallback it needs {need / 1e9:.1f} GB" if need else "--stage-a matmul"
                )
                stage_a[label] = f"matmul path only ({why})"
                notes.append(f"{label}: stage A {stage_a[label]}")
                print(f"note: {label}: stage A {stage_a[label]}", flush=True)
        with stage_a_matmul_only(matmul_only):
            fwd, fwd_bwd = jax_fns(op)
            outputs[label] = jax.device_get(fwd(xs, do))
            for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                timing = common.time_fn(lambda fn=fn: fn(xs, do), warmup=args.warmup, reps=args.reps)
                times[label, mode] = timing["median_s"]
        print(
            f"{label}: fwd {times[label, 'fwd'] * 1e3:.3f} ms, fwd+bwd {times[label, 'fwd_bwd'] * 1e3:.3f} ms"
        )

    sweep = []
    if args.sweep:
        for sweep_chunk, kernel_cfg in sweep_configs(target)[: 2 if args.smoke else None]:
            fwd, fwd_bwd = jax_fns(jax_op("pallas", sweep_chunk, kernel_cfg))
            rec = {
                "chunk": sweep_chunk,
                "num_warps": kernel_cfg.num_warps,
                "num_stages": kernel_cfg.num_stages,
            }
            try:
                for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    timing = common.time_fn(lambda fn=fn: fn(xs, do), warmup=args.warmup, reps=args.reps)
                    rec[f"{mode}_ms"] = timing["median_s"] * 1e3
            except Exception as err:  # a config the compiler rejects (e.g. out of registers / shared memory)
                rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print("sweep", rec, flush=True)
            sweep.append(rec)

    checks = {}
    if not args.no_check:
        checks["pallas_vs_chunked_o"] = rel_err(outputs["pallas"][0], outputs["chunked"][0])
        checks["pallas_vs_chunked_state"] = rel_err(outputs["pallas"][1], outputs["chunked"][1])
        if fla_o is not None:
            checks["pallas_vs_fla_o"] = rel_err(outputs["pallas"][0], fla_o)
        # the sequential reference on one batch row and <= 8 heads, float32 (the bf16-rounded values), full T
        part = [x[:1, :, :8].astype(jnp.float32) for x in xs]
        ref_o, ref_s = jax.jit(functools.partial(wkv7, impl="reference"))(*part)
        pal_o, pal_s = jax.jit(jax_op("pallas", chunk, cfg))(*part)
        checks["pallas_vs_reference_o_f32"] = rel_err(pal_o, ref_o)
        checks["pallas_vs_reference_state_f32"] = rel_err(pal_s, ref_s)
        for key, val in checks.items():
            tol = CHECK_TOL.get(key)
            flag = "" if tol is None or val <= tol else f"  <-- MISMATCH (tolerance {tol:g})"
            print(f"check {key}: {val:.3g}{flag}")

    flops, nbytes = flop_floor(bsz, seq_len, heads, n), byte_floor(bsz, seq_len, heads, n)
    peaks = device_peaks(dev.device_kind, args)
    rows, records = [], []
    labels = [k for k in ("pallas", "chunked", "fla", "fla-lb") if (k, "fwd") in times]
    for label in labels:
        for mode in ("fwd", "fwd_bwd"):
            sec = times[label, mode]
            tflops = flops[mode] / sec / 1e12
            gbps = nbytes[mode] / sec / 1e9
            frac = lambda x, peak: (x / peak) if (x is not None and peak) else None
            rec = {
                "impl": label,
                "mode": mode,
                "median_ms": sec * 1e3,
                "floor_tflops": tflops,
                "frac_bf16_peak": frac(tflops, peaks["bf16_tflops"]),
                "frac_f32_peak": frac(tflops, peaks["f32_tflops"]),
                "floor_gbps": gbps,
                "frac_hbm_peak": frac(gbps, peaks["hbm_gbps"]),
            }
            records.append(rec)
            rows.append(["-" if v is None else v for v in rec.values()])
    print()
    print(f"wkv7 on {dev.device_kind}: B={bsz} T={seq_len} H={heads} N={n} bf16, median of {args.reps}")
    print(f"floors: fwd {flops['fwd'] / 1e9:.4g} GFLOP / {nbytes['fwd'] / 1e9:.4g} GB, ", end="")
    print(f"fwd+bwd {flops['fwd_bwd'] / 1e9:.4g} GFLOP / {nbytes['fwd_bwd'] / 1e9:.4g} GB; peaks {peaks}")
    common.print_table(list(records[0].keys()), rows)
    payload = {
        "config": vars(args),
        "kernel_config": {"chunk": chunk, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        "floors": {"flops": flops, "bytes": nbytes},
        "peaks": peaks,
        "stage_a": stage_a,
        "fla": fla_cfg,
        "checks": checks,
        "notes": notes,
        "rows": records,
        "sweep": sweep,
    }
    path = common.write_results(name, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()

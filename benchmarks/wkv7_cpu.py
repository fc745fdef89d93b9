"""wkv7 on CPU: chunked vs sequential reference, forward and forward+backward, same run.

    python benchmarks/wkv7_cpu.py [--seq-lens 256 1024 4096 16384] [--chunk-size 16]

Columns: ``reference`` (sequential scan), ``chunked`` (the chunked form: what ``auto`` ran on CPU before the
fused kernels) and ``auto`` (now: the scan for a forward-only call, the chunked form when differentiated), so the
CPU path before and after is compared in one run. Prints a table with ratios and writes
``benchmarks/results/wkv7_cpu_cpu.json``. Goals: chunked >= 5x faster than the scan at T=4096 forward+backward,
time linear in T; a forward-only ``auto`` call no slower than the scan.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table, time_fn, write_results  # noqa: E402
from pallas_kernels import wkv7  # noqa: E402


def make_inputs(bsz: int, seq_len: int, heads: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (bsz, seq_len, heads, n)
    kk = rng.standard_normal(shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = 1 / (1 + np.exp(-rng.standard_normal(shape)))
    log_w = -np.exp(-0.5) / (1 + np.exp(-2 * rng.standard_normal(shape)))
    arrays = (
        rng.standard_normal(shape) * 0.5,
        log_w,
        rng.standard_normal(shape) * 0.5,
        rng.standard_normal(shape) * 0.5,
        -kk,
        kk * iclr,
    )
    return [jnp.asarray(x, jnp.float32) for x in arrays]


def build(impl: str, chunk: int | None):
    fwd = jax.jit(functools.partial(wkv7, impl=impl, chunk_size=chunk))

    def loss(*xs):
        o, s = wkv7(*xs, impl=impl, chunk_size=chunk)
        return jnp.sum(o) + jnp.sum(s)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    return fwd, fwd_bwd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    impls = {
        "reference": build("reference", None),
        "chunked": build("chunked", args.chunk_size),
        "auto": build("auto", args.chunk_size),
    }
    rows, records = [], []
    for seq_len in args.seq_lens:
        xs = make_inputs(args.batch, seq_len, args.heads, args.head_size)
        res = {}
        for name, (fwd, fwd_bwd) in impls.items():
            res[name, "fwd"] = time_fn(lambda f=fwd, xs=xs: f(*xs), warmup=1, reps=args.reps)["median_s"]
            res[name, "fwd_bwd"] = time_fn(lambda f=fwd_bwd, xs=xs: f(*xs), warmup=1, reps=args.reps)[
                "median_s"
            ]
            print(
                f"T={seq_len} {name}: fwd {res[name, 'fwd'] * 1e3:.1f} ms, fwd+bwd {res[name, 'fwd_bwd'] * 1e3:.1f} ms",
                flush=True,
            )
        row = {
            "T": seq_len,
            "reference_fwd_ms": res["reference", "fwd"] * 1e3,
            "chunked_fwd_ms": res["chunked", "fwd"] * 1e3,
            "fwd_speedup": res["reference", "fwd"] / res["chunked", "fwd"],
            "reference_fwd_bwd_ms": res["reference", "fwd_bwd"] * 1e3,
            "chunked_fwd_bwd_ms": res["chunked", "fwd_bwd"] * 1e3,
            "fwd_bwd_speedup": res["reference", "fwd_bwd"] / res["chunked", "fwd_bwd"],
            "chunked_fwd_bwd_us_per_token": res["chunked", "fwd_bwd"] * 1e6 / (seq_len * args.batch),
            "auto_fwd_ms": res["auto", "fwd"] * 1e3,
            "auto_fwd_bwd_ms": res["auto", "fwd_bwd"] * 1e3,
            "auto_vs_chunked_fwd": res["chunked", "fwd"] / res["auto", "fwd"],
            "auto_vs_chunked_fwd_bwd": res["chunked", "fwd_bwd"] / res["auto", "fwd_bwd"],
        }
        records.append(row)
        rows.append(list(row.values()))
    print()
    print(
        f"wkv7 CPU, B={args.batch} H={args.heads} N={args.head_size} chunk={args.chunk_size}, median of {args.reps}"
    )
    print_table(list(records[0].keys()), rows)
    path = write_results("wkv7_cpu", {"config": vars(args), "rows": records})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

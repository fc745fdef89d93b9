"""wkv7(impl="pallas") on the default device against the independent float64 loop, every input family of
``tests/wkv7_cases.py`` (fresh and adversarial decays, resets), forward and all seven gradients.

    python benchmarks/wkv7_numerics.py            # on a GPU / TPU host: the compiled Triton / Mosaic kernels
    python benchmarks/wkv7_numerics.py --small    # CPU: the kernels through the Pallas interpreter

This is the on-hardware half of ``tests/test_wkv7_pallas.py`` (which runs the kernels interpreted on CPU): it
proves that the real compiler's code computes the same function. Prints one line per case and writes
``benchmarks/results/wkv7_numerics_<platform>.json`` with the device name. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from wkv7_cases import CASES, make_case, numpy_recurrence, rel_err  # noqa: E402

from benchmarks.common import print_table, write_results  # noqa: E402
from pallas_kernels import wkv7  # noqa: E402

TOL = {
    "fwd": 1e-5,
    "grad": 1e-4,
}  # float32 vs float64 truth (rwkv7-and-kernels.md §7.4); gradients: f32 autodiff


def _loss(impl, chunk, r, log_w, k, v, a, b, s0, co, cs, reset):
    o, s = wkv7(r, log_w, k, v, a, b, s0, reset=reset, impl=impl, chunk_size=chunk)
    return jnp.sum(o * co) + jnp.sum(s * cs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="B=1 T=40 H=2 N=32 (fast in the interpreter)")
    p.add_argument("--chunk-size", type=int, default=None)
    args = p.parse_args(argv)
    shape = (1, 40, 2, 32) if args.small else (2, 300, 8, 64)  # T not a multiple of any chunk
    bsz, seq_len, heads, n = shape
    fwd = jax.jit(functools.partial(wkv7, impl="pallas", chunk_size=args.chunk_size))
    argnums = tuple(range(7))
    grad = jax.jit(jax.grad(functools.partial(_loss, "pallas", args.chunk_size), argnums))
    rng = np.random.default_rng(0)
    rows, ok = [], True
    for i, name in enumerate(CASES):
        x = make_case(name, *shape, seed=i)
        reset = rng.random((bsz, seq_len)) < 0.02
        o_np, s_np = numpy_recurrence(*x, reset=reset)
        o, s = fwd(*x[:6], x[6], reset=jnp.asarray(reset))
        rec = {"case": name, "o": rel_err(o, o_np), "state": rel_err(s, s_np)}
        if i % 3 == 0:  # gradients on a third of the cases: against autodiff of the float64 scan, on the CPU
            co = rng.standard_normal((bsz, seq_len, heads, n)).astype(np.float32)
            cs = rng.standard_normal((bsz, heads, n, n)).astype(np.float32)
            got = grad(*[jnp.asarray(v) for v in (*x, co, cs)], jnp.asarray(reset))
            with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
                ref_grad = jax.grad(functools.partial(_loss, "reference", None), argnums)
                ref = ref_grad(*[jnp.asarray(v, jnp.float64) for v in (*x, co, cs)], jnp.asarray(reset))
            rec["grad"] = max(rel_err(g, gr) for g, gr in zip(got, ref, strict=True))
        rec["ok"] = (
            rec["o"] <= TOL["fwd"] and rec["state"] <= TOL["fwd"] and rec.get("grad", 0.0) <= TOL["grad"]
        )
        ok &= rec["ok"]
        rows.append(rec)
        print(rec, flush=True)
    dev = jax.devices()[0]
    print(f"\nwkv7 pallas vs float64 loop on {dev.device_kind}, B,T,H,N = {shape}, resets at 2 %")
    print_table(
        ["case", "o", "state", "grad", "ok"],
        [[r.get(k, "-") for k in ("case", "o", "state", "grad", "ok")] for r in rows],
    )
    path = write_results("wkv7_numerics", {"shape": shape, "tolerances": TOL, "rows": rows, "all_ok": ok})
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

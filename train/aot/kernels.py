"""The ``wkv7`` Pallas TPU kernels compiled (not only lowered) by the real TPU compiler for each generation.

Two checks per chip generation (v5e, v5p, v6e), each on a 4-chip slice with batch and heads sharded:

* ``op``: ``pallas_kernels.wkv7(..., impl="pallas")`` forward + backward (``jax.value_and_grad`` over all
  inputs and the initial state) under ``jax.set_mesh``: the fused Mosaic kernels (``wkv7_fused_fwd`` /
  ``wkv7_fused_bwd``) inside the ``shard_map`` that ``wkv7`` adds;
* ``train``: a whole sharded train step of a one-layer WuNeng model (``wuneng compile``'s path).

``python -m train.aot.kernels [--train] [--json FILE]`` prints one line per chip and check (compile time and
the Mosaic calls found in the compiled program); exit 1 if any compile fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.aot.topology import parse_topology, topology_devices

KERNEL_NAMES = ("wkv7_fused_fwd", "wkv7_fused_bwd")
GENERATIONS = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


@dataclasses.dataclass
class KernelCompile:
    topology: str
    check: str  # "op" | "train"
    ok: bool
    compile_s: float
    mosaic_calls: dict[str, int]  # kernel name -> custom calls in the compiled program
    error: str | None = None


def mosaic_calls(hlo_text: str) -> dict[str, int]:
    """How many times each ``wkv7`` Mosaic kernel is called in a compiled (optimised) HLO text."""
    calls = [line for line in hlo_text.splitlines() if "tpu_custom_call" in line]
    return {name: sum(bool(re.search(rf"\b{name}\b", line)) for line in calls) for name in KERNEL_NAMES}


def op_mesh(topology: str) -> Mesh:
    """``("data", "tensor")`` = 2 × 2 over the first four chips of ``topology``."""
    devices = topology_devices(parse_topology(topology))[:4]
    return Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def lower_wkv7_grad(
    mesh: Mesh,
    shape: tuple[int, int, int, int] = (2, 64, 2, 16),
    dtype: Any = jnp.bfloat16,
    chunk_size: int | None = None,
):
    """Lower forward + backward of ``wkv7(impl="pallas")`` with reset and initial state, batch over ``data``
    and heads over ``tensor``, under ``jax.set_mesh(mesh)`` (so ``wkv7`` wraps the kernels in shard_map).
    ``chunk_size`` None = the default of ``impl="pallas"`` (64)."""
    from pallas_kernels import wkv7

    bsz, seq_len, heads, n = shape
    act = NamedSharding(mesh, P("data", None, "tensor", None))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=act) for _ in range(6)]
    args.append(
        jax.ShapeDtypeStruct(
            (bsz, heads, n, n), jnp.float32, sharding=NamedSharding(mesh, P("data", "tensor"))
        )
    )
    args.append(jax.ShapeDtypeStruct((bsz, seq_len), jnp.bool_, sharding=NamedSharding(mesh, P("data"))))

    def loss(r, log_w, k, v, a, b, s0, reset):
        o, s = wkv7(r, log_w, k, v, a, b, s0, reset=reset, impl="pallas", chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))
    with jax.set_mesh(mesh):
        return fn.trace(*args).lower()


def compile_op(topology: str) -> KernelCompile:
    t0 = time.perf_counter()
    try:
        compiled = lower_wkv7_grad(op_mesh(topology)).compile()
    except Exception as e:
        return KernelCompile(topology, "op", False, time.perf_counter() - t0, {}, str(e)[:2000])
    calls = mosaic_calls(compiled.as_text())
    return KernelCompile(topology, "op", all(calls.values()), time.perf_counter() - t0, calls)


TINY_WUNENG: dict[str, Any] = {
    "preset": "wuneng_tiny",
    "vocab_size": 128,
    "hidden_size": 32,
    "num_layers": 1,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def tiny_train_config(**top: Any):
    """A one-layer WuNeng train config for a 4-chip slice (``fsdp=2 × tensor=2``)."""
    from train.config import load_config

    raw = {
        "run_dir": "unused",
        "model": dict(TINY_WUNENG),
        "data": {"store": "unused"},
        "steps": 10,
        "global_batch_size": 4,
        "seq_len": 32,
        "dtype": "bfloat16",
        "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
    }
    raw.update(top)
    return load_config(raw)


def compile_train_step(topology: str) -> KernelCompile:
    from train.aot.compile import build_train, compile_train

    t0 = time.perf_counter()
    target = build_train(tiny_train_config(), parse_topology(topology))
    report, compiled = compile_train(target)
    if compiled is None:
        return KernelCompile(topology, "train", False, time.perf_counter() - t0, {}, report.error)
    calls = mosaic_calls(compiled.as_text())
    return KernelCompile(topology, "train", all(calls.values()), time.perf_counter() - t0, calls)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topologies", nargs="*", default=list(GENERATIONS))
    p.add_argument("--train", action="store_true", help="also compile a tiny sharded WuNeng train step")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    from train.aot.compile import platform_defaults

    platform_defaults()
    results = []
    for topo in args.topologies:
        checks = [compile_op] + ([compile_train_step] if args.train else [])
        for check in checks:
            r = check(topo)
            results.append(r)
            calls = ", ".join(f"{k} x{v}" for k, v in r.mosaic_calls.items())
            status = "compiled" if r.ok else f"FAILED {r.error or 'kernel calls missing'}"
            print(
                f"{r.topology:10} {r.check:6} {status} in {r.compile_s:.1f} s; Mosaic calls: {calls}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

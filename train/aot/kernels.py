"""The Pallas TPU kernels (``wkv7``, the middle heads) compiled (not only lowered) by the real TPU compiler for
each generation.

Two checks per chip generation (v5e, v5p, v6e), each on a 4-chip slice with batch and heads sharded:

* ``op``: ``pallas_kernels.wkv7(..., impl="pallas")`` forward + backward (``jax.value_and_grad`` over all
  inputs and the initial state) and ``pallas_kernels.middle_heads.middle_heads(..., impl="pallas")`` forward +
  backward, each under ``jax.set_mesh``: the Mosaic kernels (:data:`KERNEL_NAMES`) inside the ``shard_map``
  that each op adds;
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

#: every Pallas TPU kernel of the model library (the names its ``pallas_call``s give them)
KERNEL_NAMES = ("wkv7_fused_fwd", "wkv7_fused_bwd", "middle_heads_fwd", "middle_heads_bwd")
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
    """How many times each Mosaic kernel of :data:`KERNEL_NAMES` is called in a compiled (optimised) HLO text."""
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


def lower_middle_heads_grad(mesh: Mesh, shape: tuple[int, int, int, int, int] = (2, 64, 4, 2, 64)):
    """Lower forward + backward of ``middle_heads(impl="pallas")`` (``(B, T, H, G, D)``, bf16), batch over
    ``data`` and the heads' 128-lane units over ``tensor``, under ``jax.set_mesh(mesh)``."""
    from pallas_kernels.middle_heads import middle_heads

    bsz, seq_len, heads, groups, d = shape
    sharded = lambda shape, spec: jax.ShapeDtypeStruct(
        shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec)
    )
    args = [
        sharded((bsz, seq_len, heads, d), P("data", None, "tensor", None)),
        sharded((bsz, seq_len, groups, d), P("data", None, "tensor", None)),
        sharded((heads, 2 * d, d), P("tensor")),
        sharded((heads, d), P("tensor")),
        sharded((heads, d), P("tensor")),
    ]

    def loss(*xs):
        m = middle_heads(*xs, impl="pallas", partition=("data", "tensor"))
        return jnp.sum(m.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))
    with jax.set_mesh(mesh):
        return fn.trace(*args).lower()


def compile_op(topology: str) -> KernelCompile:
    """Each op's forward + backward (``wkv7``, ``middle_heads``) compiled alone; every kernel must appear."""
    t0 = time.perf_counter()
    calls = dict.fromkeys(KERNEL_NAMES, 0)
    try:
        for lower in (lower_wkv7_grad, lower_middle_heads_grad):
            for name, n in mosaic_calls(lower(op_mesh(topology)).compile().as_text()).items():
                calls[name] += n
    except Exception as e:
        return KernelCompile(topology, "op", False, time.perf_counter() - t0, calls, str(e)[:2000])
    return KernelCompile(topology, "op", all(calls.values()), time.perf_counter() - t0, calls)


TINY_WUNENG: dict[str, Any] = {  # 4 heads of 64: two 128-lane units for the middle-heads kernel
    "preset": "wuneng_tiny",
    "vocab_size": 128,
    "hidden_size": 256,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "state_head_size": 64,
    "state_heads": 2,
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

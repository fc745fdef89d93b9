"""Ahead-of-time compilation of the train (and prefill / decode) step for a TPU pod slice, on any machine.

``wuneng compile CONFIG.yaml topology=v5p:4x4x4 [key=value ...]`` builds the run's mesh over the slice's
compile-only devices (:mod:`train.aot.topology`), traces the very train step ``wuneng train`` runs
(:func:`train.train_step.make_train_step` + :func:`train.train_step.jit_train_step` on the sharded state
layout of :func:`train.state.make_layout`), compiles it with the real TPU compiler (XLA:TPU + Mosaic for
the Pallas kernels) and reports, per chip: memory (arguments, outputs, temporaries, total against the
chip's HBM), the compiled FLOPs per step against the analytic model-FLOPs formula used for MFU
(:func:`train.metrics.flops_per_token`), and a verdict naming the largest buffers.

On a TPU host ``impl="auto"`` picks the Pallas kernels (``wkv7`` ``pallas``, attention ``splash`` when the
sequence is a multiple of 128); the host compiling here is a CPU, so those choices are made explicitly for
the target (:func:`tpu_model_config`). The Pallas calls run inside ``jax.shard_map`` under the mesh
(``pallas_kernels.wkv7``, ``wuneng_jax.layers.attention``), as they must on a multi-chip TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.aot.executable import (
    load_executable,
    read_executable_meta,
    save_executable,
    step_meta,
)
from train.aot.memory import (
    Buffer,
    MemoryUsage,
    fmt_bytes,
    is_out_of_memory,
    largest_temporaries,
    parse_out_of_memory,
)
from train.aot.topology import Topology, TopologyError, parse_topology, topology_devices
from train.config import ConfigError, TrainConfig, load_config, resolve_model_config
from train.mesh import MeshError, check_divisible, make_mesh, mesh_context

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_COMPILE_ERROR = 0, 1, 3
SPLASH_BLOCK = 128


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class StepReport:
    """What compiling one step for the slice gave, per chip."""

    step: str  # "train" | "prefill" | "decode"
    status: str  # "fits" | "does not fit" | "compile error"
    compile_s: float
    hbm_bytes: int  # the chip's HBM
    memory: MemoryUsage | None = None  # None when the compiler refused the program
    required_bytes: int | None = None  # from the compiler's out-of-memory message
    available_bytes: int | None = None  # HBM the compiler may use (from that message)
    compiled_flops: float | None = None  # per chip per step, XLA's cost analysis
    model_flops: float | None = None  # per chip per step, the analytic MFU formula (train step only)
    largest: list[Buffer] = dataclasses.field(default_factory=list)
    error: str | None = None
    shapes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def used_bytes(self) -> int | None:
        return self.memory.total if self.memory is not None else self.required_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("memory", "largest")}
        out["memory"] = self.memory.to_dict() if self.memory else None
        out["largest"] = [dataclasses.asdict(b) for b in self.largest]
        out["used_bytes"] = self.used_bytes
        return out


@dataclasses.dataclass
class CompileReport:
    topology: str
    slice_name: str
    num_chips: int
    mesh: dict[str, int]
    model: str
    family: str
    n_params: int
    global_batch_size: int
    seq_len: int
    dtype: str
    remat: str
    impls: dict[str, str]
    steps: list[StepReport]
    lower_s: float = 0.0

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)

    @property
    def exit_code(self) -> int:
        if any(s.status == "compile error" for s in self.steps):
            return EXIT_COMPILE_ERROR
        return EXIT_FITS if self.fits else EXIT_DOES_NOT_FIT

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "steps"}
        out["steps"] = [s.to_dict() for s in self.steps]
        out["fits"] = self.fits
        return out


# --------------------------------------------------------------------------------------------
# Building the steps for the target


def tpu_model_config(model_cfg: Any, seq_len: int) -> tuple[Any, dict[str, str]]:
    """``model_cfg`` with ``impl="auto"`` resolved as on a TPU host (this host is a CPU): ``wkv_impl``
    -> ``pallas``; ``attention_impl`` -> ``splash`` when ``seq_len`` is a multiple of 128, else ``xla``."""
    updates: dict[str, str] = {}
    if getattr(model_cfg, "wkv_impl", None) == "auto":
        updates["wkv_impl"] = "pallas"
    if getattr(model_cfg, "attention_impl", None) == "auto":
        updates["attention_impl"] = "splash" if seq_len % SPLASH_BLOCK == 0 else "xla"
    if updates:
        model_cfg = dataclasses.replace(model_cfg, **updates)
    impls = {k: getattr(model_cfg, k) for k in ("attention_impl", "wkv_impl") if hasattr(model_cfg, k)}
    return model_cfg, impls


def build_mesh(cfg: TrainConfig, topo: Topology, devices: Sequence[Any] | None = None) -> Mesh:
    """The run's mesh over the slice's chips; a clear error when the sizes do not match the slice."""
    devices = list(topology_devices(topo) if devices is None else devices)
    try:
        return make_mesh(cfg.mesh, devices)
    except MeshError as e:
        sizes = dict(zip(("data", "fsdp", "tensor", "sequence"), cfg.mesh.sizes(), strict=True))
        raise MeshError(
            f"the mesh {sizes} does not match topology {topo.name} ({topo.num_chips} chips, "
            f"{topo.slice_name}): {e}. Set the mesh.* sizes so that their product is {topo.num_chips}, "
            "e.g. mesh.data=1 mesh.fsdp=-1"
        ) from e


def _cost_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _per_chip_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(math.prod(shape)) * jnp.dtype(x.dtype).itemsize


def largest_arguments(tree: Any, prefix: str, limit: int = 3) -> list[Buffer]:
    """The largest per-chip shards among the abstract arrays of ``tree`` (named by pytree path)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    out = []
    for path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            continue
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        name = prefix + jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        out.append(
            Buffer("argument", name, f"{jnp.dtype(leaf.dtype).name}{list(shard)}", _per_chip_bytes(leaf))
        )
    return sorted(out, key=lambda b: -b.nbytes)[:limit]


def compile_step(
    name: str,
    lower: Callable[[], Any],
    topo: Topology,
    *,
    arguments: list[Buffer] | None = None,
    model_flops: float | None = None,
    keep_dump: str | None = None,
) -> tuple[StepReport, Any]:
    """Lower and compile one step; never raises for compiler refusals (they become the report's status)."""
    dump = keep_dump or tempfile.mkdtemp(prefix="wuneng_aot_")
    options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
    t0 = time.perf_counter()
    compiled, report = None, StepReport(name, "fits", 0.0, topo.chip.hbm_bytes, model_flops=model_flops)
    try:
        compiled = lower().compile(compiler_options=options)
    except Exception as e:  # the TPU compiler's refusal (out of memory, Mosaic, ...)
        text = str(e)
        report.error = text.strip().splitlines()[0][:2000] if text.strip() else type(e).__name__
        if is_out_of_memory(e):
            report.status = "does not fit"
            report.required_bytes, report.available_bytes = parse_out_of_memory(e)
        else:
            report.status = "compile error"
            report.error = text[:4000]
    report.compile_s = time.perf_counter() - t0
    try:
        report.largest = sorted([*(arguments or []), *largest_temporaries(dump)], key=lambda b: -b.nbytes)[:6]
    finally:
        if keep_dump is None:
            shutil.rmtree(dump, ignore_errors=True)
    if compiled is not None:
        report.memory = MemoryUsage.of(compiled)
        report.compiled_flops = _cost_flops(compiled)
        if report.memory.total > topo.chip.hbm_bytes:
            report.status = "does not fit"
    return report, compiled


@dataclasses.dataclass
class TrainTarget:
    """Everything built for the train step on a slice (the inputs of :func:`compile_train`)."""

    cfg: TrainConfig
    topo: Topology | None  # None: this host's own devices (compile_host)
    mesh: Mesh
    model_cfg: Any
    impls: dict[str, str]
    layout: Any
    jitted: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    n_params: int
    flops_per_token: float


def build_train(cfg: TrainConfig, topo: Topology, devices: Sequence[Any] | None = None) -> TrainTarget:
    mesh = build_mesh(cfg, topo, devices)
    model_cfg = resolve_model_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat)
    model_cfg, impls = tpu_model_config(model_cfg, cfg.seq_len)
    return _build_target(cfg, topo, mesh, model_cfg, impls)


def _build_target(
    cfg: TrainConfig, topo: Topology | None, mesh: Mesh, model_cfg: Any, impls: dict[str, str]
) -> TrainTarget:
    from train.metrics import flops_dims, flops_per_token
    from train.optimizer import make_optimizer
    from train.state import count_params, make_layout
    from train.train_step import (
        BATCH_KEYS,
        batch_sharding,
        check_batch_shape,
        jit_train_step,
        make_train_step,
    )
    from wuneng_jax.models import build_model

    check_batch_shape(cfg.global_batch_size, cfg.seq_len, cfg.grad_accum_steps, mesh, cfg.rules)

    def build(rngs):
        return build_model(model_cfg, rngs=rngs)

    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps)
    layout = make_layout(build, tx, mesh, cfg.rules, cfg.seed)
    step = make_train_step(
        layout.graphdef,
        tx,
        schedule,
        accum_steps=cfg.grad_accum_steps,
        z_loss=cfg.z_loss,
        vocab_tile=cfg.loss_vocab_tile,
        rules=cfg.rules,
    )
    jitted = jit_train_step(step, layout, mesh, cfg.rules)
    bs = batch_sharding(mesh, cfg.rules)
    shape = (cfg.global_batch_size, cfg.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=bs)
        for k in BATCH_KEYS
    }
    n_params = count_params(layout.abstract.params)
    fpt = flops_per_token(flops_dims(model_cfg, n_params), cfg.seq_len)["total"]
    return TrainTarget(cfg, topo, mesh, model_cfg, impls, layout, jitted, batch, n_params, fpt)


def compile_train(target: TrainTarget, keep_dump: str | None = None) -> tuple[StepReport, Any]:
    cfg = target.cfg

    def lower():
        with mesh_context(target.mesh, cfg.rules):
            return target.jitted.trace(target.layout.abstract, target.batch).lower()

    model_flops = target.flops_per_token * cfg.tokens_per_step / target.topo.num_chips
    args = largest_arguments(target.layout.abstract.params, "params/") + largest_arguments(
        target.layout.abstract.opt_state, "opt_state/"
    )
    report, compiled = compile_step(
        "train", lower, target.topo, arguments=args, model_flops=model_flops, keep_dump=keep_dump
    )
    report.shapes = {"global_batch_size": cfg.global_batch_size, "seq_len": cfg.seq_len}
    return report, compiled


# --------------------------------------------------------------------------------------------
# Prefill / decode (the inference steps of wuneng_jax.decode)


def _batch_leaf_sharding(mesh: Mesh, x: Any, batch: int, batch_axes: Any) -> NamedSharding:
    """Shard the first dim of size ``batch`` over ``batch_axes`` (when divisible); replicate the rest."""
    axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    n = math.prod(mesh.shape[a] for a in axes) if axes else 1
    spec: list[Any] = [None] * len(x.shape)
    if axes and batch % n == 0:
        for d, size in enumerate(x.shape[:2]):
            if size == batch:
                spec[d] = batch_axes
                break
    return NamedSharding(mesh, PartitionSpec(*spec))


def compile_inference(
    target: TrainTarget, *, batch: int, prompt_len: int, max_len: int
) -> list[tuple[StepReport, Any]]:
    """Compile ``prefill`` (``[batch, prompt_len]`` into a fresh state of ``max_len`` slots) and one
    ``decode`` step for the slice, with the trained (float32) parameters sharded as in training."""
    from flax import nnx

    from train.mesh import logical_to_spec
    from wuneng_jax import sharding as S
    from wuneng_jax.decode import steps as families
    from wuneng_jax.layers.context import KVLayer

    mesh, rules = target.mesh, target.cfg.rules
    graphdef, layout = target.layout.graphdef, target.layout
    params, rest = layout.abstract.params, layout.abstract.rest
    batch_axes = logical_to_spec((S.BATCH,), rules)[0]
    kv_spec = logical_to_spec((None, S.BATCH, None, S.ACT_KV_HEADS, None), rules)

    def model_of(p, r):
        return nnx.merge(graphdef, p, r)

    with mesh_context(mesh, rules):
        state = jax.eval_shape(lambda p, r: families.init_state(model_of(p, r), batch, max_len), params, rest)
    state_sh = jax.tree.map(lambda x: _batch_leaf_sharding(mesh, x, batch, batch_axes), state)

    def kv_sharding(x, sh):  # stacked KV caches [n,B,S,G,D]: batch and KV heads
        if not isinstance(x, KVLayer):
            return sh
        try:
            check_divisible(x.k.shape, kv_spec, mesh, "KV cache")
        except MeshError:
            return sh  # keep the batch-only sharding
        return KVLayer(NamedSharding(mesh, kv_spec), NamedSharding(mesh, kv_spec))

    is_kv = lambda x: isinstance(x, KVLayer)
    state_sh = state_sh._replace(
        caches=jax.tree.map(kv_sharding, state.caches, state_sh.caches, is_leaf=is_kv)
    )
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    rows = _batch_leaf_sharding(mesh, jax.ShapeDtypeStruct((batch, 1), jnp.int32), batch, batch_axes)
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    valid = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=rows)
    one = NamedSharding(mesh, PartitionSpec(rows.spec[0]))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=one)

    def prefill(p, r, tokens, valid, state):
        return families.prefill(model_of(p, r), tokens, valid, state, last_only=True)

    def decode(p, r, tokens, state):
        return families.decode_step(model_of(p, r), tokens, state)

    p_sh, r_sh = layout.shardings.params, layout.shardings.rest
    jit_prefill = jax.jit(prefill, in_shardings=(p_sh, r_sh, rows, rows, state_sh), donate_argnums=(4,))
    jit_decode = jax.jit(decode, in_shardings=(p_sh, r_sh, one, state_sh), donate_argnums=(3,))
    args = largest_arguments(params, "params/", 2) + largest_arguments(state, "decode_state/", 2)
    out = []
    for name, fn, inputs in (
        ("prefill", jit_prefill, (params, rest, prompt, valid, state)),
        ("decode", jit_decode, (params, rest, token, state)),
    ):

        def lower(fn=fn, inputs=inputs):
            with mesh_context(mesh, rules):
                return fn.trace(*inputs).lower()

        report, compiled = compile_step(name, lower, target.topo, arguments=args)
        report.shapes = {"batch": batch, "prompt_len": prompt_len, "max_len": max_len}
        out.append((report, compiled))
    return out


# --------------------------------------------------------------------------------------------
# Saving the compiled train step (MaxText's compiled_trainstep_file): train.aot.executable


def host_model_config(model_cfg: Any, seq_len: int) -> Any:
    """``model_cfg`` as the trainer of this host runs it: ``impl="auto"`` resolved as on a TPU host when
    the default backend is a TPU (:func:`tpu_model_config`), else kept (resolved at trace time)."""
    return tpu_model_config(model_cfg, seq_len)[0] if jax.default_backend() == "tpu" else model_cfg


def compile_host(cfg: TrainConfig, save: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The train step of ``cfg`` compiled for this host's own devices (the mesh ``wuneng train`` builds
    here), exactly as :func:`build_train` + :func:`compile_train` do for a slice, tagged with the host's
    platform; saved to ``save`` when given. Returns ``(compiled, meta)``."""
    mesh = make_mesh(cfg.mesh)
    model_cfg = host_model_config(
        resolve_model_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat), cfg.seq_len
    )
    target = _build_target(cfg, None, mesh, model_cfg, {})
    with mesh_context(mesh, cfg.rules):
        compiled = target.jitted.trace(target.layout.abstract, target.batch).lower().compile()
    meta = _meta(target)
    if save is not None:
        save_executable(compiled, save, meta)
    return compiled, meta


# --------------------------------------------------------------------------------------------
# The command


def run_compile(
    cfg: TrainConfig,
    topology: str | Topology,
    *,
    inference: bool = False,
    decode_batch: int | None = None,
    prompt_len: int | None = None,
    max_len: int | None = None,
    save: str | None = None,
    devices: Sequence[Any] | None = None,
) -> CompileReport:
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    t0 = time.perf_counter()
    target = build_train(cfg, topo, devices)
    lower_s = time.perf_counter() - t0
    train_report, compiled = compile_train(target)
    steps = [train_report]
    if save and compiled is not None:
        save_executable(compiled, save, _meta(target))
    if inference:
        batch = decode_batch or cfg.global_batch_size
        plen = prompt_len or cfg.seq_len
        steps += [
            r for r, _ in compile_inference(target, batch=batch, prompt_len=plen, max_len=max_len or plen)
        ]
    return CompileReport(
        topology=topo.name,
        slice_name=topo.slice_name,
        num_chips=topo.num_chips,
        mesh=dict(target.mesh.shape),
        model=_model_name(cfg.model),
        family=type(target.model_cfg).__name__,
        n_params=target.n_params,
        global_batch_size=cfg.global_batch_size,
        seq_len=cfg.seq_len,
        dtype=cfg.dtype,
        remat=cfg.remat,
        impls=target.impls,
        steps=steps,
        lower_s=lower_s,
    )


def _model_name(model: Any) -> str:
    if isinstance(model, str):
        return model
    return str(model.get("preset") or model.get("family") or "custom")


def _meta(target: TrainTarget) -> dict[str, Any]:
    topology = target.topo.name if target.topo is not None else None
    return step_meta(target.cfg, target.model_cfg, target.mesh, topology)


def format_report(report: CompileReport) -> str:
    """The human-readable report ``wuneng compile`` prints."""
    lines = [
        f"topology {report.topology} ({report.slice_name}: {report.num_chips} chips, "
        f"{fmt_bytes(report.steps[0].hbm_bytes)} HBM each); mesh "
        + " × ".join(f"{k}={v}" for k, v in report.mesh.items()),
        f"model {report.model} ({report.family}, {report.n_params:,} params), dtype {report.dtype}, "
        f"remat {report.remat}, kernels {', '.join(f'{k}={v}' for k, v in report.impls.items()) or '-'}",
    ]
    for s in report.steps:
        shapes = ", ".join(f"{k} {v}" for k, v in s.shapes.items())
        lines.append(f"\n[{s.step}] {shapes}; compiled in {s.compile_s:.1f} s")
        if s.memory is not None:
            m = s.memory
            lines += [
                "  per-chip memory:",
                f"    arguments     {fmt_bytes(m.arguments):>12}",
                f"    outputs       {fmt_bytes(m.outputs):>12}  ({fmt_bytes(m.aliased)} aliased to donated arguments)",
                f"    temporaries   {fmt_bytes(m.temporaries):>12}",
                f"    program code  {fmt_bytes(m.code):>12}",
                f"    total         {fmt_bytes(m.total):>12}  of {fmt_bytes(s.hbm_bytes)} HBM "
                f"({m.total / s.hbm_bytes:.1%})",
            ]
        elif s.required_bytes is not None:
            lines.append(
                f"  per-chip memory: the compiler needs {fmt_bytes(s.required_bytes)}, "
                f"{fmt_bytes(s.available_bytes)} of HBM is usable"
            )
        if s.compiled_flops is not None:
            flops = f"  FLOPs per chip per step: compiled {s.compiled_flops:.4g}"
            if s.model_flops:
                flops += (
                    f", model (MFU formula) {s.model_flops:.4g}, ratio {s.compiled_flops / s.model_flops:.2f}"
                    " (remat recompute, f32 HIGHEST emulation and the chunked WY form raise it; Pallas kernels"
                    " count 0; XLA counts a loop body once, so each scanned layer group counts as one layer"
                    " and the loss's vocabulary tiles as one tile: compiled is a lower bound)"
                )
            lines.append(flops)
        if s.largest:
            lines.append("  largest buffers per chip:")
            lines += [f"    {fmt_bytes(b.nbytes):>10}  {b.kind:9} {b.name} {b.shape}" for b in s.largest]
        if s.status == "fits":
            lines.append(f"  verdict: FITS ({fmt_bytes(s.used_bytes)} of {fmt_bytes(s.hbm_bytes)} per chip)")
        elif s.status == "does not fit":
            lines.append(
                f"  verdict: DOES NOT FIT ({fmt_bytes(s.used_bytes)} needed per chip, "
                f"{fmt_bytes(s.available_bytes or s.hbm_bytes)} available): {s.error or ''}".rstrip(": ")
            )
            lines.append(
                "  try: a larger slice, mesh.fsdp=-1 (shard state over every chip), remat=full, a smaller "
                "global_batch_size with grad_accum_steps, or tensor parallelism (mesh.tensor)"
            )
        else:
            lines.append(f"  verdict: COMPILE ERROR (lowering or compiling for TPU failed):\n{s.error}")
    overall = {EXIT_FITS: "fits", EXIT_DOES_NOT_FIT: "does not fit", EXIT_COMPILE_ERROR: "compile error"}
    lines.append(f"\n{report.topology}: {overall[report.exit_code]}")
    return "\n".join(lines)


def split_overrides(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take ``topology=...`` out of the ``key=value`` overrides (it is not a training-config field)."""
    topology, rest = None, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "topology":
            topology = value.strip()
        else:
            rest.append(item)
    return topology, rest


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config YAML (the one `wuneng train` would run)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="topology=CHIP:AxB[xC] (required: v5e:16x16, v5p:4x4x4, v6e:2x2, ...) and dotted config overrides",
    )
    p.add_argument("--topology", help="same as topology=...")
    p.add_argument("--inference", action="store_true", help="also compile the prefill and decode steps")
    p.add_argument("--decode-batch", type=int, help="rows for prefill/decode (default: global_batch_size)")
    p.add_argument("--prompt-len", type=int, help="prefill length (default: seq_len)")
    p.add_argument("--max-len", type=int, help="decode-state slots (default: the prompt length)")
    p.add_argument(
        "--save", metavar="FILE", help="save the compiled train step (loaded on the slice's hosts)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    topology, overrides = split_overrides(args.overrides)
    topology = args.topology or topology
    if not topology:
        raise ConfigError(
            "wuneng compile needs a target slice: add topology=CHIP:AxB[xC], e.g. topology=v5p:4x4x4"
        )
    try:
        topo = parse_topology(topology)
        cfg = load_config(args.config, overrides)
        report = run_compile(
            cfg,
            topo,
            inference=args.inference,
            decode_batch=args.decode_batch,
            prompt_len=args.prompt_len,
            max_len=args.max_len,
            save=args.save,
        )
    except TopologyError as e:
        print(f"wuneng compile: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if args.save and report.steps[0].memory is not None:
        print(f"compiled train step saved to {args.save}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report.exit_code


def platform_defaults() -> None:
    """Before any JAX backend starts: with no TPU attached and no accelerator visible, pin JAX to the CPU
    (``JAX_PLATFORMS=cpu``, :func:`train.platform.pin_cpu_without_accelerator`) so that an installed
    ``libtpu`` is not probed as a backend (that probe loads 700 MB, prints libtpu start-up errors and
    takes the machine-wide libtpu lock); set ``libtpu``'s compile-only environment
    (:func:`train.aot.topology.prepare_libtpu_env`). Changes nothing on TPU or GPU hosts or when
    ``JAX_PLATFORMS`` is set."""
    from train.aot.topology import prepare_libtpu_env, tpu_attached
    from train.platform import pin_cpu_without_accelerator

    if tpu_attached():
        return
    prepare_libtpu_env()
    pin_cpu_without_accelerator()


__all__ = [
    "CompileReport",
    "StepReport",
    "build_mesh",
    "build_train",
    "compile_host",
    "compile_inference",
    "compile_train",
    "format_report",
    "host_model_config",
    "load_executable",
    "read_executable_meta",
    "platform_defaults",
    "run",
    "run_compile",
    "save_executable",
    "split_overrides",
    "tpu_model_config",
]

"""The device mesh, the logical-axis rules and multi-host start-up.

One mesh with axes ``("data", "fsdp", "tensor", "sequence")``, all of type ``AxisType.Auto`` (the
compiler propagates shardings; ``jax.make_mesh``'s default ``Explicit`` type rejects ambiguous dots).
Model code only names logical axes (``wuneng_jax.sharding``); the rules table from the config maps
them to these mesh axes (``nnx.logical_axis_rules``), so changing the layout never touches model code.

Multi-slice / multi-node meshes are ordered so that only one axis (``mesh.dcn_axis``, by default
``data``) spans the slow data-centre network: ``mesh_utils.create_hybrid_device_mesh`` builds each
granule (TPU slice or host) as a sub-mesh over the fast interconnect and tiles them along that axis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from train.config import MESH_AXES, DistributedConfig, MeshConfig, Rules

log = logging.getLogger(__name__)


class MeshError(ValueError):
    """The configured mesh cannot be built on these devices."""


class CoordinatorUnreachable(RuntimeError):
    """A multi-host start could not reach the coordinator within ``distributed.initialization_timeout``."""


def resolve_axis_sizes(sizes: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace the one ``-1`` by what fills ``n_devices``; check the product matches."""
    sizes = tuple(int(s) for s in sizes)
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh ({named}): at most one axis may be -1")
    if -1 in sizes:
        if n_devices % fixed:
            raise MeshError(
                f"mesh ({named}): the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices; change the sizes so that their product divides {n_devices}"
            )
        sizes = tuple(n_devices // fixed if s == -1 else s for s in sizes)
    elif fixed != n_devices:
        raise MeshError(
            f"mesh ({named}) has {fixed} devices but {n_devices} are available; make the product of "
            f"the axis sizes equal {n_devices}, or set one axis to -1 to fill"
        )
    return sizes


def _granule_attr(cfg: MeshConfig, devices: Sequence[Any]) -> str | None:
    """Which device attribute groups devices over the slow network (None = one granule)."""
    if cfg.dcn_granule == "none":
        return None
    if cfg.dcn_granule == "process":
        return "process_index"
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if cfg.dcn_granule == "slice":
        if not hasattr(devices[0], "slice_index"):
            raise MeshError(
                "mesh.dcn_granule=slice but these devices have no slice_index; use process or none"
            )
        return "slice_index"
    return "slice_index" if n_slices > 1 else None  # auto


def build_device_array(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> np.ndarray:
    """The ``[data, fsdp, tensor, sequence]`` array of devices for ``cfg`` (topology-aware order)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes(cfg.sizes(), len(devices))
    attr = _granule_attr(cfg, devices)
    n_granules = len({getattr(d, attr) for d in devices}) if attr else 1
    if n_granules <= 1:
        if isinstance(devices[0], jax.Device):
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return np.asarray(devices, dtype=object).reshape(shape)
    dcn_index = MESH_AXES.index(cfg.dcn_axis)
    if shape[dcn_index] % n_granules:
        raise MeshError(
            f"mesh: the devices form {n_granules} {'slices' if attr == 'slice_index' else 'hosts'} over the data-centre network, "
            f"but mesh.{cfg.dcn_axis}={shape[dcn_index]} is not a multiple of {n_granules}; make "
            f"mesh.{cfg.dcn_axis} a multiple of {n_granules}, or pick another mesh.dcn_axis"
        )
    ici = list(shape)
    ici[dcn_index] //= n_granules
    dcn = [1] * len(shape)
    dcn[dcn_index] = n_granules
    return mesh_utils.create_hybrid_device_mesh(
        ici,
        dcn,
        devices,
        process_is_granule=attr == "process_index",
        allow_split_physical_axes=True,
    )


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """Build the 4-axis Auto mesh over ``devices`` (default: all devices of all processes)."""
    array = build_device_array(cfg, devices)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    return " × ".join(f"{name}={size}" for name, size in mesh.shape.items())


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate the mesh (``jax.set_mesh``) and the logical rules for model code and shardings."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map a tuple of logical axis names to a mesh ``PartitionSpec`` through ``rules``."""
    from flax.core import spmd

    return spmd.apply_rules(PartitionSpec(*names), rules)


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """Raise a clear error when a dimension is not divisible by the mesh axes it is sharded over."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), strict=False)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = int(np.prod([mesh.shape[a] for a in axes]))
        if size % n:
            raise MeshError(
                f"{what}: dimension {dim} of shape {tuple(shape)} has size {size}, which is not divisible "
                f"by mesh axes {axes} (total {n}); change the mesh sizes or the rules table entry that "
                f"maps this dimension"
            )


# --------------------------------------------------------------------------------------------
# Multi-host start-up

_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # generic
    "SLURM_JOB_ID",  # SLURM (checked with SLURM_NTASKS > 1)
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU VMs (multi-host slices)
    "MEGASCALE_COORDINATOR_ADDRESS",  # TPU multi-slice
)


def _cluster_detected() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Start ``jax.distributed`` when running on several processes; returns whether it did.

    Must run before anything touches a JAX backend. Explicit coordinator settings win; otherwise,
    with ``cfg.auto``, JAX auto-detects TPU pods, SLURM and Open MPI clusters. On CPU the cross-process
    collectives use ``cfg.cpu_collectives`` (gloo by default).
    """
    if jax.distributed.is_initialized():
        return True
    explicit = cfg.coordinator_address is not None
    if not explicit and not (cfg.auto and _cluster_detected()):
        return False
    if explicit and cfg.num_processes == 1:
        return False
    if explicit and cfg.process_id != 0:
        wait_for_coordinator(cfg)
    if cfg.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if explicit:
        with start_up_watchdog(cfg):
            jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address,
                num_processes=cfg.num_processes,
                process_id=cfg.process_id,
                initialization_timeout=cfg.initialization_timeout,
            )
    else:
        with start_up_watchdog(cfg):
            jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


WAIT_NOTICE_S = 10.0  # seconds between "waiting for ..." lines
_ABORT_MARGIN_S = 0.5  # the watchdog speaks this long before the runtime's own abort


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def start_up_watchdog(
    cfg: DistributedConfig,
    *,
    say: Callable[[str], None] = _stderr,
    stop: Callable[[int], Any] = os._exit,
) -> Iterator[None]:
    """Around ``jax.distributed.initialize``, which waits for every process to join and aborts the
    process (a C++ check failure) at ``initialization_timeout``: a line every :data:`WAIT_NOTICE_S`
    seconds while it waits, and just before that abort one error line and ``stop(2)`` (exit code 2)
    instead."""
    done = threading.Event()
    limit = cfg.initialization_timeout
    start = time.monotonic()
    deadline = start + max(limit - _ABORT_MARGIN_S, 0.1)
    if cfg.coordinator_address is not None:  # explicit start-up
        n = cfg.num_processes
        who, all_, where = (
            f"process {cfg.process_id} of {n}",
            f"all {n}",
            f"the coordinator {cfg.coordinator_address}",
        )
        fix = f"start every process with the same distributed.coordinator_address and num_processes (process_id 0..{n - 1})"
    else:  # the cluster JAX detected (TPU pod, SLURM, Open MPI)
        who, all_, where = "this process", "all", "the cluster's coordinator"
        fix = "check that every host of the job started"

    def watch() -> None:
        while not done.wait(max(min(WAIT_NOTICE_S, deadline - time.monotonic()), 0.0)):
            if time.monotonic() >= deadline:
                say(
                    f"wuneng: error: {who}: not {all_} processes joined at {where} within "
                    f"{limit} s; {fix}, or raise distributed.initialization_timeout"
                )
                stop(2)
                return
            say(
                f"waiting for {all_} processes to join at {where} ({who}; "
                f"{time.monotonic() - start:.0f} s of {limit} s)"
            )

    watcher = threading.Thread(target=watch, name="start-up-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def wait_for_coordinator(
    cfg: DistributedConfig, *, say: Callable[[str], None] = _stderr, poll_s: float = 0.5
) -> None:
    """Wait until the coordinator's ``host:port`` accepts connections, printing a line every
    :data:`WAIT_NOTICE_S` seconds; raise :class:`CoordinatorUnreachable` after
    ``cfg.initialization_timeout`` seconds (instead of the runtime's abort deep inside
    ``jax.distributed.initialize``)."""
    host, port = cfg.host_port()
    where = f"{host}:{port}"
    start = time.monotonic()
    next_notice = start
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(poll_s * 4, 5.0)):
                return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        waited = time.monotonic() - start
        if waited >= cfg.initialization_timeout:
            raise CoordinatorUnreachable(
                f"process {cfg.process_id}: the coordinator {where} did not answer within "
                f"{cfg.initialization_timeout} s ({reason}); start process 0 with the same "
                f"distributed.coordinator_address, check that {where} is reachable from this host, or raise "
                "distributed.initialization_timeout"
            )
        if time.monotonic() >= next_notice:
            say(
                f"waiting for coordinator {where} (process {cfg.process_id} of {cfg.num_processes}; "
                f"{waited:.0f} s of {cfg.initialization_timeout} s)"
            )
            next_notice += WAIT_NOTICE_S
        time.sleep(poll_s)

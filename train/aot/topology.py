"""TPU pod-slice topologies as compile-only devices, on any machine with ``libtpu`` installed.

``topology_devices("v5p:4x4x4")`` returns the 64 devices of a v5p-128 slice (one per chip; v5p, v5e and
v6e chips are one JAX device each) from ``jax.experimental.topologies.get_topology_desc``: no TPU needed,
the default JAX backend stays whatever it is (CPU here). Programs lowered for a mesh of these devices are
compiled by the real TPU compiler (XLA:TPU and Mosaic, from the ``libtpu`` wheel pinned with ``jax``:
``pip install -e ".[tpu-aot]"``).

Process environment (:func:`prepare_libtpu_env`, applied before ``libtpu`` loads, only when no TPU chip
is attached to this machine): ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (``libtpu`` otherwise takes the
machine-wide ``/tmp/libtpu_lockfile`` and a second process, e.g. a parallel test worker or any JAX
process that probed for a TPU backend, fails with "Internal error when accessing libtpu multi-process
lockfile"), ``TPU_ACCELERATOR_TYPE`` / ``TPU_WORKER_HOSTNAMES`` / ``TPU_SKIP_MDS_QUERY`` (no start-up
warnings, no metadata-server queries). On a real TPU VM nothing is changed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

GIB = 1024**3


class TopologyError(ValueError):
    """A topology name is malformed or names an unknown chip, or ``libtpu`` is missing."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: the name used in topology strings and its per-chip figures.

    ``hbm_bytes``: HBM per chip (v5e 16 GiB, v5p 96 GiB, v6e 32 GiB; Cloud TPU's documentation rounds v5p to
    95 GB). The TPU compiler lets one program use a little less: 15.75, 95.74 and 31.25 GiB (its own
    out-of-memory messages, ``benchmarks/results/tpu_fit_table.json``);
    ``peak_flops``: dense bf16 peak FLOP/s per chip (the same table as ``train.metrics.PEAK_FLOPS``);
    ``hbm_bandwidth``, ``ici_bandwidth``: HBM and inter-chip interconnect bytes/s per chip (Cloud TPU's published
    figures: v5e 819 GB/s and 1,600 Gbps, v5p 2,765 GB/s and 4,800 Gbps, v6e 1,640 GB/s and 3,584 Gbps), for
    the roofline estimates of ``benchmarks/roofline.py``;
    ``dims``: 2 (v5e, v6e: ``AxB``) or 3 (v5p: ``AxBxC``); ``slices``: the standard slice shapes, smallest
    first (the ones ``wuneng compile`` suggests and the fit table searches).
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    dims: int
    slices: tuple[str, ...]
    accelerator_type: str  # a valid TPU_ACCELERATOR_TYPE for this generation (quiets libtpu's start-up)


_SLICES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_SLICES_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16")

CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1600e9 / 8, 2, _SLICES_2D, "v5litepod-4"),
    "v5p": Chip("v5p", 96 * GIB, 459e12, 2765e9, 4800e9 / 8, 3, _SLICES_3D, "v5p-8"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 3584e9 / 8, 2, _SLICES_2D, "v6e-4"),
}
ALIASES: dict[str, str] = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology string such as ``v5p:4x4x4`` (chip generation and chip grid)."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def slice_name(self) -> str:
        """Cloud TPU's name for the slice (v5p counts TensorCores: 2 per chip)."""
        n = self.num_chips * (2 if self.chip.name == "v5p" else 1)
        return f"{self.chip.name}-{n}"


def parse_topology(text: str) -> Topology:
    """``"v5e:16x16"`` / ``"v5p:4x4x4"`` / ``"v6e:2x2"`` -> :class:`Topology` (clear error otherwise)."""
    known = ", ".join(f"{c.name}:{c.slices[1]}" for c in CHIPS.values())
    m = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*:\s*(\d+(?:x\d+)*)\s*", str(text))
    if not m:
        raise TopologyError(f"topology {text!r} is not of the form CHIP:AxB[xC], e.g. {known}")
    chip_name = ALIASES.get(m.group(1).lower(), m.group(1).lower())
    if chip_name not in CHIPS:
        raise TopologyError(
            f"topology {text!r}: unknown TPU generation {m.group(1)!r}; use one of {', '.join(CHIPS)}"
        )
    chip = CHIPS[chip_name]
    shape = tuple(int(x) for x in m.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
        example = chip.slices[1]
        raise TopologyError(
            f"topology {text!r}: {chip.name} slices have {chip.dims} dimensions of at least 1 "
            f"(e.g. {chip.name}:{example}); standard shapes: {', '.join(chip.slices)}"
        )
    return Topology(chip, shape)


def tpu_attached() -> bool:
    """Whether this machine has TPU chips on its PCI bus (JAX's own probe)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private API moved: assume a TPU could be there (change nothing)
        return True


def prepare_libtpu_env(accelerator_type: str = "v5litepod-4") -> None:
    """Environment defaults for loading ``libtpu`` as a compiler only (see the module docstring).

    Must run before ``libtpu`` is first loaded in this process; existing values are kept, and nothing is
    set when a TPU is attached.
    """
    if tpu_attached():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def libtpu_version() -> str | None:
    try:
        from importlib import metadata

        return metadata.version("libtpu")
    except Exception:
        return None


@functools.cache
def _devices(name: str, num_chips: int) -> tuple[Any, ...]:
    from jax.experimental import topologies

    # libtpu's default host is 2x2x1 chips, which a single chip does not divide: give it a one-chip host
    hosts = {"chips_per_host_bounds": (1, 1, 1)} if num_chips == 1 else {}
    return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name, **hosts).devices)


def topology_devices(topology: Topology | str) -> list[Any]:
    """The compile-only devices of ``topology`` (one per chip), cached per process."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    prepare_libtpu_env(topo.chip.accelerator_type)
    from jax._src.cloud_tpu_init import get_tpu_library_path

    if get_tpu_library_path() is None:
        raise TopologyError(
            "ahead-of-time TPU compilation needs libtpu (the TPU compiler), which is not installed; "
            'install it with `python3 -m pip install -e ".[tpu-aot]"` (libtpu pinned to this jax version)'
        )
    try:
        devices = list(_devices(topo.name, topo.num_chips))
    except Exception as e:  # libtpu rejects the shape
        raise TopologyError(f"topology {topo.name}: libtpu cannot build it ({e})") from e
    if len(devices) != topo.num_chips:
        raise TopologyError(
            f"topology {topo.name}: libtpu returned {len(devices)} devices for {topo.num_chips} chips; "
            "this tool expects one device per chip (v5e, v5p, v6e)"
        )
    return devices


__all__ = [
    "CHIPS",
    "GIB",
    "Chip",
    "Topology",
    "TopologyError",
    "libtpu_version",
    "parse_topology",
    "prepare_libtpu_env",
    "topology_devices",
    "tpu_attached",
]

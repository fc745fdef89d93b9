"""Which JAX platform a ``wuneng`` command uses when none is requested.

With the ``tpu-aot`` extra installed, ``libtpu`` is importable, and JAX probes it as a backend on any
machine: on a CPU-only host that probe loads a large library, prints libtpu start-up errors and takes the
machine-wide libtpu lock. :func:`pin_cpu_without_accelerator` therefore sets ``JAX_PLATFORMS=cpu`` when
no TPU chip and no GPU is present on this machine, before any backend starts; it changes nothing when
``JAX_PLATFORMS`` is set or an accelerator is there.
"""

from __future__ import annotations

import os


def gpu_visible() -> bool:
    """Whether an NVIDIA or AMD GPU is visible (JAX's own probe; True when the probe is unavailable)."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.has_visible_nvidia_gpu():
            return True
        return bool(getattr(hardware_utils, "num_available_amd_gpus", lambda **_: 0)(stop_at=1))
    except Exception:  # private API moved: assume a GPU could be there (change nothing)
        return True


def pin_cpu_without_accelerator() -> bool:
    """Set ``JAX_PLATFORMS=cpu`` when it is unset and no TPU or GPU is present; returns whether it did."""
    from train.aot.topology import tpu_attached

    if os.environ.get("JAX_PLATFORMS") is not None or tpu_attached() or gpu_visible():
        return False
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    return True

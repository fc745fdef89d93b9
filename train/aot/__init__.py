"""Ahead-of-time compilation for TPU pod slices on a CPU machine (``wuneng compile``).

:mod:`train.aot.topology` (slices as compile-only devices from ``libtpu``), :mod:`train.aot.memory` (per-chip
memory and the largest buffers), :mod:`train.aot.compile` (the train / prefill / decode steps, the report
and the command), :mod:`train.aot.kernels` (the ``wkv7`` Pallas kernels compiled for each TPU generation).
"""

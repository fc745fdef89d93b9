"""wkv7 on a TPU: impl="pallas" (Mosaic state-pass kernel) vs impl="chunked" (XLA), forward and forward+backward,
with the FLOP and byte floors of the problem and the achieved fraction of the chip's peaks.

    python benchmarks/wkv7_tpu.py                        # B=8 T=4096 H=64 N=64, bf16 inputs
    python benchmarks/wkv7_tpu.py --sweep                # + the state-pass kernel over chunks_per_step
    python benchmarks/wkv7_tpu.py --smoke                # tiny shape, runs anywhere (CPU: Pallas interpreter)

The harness, the floors (8 N² / 24 N² FLOP per token-head, 7 / 13 bf16 arrays of compulsory traffic) and the
checks are those of :mod:`benchmarks.wkv7_gpu` (see its docstring); there is no fla column (fla is
CUDA/Triton only). Results go to ``benchmarks/results/wkv7_tpu_<platform>.json``. On a multi-chip host the
benchmark uses one chip (the arrays live on the default device). ``--chunks-per-step`` sets how many chunks one
grid step of the Mosaic kernel walks (fewer, larger grid steps: less per-step overhead).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.wkv7_gpu import main as _main  # noqa: E402


def main(argv=None) -> dict:
    return _main(argv, name="wkv7_tpu", target="tpu", with_fla=False, description=__doc__)


if __name__ == "__main__":
    main()

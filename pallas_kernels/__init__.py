"""RWKV-7 recurrence kernels: one public op with an ``impl=`` switch and its references beside it."""

from pallas_kernels.wkv7 import wkv7

__all__ = ["wkv7"]

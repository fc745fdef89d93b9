"""Conversion between this library's models and external checkpoint formats (local files only)."""

from wuneng_jax.convert.safetensors_io import (
    read_safetensors,
    read_safetensors_dir,
    write_safetensors,
    write_safetensors_dir,
)

__all__ = ["read_safetensors", "read_safetensors_dir", "write_safetensors", "write_safetensors_dir"]

"""Normalisation layers: pure functions of arrays, plus thin Flax NNX wrappers.

All statistics are computed in ``promote_types(x.dtype, float32)`` (float32 for bf16/f32 inputs,
float64 for float64 inputs), and variances are biased (divide by the group size), as in PyTorch.

* ``rms_norm(x, scale, eps)``: ``scale * x / sqrt(mean(x²) + eps)`` over the last axis (Qwen2 RMSNorm:
  the normalised value is cast back to ``x.dtype`` before the scale multiplies it, as Hugging Face does).
* ``layer_norm(x, scale, bias, eps)``: LayerNorm over the last axis.
* ``group_norm(x, scale, bias, num_groups, eps)``: the last axis ``C`` is split into ``num_groups``
  contiguous groups of ``C // num_groups`` channels; each group is normalised on its own (per token),
  then the per-channel ``scale``/``bias`` ``[C]`` apply (RWKV-7's ``ln_x``: groups = heads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.params import sharded_param
from wuneng_jax.sharding import NORM


def _stat_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis. x ``[..., C]``, scale ``[C]`` -> ``[..., C]`` in ``x.dtype``."""
    xf = x.astype(_stat_dtype(x.dtype))
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis (biased variance). x ``[..., C]``, scale/bias ``[C]`` or None."""
    xf = x.astype(_stat_dtype(x.dtype))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(y.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)


def group_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, num_groups: int, eps: float
) -> jax.Array:
    """Per-token GroupNorm over contiguous channel groups of the last axis.

    x ``[..., C]`` with ``C % num_groups == 0``; scale/bias ``[C]`` or None -> ``[..., C]`` in ``x.dtype``.
    Equivalent to ``torch.nn.GroupNorm(num_groups, C)`` applied to ``x.reshape(-1, C)``.
    """
    c = x.shape[-1]
    if c % num_groups != 0:
        raise ValueError(f"group_norm: num_groups={num_groups} does not divide the channel axis C={c}")
    xf = x.astype(_stat_dtype(x.dtype)).reshape(*x.shape[:-1], num_groups, c // num_groups)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
    y = (xc * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    if scale is not None:
        y = y * scale.astype(y.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale ``[C]`` (init ones), logical axis ``(NORM,)``."""

    def __init__(self, dim: int, eps: float, *, param_dtype: str | jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = sharded_param(jnp.ones((dim,), jnp.dtype(param_dtype)), (NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale (init ones) and bias (init zeros), both ``[C]`` ``(NORM,)``."""

    def __init__(self, dim: int, eps: float = 1e-5, *, param_dtype: str | jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = sharded_param(jnp.ones((dim,), jnp.dtype(param_dtype)), (NORM,))
        self.bias = sharded_param(jnp.zeros((dim,), jnp.dtype(param_dtype)), (NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class GroupNorm(nnx.Module):
    """Per-token GroupNorm over ``num_groups`` contiguous groups of ``dim`` channels; scale (ones) and
    bias (zeros) ``[dim]``, logical axis ``names`` (default ``(NORM,)``)."""

    def __init__(
        self,
        dim: int,
        num_groups: int,
        eps: float,
        *,
        param_dtype: str | jnp.dtype = jnp.float32,
        names: tuple[str | None, ...] = (NORM,),
    ):
        if dim % num_groups != 0:
            raise ValueError(f"GroupNorm: num_groups={num_groups} does not divide dim={dim}")
        self.eps = eps
        self.num_groups = num_groups
        self.scale = sharded_param(jnp.ones((dim,), jnp.dtype(param_dtype)), names)
        self.bias = sharded_param(jnp.zeros((dim,), jnp.dtype(param_dtype)), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps)

"""Dense projection ``y = x @ W + b`` with a ``[in, out]`` kernel carrying logical axis names.

Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at use. Hugging Face / torch
``Linear`` weights are ``[out, in]``; converters transpose.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.params import init_param

Initializer = Callable[..., jax.Array]
DEFAULT_KERNEL_INIT: Initializer = nnx.initializers.normal(0.02)
ZEROS_INIT: Initializer = nnx.initializers.zeros_init()


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, dtype=None) -> jax.Array:
    """``x [..., in] @ kernel [in, out] (+ bias [out])`` computed in ``dtype`` (default ``x.dtype``)."""
    dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
    y = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


class Linear(nnx.Module):
    """``kernel [in, out]`` with logical names ``names = (in_name, out_name)``; optional ``bias [out]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str | None, str | None],
        use_bias: bool = False,
        dtype: str | jnp.dtype = jnp.float32,
        param_dtype: str | jnp.dtype = jnp.float32,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = ZEROS_INIT,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = jnp.dtype(dtype)
        self.kernel = init_param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = (
            init_param(rngs, bias_init, (out_features,), (names[1],), param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., in]`` -> ``[..., out]`` in the compute dtype."""
        return linear(x, self.kernel[...], None if self.bias is None else self.bias[...], dtype=self.dtype)

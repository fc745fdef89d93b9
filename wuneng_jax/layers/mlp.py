"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Qwen2 / Llama MLP, no biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.linear import Linear, linear
from wuneng_jax.sharding import ACT_MLP, BATCH, EMBED, LENGTH, MLP, constrain


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, dtype=None) -> jax.Array:
    """x ``[B,T,d]``; w_gate, w_up ``[d,F]``; w_down ``[F,d]`` -> ``[B,T,d]`` in ``dtype`` (default x's)."""
    h = jax.nn.silu(linear(x, w_gate, dtype=dtype)) * linear(x, w_up, dtype=dtype)
    h = constrain(h, (BATCH, LENGTH, ACT_MLP))
    return linear(h, w_down, dtype=dtype)


class SwiGLU(nnx.Module):
    """``gate_proj``/``up_proj`` ``[d,F]`` (EMBED, MLP), ``down_proj`` ``[F,d]`` (MLP, EMBED)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: str | jnp.dtype = jnp.float32,
        param_dtype: str | jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(init_std)
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        self.gate_proj = Linear(hidden_size, intermediate_size, names=(EMBED, MLP), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, names=(EMBED, MLP), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, names=(MLP, EMBED), **kw)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return swiglu(
            x,
            self.gate_proj.kernel[...],
            self.up_proj.kernel[...],
            self.down_proj.kernel[...],
            dtype=self.dtype,
        )

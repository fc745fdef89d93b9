"""Sequential reference of the RWKV-7 recurrence (``lax.scan`` over time): the ground truth in tests.

Per batch element and head, state ``S`` is ``[N_v, N_k]`` (value rows x key columns, BlinkDL layout)::

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ,   o_t = S_t r_t ,   w_t = exp(log_w_t)

A ``reset`` at t zeroes the state entering token t (packed documents).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def wkv7_reference(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array,
    reset: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Sequential scan. Inputs ``[B,T,H,N]`` in the compute dtype, ``initial_state`` ``[B,H,N,N]``.

    Returns ``o`` ``[B,T,H,N]`` and the final state ``[B,H,N,N]``, both in the compute dtype.
    """
    w = jnp.exp(log_w)
    if reset is None:
        reset = jnp.zeros(r.shape[:2], dtype=bool)

    def step(s, xs):
        r_t, w_t, k_t, v_t, a_t, b_t, reset_t = xs  # [B,H,N] each, reset_t [B]
        s = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(s), s)
        sa = jnp.einsum("bhij,bhj->bhi", s, a_t, precision=_HI)
        s = s * w_t[:, :, None, :] + sa[..., None] * b_t[:, :, None, :] + v_t[..., None] * k_t[:, :, None, :]
        o_t = jnp.einsum("bhij,bhj->bhi", s, r_t, precision=_HI)
        return s, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (r, w, k, v, a, b)) + (jnp.moveaxis(reset, 1, 0),)
    final_state, o = jax.lax.scan(step, initial_state, xs)
    return jnp.moveaxis(o, 0, 1), final_state

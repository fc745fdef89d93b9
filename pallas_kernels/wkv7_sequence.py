"""The RWKV-7 recurrence over a sequence split across devices (context parallelism), inside ``shard_map``.

Each device holds a contiguous block of the sequence (``[B, T/P, H, N]``, block ``i`` of ``P`` along the mesh
axis ``axis_name``). The recurrence is linear in the state entering a block, so a block is fully described by
two local passes of the ordinary op, run in parallel on every device:

* the **local pass** with a zero entering state gives the block's outputs ``o⁰`` and outgoing state ``S⁰``;
* the **transition pass** with the identity as entering state and ``k = v = 0`` gives, as its outputs,
  ``q_t = Π_{u≤t} (diag(w_u) + a_u b_uᵀ) r_t`` and, as its final state, the block's transition
  ``A = Π_t (diag(w_t) + a_t b_tᵀ)`` (``[N,N]`` per head; a reset in the block zeroes it, and every ``q_t``
  from the reset on).

With ``S_in`` the state entering the block, ``o_t = o⁰_t + S_in q_t`` and ``S_out = S_in A + S⁰``. The entering
states follow from one ``all_gather`` of the per-block summaries ``(A_j, S⁰_j)`` (``2·B·H·N²`` floats per
device, independent of the sequence length) and a fold over the ``P`` blocks on every device,
``S_in,i+1 = S_in,i A_i + S⁰_i`` from the initial state: ``P`` small matmuls, negligible next to the passes,
so a log-depth combine is not worth its code at pod sizes (``P`` ≤ a few dozen). No device ever holds another
block's activations: the memory per device falls linearly with ``P``. The price is the transition pass (the
same work as the local pass). Gradients flow through the same ops (the kernels' VJPs, the ``all_gather``'s
transpose, the einsums).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
#: ``op(r, log_w, k, v, a, b, initial_state, reset) -> (o, final_state)`` on local blocks (``[B,T,H,N]``)
LocalOp = Callable[..., tuple[jax.Array, jax.Array]]


def wkv7_sequence_sharded(
    op: LocalOp,
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array,
    reset: jax.Array | None,
    *,
    axis_name: str | tuple[str, ...],
) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` with the sequence split over ``axis_name``: local blocks ``[B, T/P, H, N]`` of the
    inputs (``reset`` ``[B, T/P]`` or None), ``initial_state`` ``[B,H,N,N]`` (the state entering the whole
    sequence, the same on every block). Returns the block's outputs ``o`` ``[B, T/P, H, N]`` and the final
    state of the whole sequence ``[B,H,N,N]`` (the same on every block)."""
    bsz, _, heads, n = r.shape
    state_dtype = initial_state.dtype
    zeros_state = jnp.zeros_like(initial_state)
    o_local, s_local = op(r, log_w, k, v, a, b, zeros_state, reset)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=state_dtype), (bsz, heads, n, n))
    zero_rows = jnp.zeros_like(k)
    q, transition = op(r.astype(state_dtype), log_w, zero_rows, zero_rows, a, b, eye, reset)  # q in f32
    # every block's (A_j, S⁰_j): [P, B, H, N, N] each, in block order
    transitions = jax.lax.all_gather(transition, axis_name)
    locals_ = jax.lax.all_gather(s_local, axis_name)
    index = jax.lax.axis_index(axis_name)

    def fold(carry, block):
        s_in, entering = carry
        a_j, s0_j, j = block
        entering = jnp.where(j == index, s_in, entering)
        s_out = jnp.einsum("bhij,bhjk->bhik", s_in, a_j, precision=_HI) + s0_j
        return (s_out, entering), None

    blocks = (transitions, locals_, jnp.arange(transitions.shape[0]))
    (final_state, entering), _ = jax.lax.scan(fold, (initial_state, zeros_state), blocks)
    correction = jnp.einsum("bhij,bthj->bthi", entering, q, precision=_HI)
    o = (o_local.astype(state_dtype) + correction).astype(o_local.dtype)
    return o, final_state

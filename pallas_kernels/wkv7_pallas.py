"""``wkv7(..., impl="pallas")``: the chunked WY form with its sequential stage as a Pallas kernel.

The three-stage split of ``rwkv7-and-kernels.md`` §6.2:

* stage A (XLA, all chunks in parallel): :func:`pallas_kernels.wkv7_chunked.chunk_terms` — decays, the four
  interaction matrices, the ladder inverse, the WY factors ``W, U``, ``B̄``, ``g = e^{Γ_L}``, ``X = Vᵀ K̄``;
* stage B (Pallas, sequential over chunks, state resident on chip):
  :func:`pallas_kernels.wkv7_state_pass.state_pass` with a hand-written VJP whose backward is a second kernel;
* stage C (XLA, all chunks in parallel): :func:`pallas_kernels.wkv7_chunked.chunk_outputs`.

Stages A and C are the very code of ``impl="chunked"`` and are differentiated by JAX autodiff; only stage B
differs, so the two implementations agree to float32 rounding.
"""

from __future__ import annotations

import jax

from pallas_kernels.wkv7_chunked import chunk_outputs, chunk_terms
from pallas_kernels.wkv7_state_pass import StatePassConfig, state_pass

# NC = T/64 sequential steps; RWKV-7 decays keep stage A on its matmul path at L = 64 (factored_bound(64) > 0.61)
DEFAULT_PALLAS_CHUNK = 64


def _vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Inside ``shard_map``: mark ``x`` varying over the manual axes ``ref`` varies over (a zero initial state
    is device-invariant, but the state it becomes is not; scans and kernels need one type)."""
    missing = tuple(sorted(jax.typeof(ref).mat.varying - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def wkv7_pallas(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int = DEFAULT_PALLAS_CHUNK,
    config: StatePassConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[B,T,H,N]`` in the compute dtype (float32; float64 only with an interpreted kernel),
    ``initial_state`` ``[B,H,N,N]``, ``reset`` bool ``[B,T]`` or None. Any ``T`` (tail padded with identity steps).

    Returns ``o`` ``[B,T,H,N]`` and the final state ``[B,H,N,N]``, both in the compute dtype.
    """
    chunk = int(chunk_size)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(
            f"wkv7 pallas: chunk_size={chunk} must be a power of two >= 16 (Triton dot tiles); 64 is the default"
        )
    config = config or StatePassConfig()
    terms = chunk_terms(r, log_w, k, v, a, b, reset, chunk)  # stage A
    s0 = _vary_like(initial_state.astype(terms.w_wy.dtype), terms.w_wy)
    s_in, sa, final_state = state_pass(
        terms.w_wy, terms.u_wy, terms.g, terms.b_bar, terms.x_kv, s0, config
    )  # B
    return chunk_outputs(terms, s_in, sa, r.shape[1]), final_state  # stage C

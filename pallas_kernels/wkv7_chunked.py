"""Chunked (WY / UT-transform) form of the RWKV-7 recurrence in plain JAX: the CPU path and XLA fallback.

Notation follows ``rwkv7-and-kernels.md`` §2. Per chunk of ``L`` steps (one batch element, one head),
with ``ℓ = log w`` and row-stacked ``R, K, V, A, B`` ``[L,N]``::

    M_ab[t,s] = Σ_j A[t,j] B[s,j] exp(Σ_{s<u<t} ℓ_u[j])     (s < t)     M_ak: K instead of B
    M_rb[t,s] = Σ_j R[t,j] B[s,j] exp(Σ_{s<u≤t} ℓ_u[j])     (s ≤ t)     M_rk: K instead of B
    Ã = A ⊙ e^{Γ⁻},  R̃ = R ⊙ e^{Γ},  B̄ = B ⊙ e^{Γ_L-Γ},  K̄ = K ⊙ e^{Γ_L-Γ}
    (I - M_ab) [W | U] = [Ã | M_ak V]           (unit lower-triangular solve, forward substitution)
    SA = U + W S0ᵀ ;  Y = R̃ S0ᵀ + M_rb SA + M_rk V ;  S_L = S0 ⊙ e^{Γ_L} + SAᵀ B̄ + Vᵀ K̄

Numerics (the traps of §2.3-2.4, §5):
* every decay factor is ``exp`` of a *segment sum* of log decays computed directly (never a difference of
  two cumulative sums, never a positive exponent), so decays down to 0 (ℓ = -inf), exactly 1 (ℓ = 0) and
  mixtures of both are exact: the pairwise ``[L,L,N]`` form, recomputed in the backward pass (remat);
* the triangular system is solved by substitution (``solve_triangular``), never a Neumann product;
* state, decays and accumulation stay in float32 (float64 under x64) whatever the input dtype.

Packed documents: ``reset`` counts ``c_t`` (resets at positions ≤ t in the chunk) mask every term that would
cross a document start: pairs (t, s) need ``c_t == c_s``, the incoming state needs ``c_t == 0``, the outgoing
state needs ``c_s == c_{L-1}``.

Structure (recurrentgemma / maxtext style): stage A builds every state-independent chunk quantity for all
chunks at once; stage B is the only sequential part, a ``lax.scan`` over chunks carrying the ``[N,N]`` state
(two small matmuls per chunk); stage C forms the outputs for all chunks at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=_HI)


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """``[B,T,H,N]`` (T = num_chunks * chunk) -> ``[B,H,NC,L,N]``."""
    bsz, _, heads, n = x.shape
    return x.reshape(bsz, num_chunks, chunk, heads, n).transpose(0, 3, 1, 2, 4)


def _from_chunks(x: jax.Array) -> jax.Array:
    """``[B,H,NC,L,N]`` -> ``[B,T,H,N]``."""
    bsz, heads, nc, chunk, n = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(bsz, nc * chunk, heads, n)


@jax.checkpoint
def _interaction_matrices(
    r: jax.Array, k: jax.Array, a: jax.Array, b: jax.Array, log_w: jax.Array, same_seg: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The four decayed ``[L,L]`` interaction matrices of every chunk (pairwise-exponent form).

    Args: ``r, k, a, b, log_w`` ``[B,H,NC,L,N]``; ``same_seg`` bool ``[B,1,NC,L,L]`` (no reset in (s, t]).
    Returns ``M_ab, M_ak`` (strictly lower) and ``M_rb, M_rk`` (lower incl. diagonal), ``[B,H,NC,L,L]``.
    Rematerialised in the backward pass so the ``[L,L,N]`` decay tensors are never stored.
    """
    chunk = log_w.shape[-2]
    t_idx = jnp.arange(chunk)[:, None]
    s_idx = jnp.arange(chunk)[None, :]
    # seg[..., t, s, n] = Σ_{s<u≤t} ℓ_u[n]  (for t ≥ s), by a masked cumulative sum over t.
    terms = jnp.where((t_idx > s_idx)[..., None], log_w[..., :, None, :], 0.0)
    seg_incl = jnp.cumsum(terms, axis=-3)
    # Σ_{s<u<t} ℓ_u = seg_incl[t-1, s]: shift one row down (row 0 is never used: it needs s < 0).
    seg_excl = jnp.concatenate([jnp.zeros_like(seg_incl[..., :1, :, :]), seg_incl[..., :-1, :, :]], axis=-3)
    incl_mask = ((t_idx >= s_idx) & same_seg)[..., None]
    excl_mask = ((t_idx > s_idx) & same_seg)[..., None]
    d_incl = jnp.where(incl_mask, jnp.exp(jnp.where(incl_mask, seg_incl, 0.0)), 0.0)
    d_excl = jnp.where(excl_mask, jnp.exp(jnp.where(excl_mask, seg_excl, 0.0)), 0.0)
    m_ab = _einsum("...tn,...sn,...tsn->...ts", a, b, d_excl)
    m_ak = _einsum("...tn,...sn,...tsn->...ts", a, k, d_excl)
    m_rb = _einsum("...tn,...sn,...tsn->...ts", r, b, d_incl)
    m_rk = _einsum("...tn,...sn,...tsn->...ts", r, k, d_incl)
    return m_ab, m_ak, m_rb, m_rk


def wkv7_chunked(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int = 16,
) -> tuple[jax.Array, jax.Array]:
    """Chunked WY form. Inputs ``[B,T,H,N]`` in the compute dtype, ``initial_state`` ``[B,H,N,N]``.

    Any ``T``: the tail is padded with identity steps (ℓ = 0, r = k = v = a = b = 0).
    Returns ``o`` ``[B,T,H,N]`` and the final state ``[B,H,N,N]``, both in the compute dtype.
    """
    bsz, seq_len, _, _ = r.shape
    chunk = int(chunk_size)
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len
    if reset is None:
        reset = jnp.zeros((bsz, seq_len), dtype=bool)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        r, log_w, k, v, a, b = (jnp.pad(x, widths) for x in (r, log_w, k, v, a, b))
        reset = jnp.pad(reset, ((0, 0), (0, pad)))
    r, log_w, k, v, a, b = (_to_chunks(x, num_chunks, chunk) for x in (r, log_w, k, v, a, b))

    # Resets seen so far in the chunk, inclusive: [B,1,NC,L] (broadcast over heads).
    count = jnp.cumsum(reset.reshape(bsz, 1, num_chunks, chunk).astype(jnp.int32), axis=-1)
    same_seg = count[..., :, None] == count[..., None, :]  # [B,1,NC,L,L]
    from_start = (count == 0)[..., None]  # row t sees the incoming state
    to_end = (count == count[..., -1:])[..., None]  # row s reaches the outgoing state
    chunk_clear = (count[..., -1] == 0)[..., None]  # the state passes the whole chunk

    # Stage A: state-independent quantities, all chunks in parallel.
    zero_row = jnp.zeros_like(log_w[..., :1, :])
    gamma_incl = jnp.cumsum(log_w, axis=-2)  # Σ_{u≤t}
    gamma_excl = jnp.cumsum(jnp.concatenate([zero_row, log_w[..., :-1, :]], axis=-2), axis=-2)  # Σ_{u<t}
    gamma_rest = jnp.flip(  # Σ_{u>t}
        jnp.cumsum(jnp.concatenate([zero_row, jnp.flip(log_w, -2)[..., :-1, :]], axis=-2), axis=-2), -2
    )
    gamma_total = jnp.sum(log_w, axis=-2)  # [B,H,NC,N]

    a_tilde = jnp.where(from_start, a * jnp.exp(gamma_excl), 0.0)
    r_tilde = jnp.where(from_start, r * jnp.exp(gamma_incl), 0.0)
    b_bar = jnp.where(to_end, b * jnp.exp(gamma_rest), 0.0)
    k_bar = jnp.where(to_end, k * jnp.exp(gamma_rest), 0.0)
    g = jnp.where(chunk_clear, jnp.exp(gamma_total), 0.0)

    m_ab, m_ak, m_rb, m_rk = _interaction_matrices(r, k, a, b, log_w, same_seg)
    eye = jnp.eye(chunk, dtype=r.dtype)
    rhs = jnp.concatenate([a_tilde, _einsum("...ts,...sn->...tn", m_ak, v)], axis=-1)
    sol = jax.scipy.linalg.solve_triangular(eye - m_ab, rhs, lower=True, unit_diagonal=True)
    w_wy, u_wy = sol[..., :, : a.shape[-1]], sol[..., :, a.shape[-1] :]  # SA = U + W S0ᵀ
    x_kv = _einsum("...si,...sj->...ij", v, k_bar)  # Vᵀ K̄  [B,H,NC,N,N]

    # Stage B: the sequential inter-chunk state pass.
    def step(s, xs):
        w_c, u_c, g_c, bb_c, x_c = xs
        sa = u_c + _einsum("bhtj,bhij->bhti", w_c, s)  # [B,H,L,N_v]
        s_next = s * g_c[:, :, None, :] + _einsum("bhti,bhtj->bhij", sa, bb_c) + x_c
        return s_next, (s, sa)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w_wy, u_wy, g, b_bar, x_kv))
    final_state, (s_in, sa) = jax.lax.scan(step, initial_state, xs)
    s_in, sa = jnp.moveaxis(s_in, 0, 2), jnp.moveaxis(sa, 0, 2)  # [B,H,NC,N,N], [B,H,NC,L,N]

    # Stage C: outputs, all chunks in parallel.
    y = (
        _einsum("...tj,...ij->...ti", r_tilde, s_in)
        + _einsum("...ts,...si->...ti", m_rb, sa)
        + _einsum("...ts,...si->...ti", m_rk, v)
    )
    o = _from_chunks(y)[:, :seq_len]
    return o, final_state

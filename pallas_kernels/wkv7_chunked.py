"""Chunked (WY / UT-transform) form of the RWKV-7 recurrence in plain JAX: the CPU path and XLA fallback.

Notation follows ``rwkv7-and-kernels.md`` §2. Per chunk of ``L`` steps (one batch element, one head),
with ``ℓ = log w`` and row-stacked ``R, K, V, A, B`` ``[L,N]``::

    M_ab[t,s] = Σ_j A[t,j] B[s,j] exp(Σ_{s<u<t} ℓ_u[j])     (s < t)     M_ak: K instead of B
    M_rb[t,s] = Σ_j R[t,j] B[s,j] exp(Σ_{s<u≤t} ℓ_u[j])     (s ≤ t)     M_rk: K instead of B
    Ã = A ⊙ e^{Γ⁻},  R̃ = R ⊙ e^{Γ},  B̄ = B ⊙ e^{Γ_L-Γ},  K̄ = K ⊙ e^{Γ_L-Γ}
    (I - M_ab) [W | U] = [Ã | M_ak V]           (unit lower-triangular solve, forward substitution)
    SA = U + W S0ᵀ ;  Y = R̃ S0ᵀ + M_rb SA + M_rk V ;  S_L = S0 ⊙ e^{Γ_L} + SAᵀ B̄ + Vᵀ K̄

Numerics (the traps of §2.3-2.4, §5):
* the interaction matrices are plain matmuls of centred factors ``e^{Γ-ρ}``, ``e^{ρ-Γ}`` when every
  ``|ℓ|`` is within :func:`factored_bound` (RWKV-7's decay parametrisation guarantees it); otherwise (decays
  near 0, ℓ = -inf, ...) a ``lax.cond`` takes the exact pairwise form, where every decay factor is ``exp`` of
  a directly summed segment of log decays (never a difference of two cumulative sums, never a positive
  exponent), recomputed in the backward pass (remat);
* the unit-triangular inverse is the exact ladder (:func:`unit_lower_inverse`), never a Neumann product;
* state, decays and accumulation stay in float32 (float64 under x64) whatever the input dtype.

Packed documents: ``reset`` counts ``c_t`` (resets at positions ≤ t in the chunk) mask every term that would
cross a document start: pairs (t, s) need ``c_t == c_s``, the incoming state needs ``c_t == 0``, the outgoing
state needs ``c_s == c_{L-1}``.

Structure (recurrentgemma / maxtext style): stage A builds every state-independent chunk quantity for all
chunks at once; stage B is the only sequential part, a ``lax.scan`` over chunks carrying the ``[N,N]`` state
(two small matmuls per chunk); stage C forms the outputs for all chunks at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def _pair_masks(chunk: int, same_seg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masks ``[B,1,NC,L,L]`` of the pairs (t, s) that interact: ``s <= t`` (incl) / ``s < t`` (excl)."""
    t_idx = np.arange(chunk)[:, None]
    s_idx = np.arange(chunk)[None, :]
    return (t_idx >= s_idx) & same_seg, (t_idx > s_idx) & same_seg


def factored_bound(chunk: int) -> float:
    """Largest |ℓ| for which the factored form cannot overflow: every factor stays within e^{±30}."""
    return 60.0 / (chunk + 2)


def _interaction_matrices_pairwise(r, k, a, b, log_w, same_seg):
    """The four decayed ``[L,L]`` interaction matrices, exact for any ``ℓ <= 0`` (pairwise exponents).

    Args: ``r, k, a, b, log_w`` ``[B,H,NC,L,N]``; ``same_seg`` bool ``[B,1,NC,L,L]`` (no reset in (s, t]).
    Returns ``M_ab, M_ak`` (strictly lower) and ``M_rb, M_rk`` (lower incl. diagonal), ``[B,H,NC,L,L]``.
    The ``[L,L,N]`` decay tensors exist only for one group of chunks at a time (``lax.map``) and are
    rematerialised in the backward pass, so memory stays bounded at any size.
    """
    chunk, n = log_w.shape[-2:]
    lead = log_w.shape[:-2]
    same_seg = jnp.broadcast_to(same_seg, lead + same_seg.shape[-2:])
    xs = tuple(x.reshape((-1,) + x.shape[-2:]) for x in (r, k, a, b, log_w, same_seg))
    group = max(1, min((1 << 22) // (chunk * chunk * n), xs[0].shape[0]))
    outs = jax.lax.map(lambda t: jax.checkpoint(_pairwise_block)(*t), xs, batch_size=group)
    return tuple(o.reshape(lead + o.shape[-2:]) for o in outs)


def _pairwise_block(r, k, a, b, log_w, same_seg):
    """:func:`_interaction_matrices_pairwise` on ``[G,L,N]`` chunks. Every exponent is a directly summed
    segment ``Σ_{s<u≤t} ℓ_u`` (never a difference of cumulative sums, which loses everything when one ℓ is
    huge)."""
    chunk = log_w.shape[-2]
    incl, excl = _pair_masks(chunk, same_seg)
    after_s = np.arange(chunk)[:, None, None] > np.arange(chunk)[None, :, None]  # [t, s, 1]: u = t > s
    terms = jnp.where(after_s, log_w[..., :, None, :], 0.0)
    seg_incl = jnp.cumsum(terms, axis=-3)  # [..., t, s, n] = Σ_{s<u≤t} ℓ_u
    # Σ_{s<u<t} ℓ_u = seg_incl[t-1, s]: shift one row down (row 0 is never used: it needs s < 0).
    seg_excl = jnp.concatenate([jnp.zeros_like(seg_incl[..., :1, :, :]), seg_incl[..., :-1, :, :]], axis=-3)
    d_incl = jnp.where(incl[..., None], jnp.exp(jnp.where(incl[..., None], seg_incl, 0.0)), 0.0)
    d_excl = jnp.where(excl[..., None], jnp.exp(jnp.where(excl[..., None], seg_excl, 0.0)), 0.0)
    bk = jnp.stack([b, k], axis=-3)  # [..., 2, L, N]: one contraction serves both right operands
    m_ab, m_ak = jnp.unstack(_einsum("...tsn,...csn->...cts", a[..., :, None, :] * d_excl, bk), axis=-3)
    m_rb, m_rk = jnp.unstack(_einsum("...tsn,...csn->...cts", r[..., :, None, :] * d_incl, bk), axis=-3)
    return m_ab, m_ak, m_rb, m_rk


def _interaction_matrices_factored(r, k, a, b, log_w, same_seg):
    """Same as :func:`_interaction_matrices_pairwise` as plain matmuls, valid while
    ``|ℓ| <= factored_bound(L)`` (RWKV-7's ``|ℓ| < e^{-1/2}`` always is for L <= 64).

    ``e^{Γ_t - Γ_s} = e^{Γ_t - ρ} e^{ρ - Γ_s}`` with ``ρ`` the cumulative log decay at the chunk's middle row,
    so both factors stay within ``e^{±(L/2)|ℓ|max}`` (fla's "safe gate", maxtext's centering). ``ℓ`` is
    clamped to the bound so the branch stays finite even when it is not the one selected.
    """
    chunk = log_w.shape[-2]
    incl, excl = _pair_masks(chunk, same_seg)
    log_w = jnp.maximum(log_w, -factored_bound(chunk))
    gamma = jnp.cumsum(log_w, axis=-2)
    rho = gamma[..., chunk // 2 : chunk // 2 + 1, :]
    right = jnp.exp(rho - gamma)
    bk = jnp.stack([b * right, k * right], axis=-3)  # [..., 2, L, N]
    m_ab, m_ak = jnp.unstack(_einsum("...tn,...csn->...cts", a * jnp.exp(gamma - log_w - rho), bk), axis=-3)
    m_rb, m_rk = jnp.unstack(_einsum("...tn,...csn->...cts", r * jnp.exp(gamma - rho), bk), axis=-3)
    return (
        jnp.where(excl, m_ab, 0.0),
        jnp.where(excl, m_ak, 0.0),
        jnp.where(incl, m_rb, 0.0),
        jnp.where(incl, m_rk, 0.0),
    )


def _interaction_matrices(r, k, a, b, log_w, same_seg):
    """Matmul form when every decay allows it (always, for RWKV-7 models), exact pairwise form otherwise."""
    safe = jnp.min(log_w) >= -factored_bound(log_w.shape[-2])
    args = (r, k, a, b, log_w, same_seg)
    return jax.lax.cond(safe, _interaction_matrices_factored, _interaction_matrices_pairwise, *args)


def unit_lower_inverse(m: jax.Array) -> jax.Array:
    """``(I - M)^{-1}`` for strictly lower-triangular ``M`` ``[..., L, L]`` (L a power of two).

    Recursive doubling of the block size ("ladder", rwkv7-and-kernels.md §2.4): with ``X`` the inverse of the
    block-diagonal part at block size ``c``, the inverse at ``2c`` is ``X + X M_c X``, where ``M_c`` keeps the
    lower-left ``c x c`` block of every ``2c x 2c`` diagonal block. Exact in exact arithmetic, ``2 log2 L``
    matmuls, and no cancellation (unlike the Neumann product ``(I+M)(I+M²)...``).
    """
    size = m.shape[-1]
    if size & (size - 1):
        raise ValueError(f"unit_lower_inverse: L={size} must be a power of two")
    row, col = np.arange(size)[:, None], np.arange(size)[None, :]
    # block 1: X = I, so the first step is I + M_1 (no matmuls; the v6e compiler rejects the 1x1-block form)
    first = ((row // 2) == (col // 2)) & (row % 2 == 1) & (col % 2 == 0)
    x = jnp.broadcast_to(jnp.eye(size, dtype=m.dtype), m.shape) + m * first.astype(m.dtype)
    block = 2
    while block < size:  # masks are numpy constants: cheaper to compile
        same_pair = (row // (2 * block)) == (col // (2 * block))
        lower_left = ((row // block) % 2 == 1) & ((col // block) % 2 == 0)
        m_block = m * (same_pair & lower_left).astype(m.dtype)
        x = x + jnp.matmul(jnp.matmul(x, m_block, precision=_HI), x, precision=_HI)
        block *= 2
    return x


class ChunkTerms(NamedTuple):
    """Stage-A quantities of the chunked form, ``[B,H,NC,...]`` in the compute dtype (see module docstring).

    Stage-B inputs: ``w_wy, u_wy, b_bar`` ``[B,H,NC,L,N]``, ``g`` ``[B,H,NC,N]`` (``e^{Γ_L}``, zero when the
    chunk holds a reset), ``x_kv = Vᵀ K̄`` ``[B,H,NC,N,N]``.
    Stage-C inputs: ``r_tilde, v`` ``[B,H,NC,L,N]``, ``m_rb, m_rk`` ``[B,H,NC,L,L]``.
    """

    w_wy: jax.Array
    u_wy: jax.Array
    g: jax.Array
    b_bar: jax.Array
    x_kv: jax.Array
    r_tilde: jax.Array
    m_rb: jax.Array
    m_rk: jax.Array
    v: jax.Array


def chunk_terms(
    r: jax.Array,
    log_w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    reset: jax.Array | None,
    chunk_size: int,
) -> ChunkTerms:
    """Stage A: every state-independent chunk quantity, all chunks in parallel.

    Inputs ``[B,T,H,N]`` in the compute dtype (any ``T``: the tail is padded with identity steps, ℓ = 0,
    r = k = v = a = b = 0), ``reset`` bool ``[B,T]`` or None.
    """
    bsz, seq_len, _, _ = r.shape
    chunk = int(chunk_size)
    if chunk & (chunk - 1):
        raise ValueError(f"wkv7 chunked: chunk_size={chunk} must be a power of two (8, 16, 32, 64, ...)")
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
    t_inv = unit_lower_inverse(m_ab)  # T = (I - M_ab)^{-1}
    w_wy = _einsum("...ts,...sn->...tn", t_inv, a_tilde)  # SA = U + W S0ᵀ
    u_wy = _einsum("...ts,...sn->...tn", _einsum("...ts,...su->...tu", t_inv, m_ak), v)
    x_kv = _einsum("...si,...sj->...ij", v, k_bar)  # Vᵀ K̄  [B,H,NC,N,N]
    return ChunkTerms(w_wy, u_wy, g, b_bar, x_kv, r_tilde, m_rb, m_rk, v)


def state_pass_scan(
    w_wy: jax.Array,
    u_wy: jax.Array,
    g: jax.Array,
    b_bar: jax.Array,
    x_kv: jax.Array,
    initial_state: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage B as a ``lax.scan`` over chunks: ``SA_c = U_c + W_c S_cᵀ``, ``S_{c+1} = S_c ⊙ g_c + SA_cᵀ B̄_c + X_c``.

    Args: ``w_wy, u_wy, b_bar`` ``[B,H,NC,L,N]``, ``g`` ``[B,H,NC,N]``, ``x_kv`` ``[B,H,NC,N,N]``,
    ``initial_state`` ``[B,H,N,N]``.
    Returns the state entering each chunk ``[B,H,NC,N,N]``, ``SA`` ``[B,H,NC,L,N]``, the final state ``[B,H,N,N]``.
    """

    def step(s, xs):
        w_c, u_c, g_c, bb_c, x_c = xs
        sa = u_c + _einsum("bhtj,bhij->bhti", w_c, s)  # [B,H,L,N_v]
        s_next = s * g_c[:, :, None, :] + _einsum("bhti,bhtj->bhij", sa, bb_c) + x_c
        return s_next, (s, sa)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w_wy, u_wy, g, b_bar, x_kv))
    final_state, (s_in, sa) = jax.lax.scan(step, initial_state, xs)
    return jnp.moveaxis(s_in, 0, 2), jnp.moveaxis(sa, 0, 2), final_state


def chunk_outputs(terms: ChunkTerms, s_in: jax.Array, sa: jax.Array, seq_len: int) -> jax.Array:
    """Stage C: ``Y_c = R̃ S_cᵀ + M_rb SA_c + M_rk V`` for all chunks at once -> ``o`` ``[B,T,H,N]``."""
    y = (
        _einsum("...tj,...ij->...ti", terms.r_tilde, s_in)
        + _einsum("...ts,...si->...ti", terms.m_rb, sa)
        + _einsum("...ts,...si->...ti", terms.m_rk, terms.v)
    )
    return _from_chunks(y)[:, :seq_len]


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
    terms = chunk_terms(r, log_w, k, v, a, b, reset, chunk_size)  # stage A
    s_in, sa, final_state = state_pass_scan(
        terms.w_wy, terms.u_wy, terms.g, terms.b_bar, terms.x_kv, initial_state
    )
    return chunk_outputs(terms, s_in, sa, r.shape[1]), final_state  # stage C

"""One chunk of the RWKV-7 recurrence in closed form: the body of the fused kernels, exact for every decay.

``chunk_forward(S, r, ℓ, k, v, a, b, reset) -> (Y, S')`` advances the state ``S`` ``[N_v, N_k]`` over ``L`` steps
(rows ``[L, N]``) and returns the chunk's outputs, with the WY / UT form of ``rwkv7-and-kernels.md`` §2::

    (I - M_ab) [W | U] = [Ã | M_ak V]        T = (I - M_ab)^{-1} by the exact ladder (never a Neumann product)
    SA = U + W Sᵀ ;  Y = R̃ Sᵀ + M_rb SA + M_rk V ;  S' = S ⊙ e^{Γ_L} + SAᵀ B̄ + Vᵀ K̄

Written only with 2-D ``dot_general``, ``exp``, ``where``, ``maximum`` and masks built from ``iota`` with shifts
(no cumsum, gather, dynamic slice, integer division or captured array constants), so the same function is the
body of the Mosaic (TPU) and Triton (GPU) kernels, runs in the Pallas interpreter on CPU, and is differentiated
by ``jax.vjp`` inside the backward kernels (the reverse walk recomputes the chunk on chip).

**Exact for every ℓ in [-inf, 0].** Every decay factor is ``exp`` of a *directly summed* segment of log decays
(never a difference of two cumulative sums, which loses everything after one huge ``|ℓ|``, and never a positive
exponent, which overflows): the prefix / suffix sums ``Σ_{u<t} ℓ_u``, ``Σ_{u>s} ℓ_u`` are matmuls with 0/1
masks, and the decayed pair products ``e^{Σ_{s<u<t} ℓ_u}`` of the interaction matrices are split on a binary
tree over the chunk: the pairs (t, s) whose tree node splits them at a child boundary ``e`` (``s <= e < t``)
factor exactly as ``e^{Σ_{e<u<t} ℓ_u} · e^{Σ_{s<u≤e} ℓ_u}``, both factors in [0, 1]. One level of the tree is four
``[L, N] x [N, L]`` matmuls; ``log2 L`` levels cover every pair once. ``ℓ = -inf`` is clamped to
``LOG_DECAY_FLOOR`` (``e^{-1e30} = 0`` exactly; 0 x inf never occurs). Resets (packed documents) are folded in
exactly: at a reset token ``ℓ = -inf`` and ``a = 0`` make ``S_t = v_t k_tᵀ`` (the state entering it is dropped),
and the gradients of the original ``ℓ_t``, ``a_t`` there are zero, as in the sequential recurrence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
#: log decays below this are the same as -inf (exp underflows to exactly 0); a finite floor keeps 0 x inf out
LOG_DECAY_FLOOR = -1e30


def _dot(x: jax.Array, y: jax.Array, contract_x: int = 1, contract_y: int = 0) -> jax.Array:
    """2-D ``dot_general`` contracting ``x``'s dim ``contract_x`` with ``y``'s ``contract_y``, exact f32
    (``HIGHEST``: Mosaic rounds f32 operands to bf16 otherwise; Triton uses IEEE f32, not TF32)."""
    dims = (((contract_x,), (contract_y,)), ((), ()))
    return jax.lax.dot_general(x, y, dims, precision=_HI, preferred_element_type=x.dtype)


def _index(size: int, axis: int, shape: tuple[int, int]) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _masks(size: int):
    """Row index ``t`` ``[L,L]`` (dim 0), column index ``s`` (dim 1)."""
    return _index(size, 0, (size, size)), _index(size, 1, (size, size))


def _mask(cond: jax.Array, dtype) -> jax.Array:
    return jnp.where(cond, jnp.ones((), dtype), jnp.zeros((), dtype))


def unit_lower_inverse(m: jax.Array) -> jax.Array:
    """``(I - M)^{-1}`` for strictly lower-triangular ``M`` ``[L, L]`` (L a power of two), inside a kernel.

    The exact ladder: with ``X`` the inverse of the block-diagonal part at block size ``c``, the inverse at
    ``2c`` is ``X + X M_c X`` (``M_c`` = the lower-left ``c x c`` block of every ``2c x 2c`` diagonal block).
    ``2 log2 L - 2`` matmuls; the first step (``c = 1``, ``X = I``) is ``I + M_1`` without a matmul.
    """
    size = m.shape[-1]
    t, s = _masks(size)
    x = _mask(t == s, m.dtype) + m * _mask(((t >> 1) == (s >> 1)) & (t > s), m.dtype)
    shift = 1
    while (1 << shift) < size:
        lower_left = (
            ((t >> (shift + 1)) == (s >> (shift + 1))) & (((t >> shift) & 1) == 1) & (((s >> shift) & 1) == 0)
        )
        x = x + _dot(_dot(x, m * _mask(lower_left, m.dtype)), x)
        shift += 1
    return x


def _interaction_matrices_tree(r, log_w, k, a, b):
    """The four decayed ``[L,L]`` interaction matrices of the chunk (rows ``[L,N]``, ``log_w`` finite, <= 0)::

        M_ab[t,s] = Σ_j a_t[j] b_s[j] e^{Σ_{s<u<t} ℓ_u[j]}   (s < t)      M_ak: k instead of b
        M_rb[t,s] = Σ_j r_t[j] b_s[j] e^{Σ_{s<u≤t} ℓ_u[j]}   (s ≤ t)      M_rk: k instead of b

    Built level by level on the binary tree over the chunk (module docstring): at block size ``c``, rows in a
    right child meet columns in the left child of the same ``2c`` node.
    """
    size = log_w.shape[0]
    dtype = log_w.dtype
    t, s = _masks(size)
    m_ab = m_ak = m_rb = m_rk = jnp.zeros((size, size), dtype)
    zero = jnp.zeros((), dtype)
    shift = 0
    while (1 << shift) < size:
        same_block = (t >> shift) == (s >> shift)
        upto = _dot(_mask(same_block & (s < t), dtype), log_w)  # Σ_{block start ≤ u < t} ℓ_u
        after = _dot(_mask(same_block & (s > t), dtype), log_w)  # Σ_{t < u ≤ block end} ℓ_u
        right = ((_index(size, 0, (size, 1)) >> shift) & 1) == 1  # [L,1]: row in a right child
        decay_left = jnp.where(right, zero, jnp.exp(after))  # columns live in left children
        a_f = jnp.where(right, a * jnp.exp(upto), zero)  # rows of right children, decayed to the boundary
        r_f = jnp.where(right, r * jnp.exp(upto + log_w), zero)
        b_f, k_f = b * decay_left, k * decay_left
        node = _mask((t >> (shift + 1)) == (s >> (shift + 1)), dtype)
        m_ab = m_ab + _dot(a_f, b_f, 1, 1) * node
        m_ak = m_ak + _dot(a_f, k_f, 1, 1) * node
        m_rb = m_rb + _dot(r_f, b_f, 1, 1) * node
        m_rk = m_rk + _dot(r_f, k_f, 1, 1) * node
        shift += 1
    diag = _mask(t == s, dtype)  # s = t: no decay in M_rb, M_rk
    m_rb = m_rb + diag * jnp.sum(r * b, axis=1, keepdims=True)
    m_rk = m_rk + diag * jnp.sum(r * k, axis=1, keepdims=True)
    return m_ab, m_ak, m_rb, m_rk


def centred_bound(chunk: int) -> float:
    """Largest ``|ℓ|`` for which the centred factors stay within ``e^{±30}`` (RWKV-7: ``|ℓ| < e^{-1/2}``)."""
    return 60.0 / (chunk + 2)


def _interaction_matrices_centred(r, log_w, k, a, b, before):
    """The same four matrices as four plain ``[L,N] x [N,L]`` products, valid while ``|ℓ| <=
    centred_bound(L)``: ``e^{Σ_{s<u<t} ℓ_u} = e^{Γ⁻_t - ρ} e^{ρ - Γ⁻_s - ℓ_s}`` with ``ρ`` the prefix sum at the
    chunk's middle row, so both factors stay within ``e^{±(L/2)|ℓ|max}`` (fla's "safe gate")."""
    size = log_w.shape[0]
    dtype = log_w.dtype
    t, s = _masks(size)
    rho = _dot(_mask(s < size // 2, dtype), log_w)  # every row: Σ_{u < L/2} ℓ_u (no value slicing in Triton)
    a_f, r_f = a * jnp.exp(before - rho), r * jnp.exp(before + log_w - rho)
    right = jnp.exp(rho - before - log_w)
    b_f, k_f = b * right, k * right
    lower, strict = _mask(t >= s, dtype), _mask(t > s, dtype)
    return (
        _dot(a_f, b_f, 1, 1) * strict,
        _dot(a_f, k_f, 1, 1) * strict,
        _dot(r_f, b_f, 1, 1) * lower,
        _dot(r_f, k_f, 1, 1) * lower,
    )


def _is_bounded(log_w: jax.Array) -> jax.Array:
    """Whether the centred products are exact for this chunk (``log_w`` after resets and the floor)."""
    return jnp.min(log_w) >= -centred_bound(log_w.shape[0])


def _interaction_matrices(r, log_w, k, a, b, before, tree: bool | None):
    """``tree=None``: the centred products when every decay of the chunk allows them (always, for RWKV-7),
    else the exact tree, a per-chunk branch inside the kernel (the tree costs ``log2 L`` times the matmuls);
    ``True`` / ``False`` force one."""
    if tree is None:
        return jax.lax.cond(
            _is_bounded(log_w),
            lambda: _interaction_matrices_centred(r, log_w, k, a, b, before),
            lambda: _interaction_matrices_tree(r, log_w, k, a, b),
        )
    if tree:
        return _interaction_matrices_tree(r, log_w, k, a, b)
    return _interaction_matrices_centred(r, log_w, k, a, b, before)


def _decays(log_w, a, reset):
    """Resets folded into the decays (ℓ = -inf, a = 0 at a reset token), ℓ clamped to the finite floor."""
    if reset is not None:
        log_w = jnp.where(reset, LOG_DECAY_FLOOR, log_w)
        a = jnp.where(reset, 0.0, a)
    return jnp.maximum(log_w, LOG_DECAY_FLOOR), a


def chunk_forward(s, r, log_w, k, v, a, b, reset=None, *, tree: bool | None = None):
    """One chunk. ``s`` ``[N,N]`` (value rows x key columns); ``r, log_w, k, v, a, b`` ``[L,N]`` (L a power of
    two) in ``s``'s dtype; ``reset`` ``[L,1]`` bool or None. Returns ``y`` ``[L,N]`` and the next state ``[N,N]``."""
    log_w, a = _decays(log_w, a, reset)
    size = log_w.shape[0]
    dtype = log_w.dtype
    t, u = _masks(size)
    before = _dot(_mask(u < t, dtype), log_w)  # Σ_{u<t} ℓ_u
    later = _dot(_mask(u > t, dtype), log_w)  # Σ_{u>t} ℓ_u
    total = jnp.sum(log_w, axis=0, keepdims=True)  # [1,N]
    a_tilde = a * jnp.exp(before)
    r_tilde = r * jnp.exp(before + log_w)
    b_bar = b * jnp.exp(later)
    k_bar = k * jnp.exp(later)
    m_ab, m_ak, m_rb, m_rk = _interaction_matrices(r, log_w, k, a, b, before, tree)
    t_inv = unit_lower_inverse(m_ab)
    w_wy = _dot(t_inv, a_tilde)  # [L, N_k]
    u_wy = _dot(t_inv, _dot(m_ak, v))  # [L, N_v]
    sa = u_wy + _dot(w_wy, s, 1, 1)  # SA = U + W Sᵀ   [L, N_v]
    y = _dot(r_tilde, s, 1, 1) + _dot(m_rb, sa) + _dot(m_rk, v)
    s_next = s * jnp.exp(total) + _dot(sa, b_bar, 0, 0) + _dot(v, k_bar, 0, 0)
    return y, s_next


def chunk_backward(s, r, log_w, k, v, a, b, reset, dy, ds_next):
    """Cotangents of :func:`chunk_forward`'s inputs ``(ds, dr, dlog_w, dk, dv, da, db)`` from those of its
    outputs ``(dy, ds_next)``, by recomputing the chunk (``jax.vjp``; runs inside the backward kernels). The
    branch between centred and tree products is taken outside the ``vjp`` (Mosaic cannot lower the
    differentiated ``cond``), on the same condition as the forward."""

    def grads(tree: bool):
        fwd = lambda *xs: chunk_forward(*xs, reset, tree=tree)
        _, vjp = jax.vjp(fwd, s, r, log_w, k, v, a, b)
        return tuple(vjp((dy, ds_next)))

    bounded = _is_bounded(_decays(log_w, a, reset)[0])
    return jax.lax.cond(bounded, lambda: grads(False), lambda: grads(True))


def chunk_flops(chunk: int, n: int, tree: bool = False) -> tuple[int, int]:
    """Matmul FLOPs and ``exp`` count of one :func:`chunk_forward`, on the centred path (what RWKV-7's decays
    take) or the tree (the kernels' cost estimates declare the centred one)."""
    levels = chunk.bit_length() - 1
    interactions = (
        6 * levels if tree else 5
    )  # per level: 2 segment sums + 4 products; centred: ρ + 4 products
    flops = (
        2 * chunk * chunk * n * (2 + interactions + 5)  # prefix/suffix sums, interactions, WY and outputs
        + 4 * chunk**3 * max(levels - 1, 0)  # ladder inverse
        + 8 * chunk * n * n  # W Sᵀ, R̃ Sᵀ, SAᵀ B̄, Vᵀ K̄
    )
    exps = (3 + (3 * levels if tree else 3)) * chunk * n + n
    return flops, exps

"""RWKV-7 (BlinkDL x070) building blocks as pure functions of arrays.

Shared by the ``rwkv7`` family (``wuneng_jax/models/rwkv7.py``) and the WuNeng hybrid layer. Nothing here
holds parameters or knows about Flax: arrays in, arrays out. Exact semantics follow
``rwkv7-and-kernels.md`` §1 and §7.2 (BlinkDL's ``rwkv`` package, x070 path).

Shape legend: ``B`` batch, ``T`` time, ``C`` channels (= ``H*N`` for the attention-sized tensors),
``H`` heads, ``N`` head size, ``D`` a LoRA rank.

The second half of the file holds the initialisation recipe of BlinkDL's ``train_temp`` (§1.5) as
numpy helpers, so every user of RWKV-7 parameters starts from the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd

from pallas_kernels.wkv7 import Partition
from wuneng_jax.sharding import ACT_HEADS, BATCH, LENGTH

#: e^{-1/2}: the decay scale, ``w = exp(-e^{-1/2} * sigmoid(z))`` in (0.5453, 1).
E_HALF: float = math.exp(-0.5)
#: LayerNorm eps of every RWKV-7 LayerNorm (ln0, ln1, ln2, ln_out).
LN_EPS: float = 1e-5
#: GroupNorm eps of ``ln_x`` (per head). The ``rwkv`` package uses 64e-5 whatever the head size.
LN_X_EPS: float = 64e-5
#: ``F.normalize`` eps of the kk normalisation.
KK_EPS: float = 1e-12

# ----------------------------------------------------------------------------------------------------
# Sharding of the recurrence kernel
# ----------------------------------------------------------------------------------------------------


def wkv7_partition(heads: str = ACT_HEADS) -> Partition | None:
    """``partition=`` of :func:`pallas_kernels.wkv7` for inputs ``[B,T,H,N]`` constrained as
    ``(BATCH, LENGTH, heads, None)``: the mesh axes the logical axis rules in context give the batch, head and
    sequence dims (a sequence split over devices runs as context parallelism: each device keeps its block and
    the blocks' states are joined exactly). None without rules (the op then picks batch and head axes itself
    and keeps the sequence whole). Call it where the layer is traced (the rules are read from the context, as
    ``wuneng_jax.sharding.constrain`` reads them).
    """
    rules = spmd.get_logical_axis_rules()
    if not rules:
        return None
    spec = spmd.apply_rules(jax.sharding.PartitionSpec(BATCH, LENGTH, heads, None), rules)
    return spec[0], spec[2], spec[1]


# ----------------------------------------------------------------------------------------------------
# Forward pieces
# ----------------------------------------------------------------------------------------------------


def segment_reset(segment_ids: jax.Array) -> jax.Array:
    """Document starts of a packed row: ``reset[t] = segment_ids[t] != segment_ids[t-1]``.

    Args:
      segment_ids: int ``[B,T]``.
    Returns:
      bool ``[B,T]``; position 0 is ``False`` (the token continues whatever state is passed in, zeros
      for a fresh sequence).
    """
    # Built by one concatenate, not ``document_starts(...).at[:, 0].set(False)``: with the sequence split over
    # devices, XLA's SPMD partitioner (jax 0.10.2) differentiated that concatenate + scatter wrongly (weight
    # gradients off by ~50 %, values right); tests/test_context_parallel.py checks the gradients.
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), changed], axis=1)


def token_shift(x: jax.Array, prev: jax.Array | None = None, reset: jax.Array | None = None) -> jax.Array:
    """The previous token of every position (``x[t-1]``), with a carried previous token for ``t = 0``.

    Args:
      x: ``[B,T,C]``.
      prev: ``[B,C]`` the token before ``x[:, 0]`` (the recurrent shift state); zeros when ``None``.
      reset: optional bool ``[B,T]``; where ``True`` (first token of a document) the previous token is
        zero, so token shift never leaks across packed documents.
    Returns:
      ``[B,T,C]`` in ``x``'s dtype.
    """
    if prev is None:
        prev = jnp.zeros_like(x[:, 0])
    shifted = jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)
    if reset is not None:
        shifted = jnp.where(reset[:, :, None], jnp.zeros((), x.dtype), shifted)
    return shifted


def lerp_mix(x: jax.Array, xx: jax.Array, mu: jax.Array) -> jax.Array:
    """RWKV token-shift lerp ``x + xx * mu`` with ``xx = shift(x) - x`` (``mu = 1``: all previous token).

    Args:
      x: ``[B,T,C]``; xx: ``[B,T,C]``; mu: ``[C]`` (broadcast).
    """
    return x + xx * mu


def lora(
    x: jax.Array, a: jax.Array, b: jax.Array, act: Callable[[jax.Array], jax.Array] | None = None
) -> jax.Array:
    """Low-rank map ``act(x @ a) @ b`` (``x @ a @ b`` when ``act`` is None), no biases.

    Args:
      x: ``[..., C]``; a: ``[C,D]``; b: ``[D,C']``; act: elementwise function (tanh for the decay,
        sigmoid for the gate, None for the ICLR and value-residual LoRAs).
    Returns:
      ``[..., C']``.
    """
    h = x @ a
    if act is not None:
        h = act(h)
    return h @ b


def decay_log(xw: jax.Array, w0: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """Per-step log decay ``log_w = -e^{-1/2} * sigmoid(w0 + tanh(xw @ w1) @ w2)``, in float32.

    The LoRA runs in ``xw``'s dtype; the bias add and sigmoid run in float32 so ``log_w`` keeps
    full precision whatever the compute dtype. ``log_w`` lies in (-0.6065, 0).

    Args:
      xw: ``[B,T,C]`` decay lerp; w0: ``[C]``; w1: ``[C,Dw]``; w2: ``[Dw,C']``.
    Returns:
      float32 ``[B,T,C']`` (float64 for float64 inputs).
    """
    f32 = jnp.promote_types(xw.dtype, jnp.float32)
    z = w0.astype(f32) + lora(xw, w1, w2, jnp.tanh).astype(f32)
    return -E_HALF * jax.nn.sigmoid(z)


def l2_normalize_heads(x: jax.Array, head_size: int, eps: float = KK_EPS) -> jax.Array:
    """Per-head L2 normalisation like ``F.normalize(p=2, eps=1e-12)``: ``x / max(||x||, eps)``.

    Args:
      x: ``[..., H*N]``; head_size: ``N``.
    Returns:
      ``[..., H*N]`` in ``x``'s dtype (the norm is computed in at least float32).
    """
    shape = x.shape
    xh = x.reshape(*shape[:-1], shape[-1] // head_size, head_size)
    xf = xh.astype(jnp.promote_types(x.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    out = xf / jnp.maximum(norm, eps)
    return out.astype(x.dtype).reshape(shape)


def removal_key(k: jax.Array, k_k: jax.Array, head_size: int) -> jax.Array:
    """``kk = l2_normalize_per_head(k * k_k)`` from the ORIGINAL (unmodified) key.

    Args:
      k: ``[B,T,C]``; k_k: ``[C]``; head_size: ``N``.
    Returns:
      ``[B,T,C]``.
    """
    return l2_normalize_heads(k * k_k, head_size)


def modify_key(k: jax.Array, iclr: jax.Array, k_a: jax.Array) -> jax.Array:
    """Replacement key ``k * (1 + (iclr - 1) * k_a)``.

    Args:
      k: ``[B,T,C]``; iclr: ``[B,T,C]`` in-context learning rate (sigmoid LoRA, ``a`` in BlinkDL's
        code); k_a: ``[C]``.
    """
    return k * (1 + (iclr - 1) * k_a)


def bonus(r: jax.Array, k: jax.Array, v: jax.Array, r_k: jax.Array) -> jax.Array:
    """The "bonus" term ``sum_N(r * k * r_k) * v`` per head (added after ``ln_x``).

    Args:
      r, k, v: ``[B,T,H,N]`` (``k`` is the modified key, ``v`` the residual-mixed value); r_k: ``[H,N]``.
    Returns:
      ``[B,T,H,N]``.
    """
    return jnp.sum(r * k * r_k, axis=-1, keepdims=True) * v


def split_heads(x: jax.Array, head_size: int) -> jax.Array:
    """``[..., H*N] -> [..., H, N]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // head_size, head_size)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[..., H, N] -> [..., H*N]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


# ----------------------------------------------------------------------------------------------------
# Initialisation recipe (BlinkDL train_temp, rwkv7-and-kernels.md §1.5). numpy float64 in, cast by caller.
# ----------------------------------------------------------------------------------------------------


def ratio_0_to_1(layer_id: int, n_layer: int) -> float:
    """``r0 = l / (L - 1)`` (0 for a one-layer model, where BlinkDL would divide by zero)."""
    return layer_id / (n_layer - 1) if n_layer > 1 else 0.0


def ratio_1_to_almost0(layer_id: int, n_layer: int) -> float:
    """``r1 = 1 - l / L``."""
    return 1.0 - layer_id / n_layer


def ddd(dim: int) -> np.ndarray:
    """``ddd[n] = n / C``, ``[C]``."""
    return np.arange(dim, dtype=np.float64) / dim


def linear(dim: int) -> np.ndarray:
    """``linear[n] = n / (C - 1) - 0.5``, ``[C]``."""
    return np.arange(dim, dtype=np.float64) / max(dim - 1, 1) - 0.5


def zigzag(dim: int, head_size: int) -> np.ndarray:
    """``zz[n] = z|z|`` with ``z = ((n mod N) - (N-1)/2) / ((N-1)/2)``, ``[C]`` (per-head zig-zag in [-1, 1])."""
    half = (head_size - 1) / 2 if head_size > 1 else 1.0
    z = ((np.arange(dim) % head_size) - (head_size - 1) / 2) / half
    return z * np.abs(z)


def www(dim: int, layer_id: int, n_layer: int) -> np.ndarray:
    """``www[n] = -6 + 6 (n / (C-1))^(1 + r0^0.3)``, ``[C]`` (decay bias ramp)."""
    r0 = ratio_0_to_1(layer_id, n_layer)
    return -6.0 + 6.0 * (np.arange(dim, dtype=np.float64) / max(dim - 1, 1)) ** (1.0 + r0**0.3)


def lora_rank(dim: int, factor: float) -> int:
    """BlinkDL's suggested LoRA rank ``max(32, round(factor * sqrt(C) / 32) * 32)`` (Python rounding)."""
    return max(32, int(round(factor * (dim**0.5) / 32) * 32))


def default_lora_ranks(dim: int) -> dict[str, int]:
    """Suggested ranks ``{"d_decay", "d_aaa", "d_mv", "d_gate"}`` (factors 2.5, 2.5, 1.7, 5).

    C=768 gives 64/64/32/128 (the 0.1B model). Released checkpoints do not always follow it: read
    ranks from the checkpoint's shapes when loading.
    """
    return {
        "d_decay": lora_rank(dim, 2.5),
        "d_aaa": lora_rank(dim, 2.5),
        "d_mv": lora_rank(dim, 1.7),
        "d_gate": lora_rank(dim, 5.0),
    }


def time_mix_init_vectors(dim: int, head_size: int, layer_id: int, n_layer: int) -> dict[str, np.ndarray]:
    """The vector parameters of one time-mix layer at init, float64.

    Returns ``[C]`` arrays ``x_r x_w x_k x_v x_a x_g w0 a0 v0 k_k k_a ln_x_scale ln_x_bias`` and
    ``r_k`` ``[H,N]``:

    * ``x_m = 1 - ddd^(p r1)`` with p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2 for r, w, k, v, a, g;
    * ``w0 = www + 0.5 + 2.5 zz``; ``a0 = -0.19 + 0.3 zz + 0.4 linear``; ``v0 = 0.73 - 0.4 linear``;
    * ``k_k = 0.71 - 0.1 linear``; ``k_a = 1.02``; ``r_k = -0.04``;
    * ``ln_x`` scale ``((l+1)/L)^0.7``, bias 0.
    """
    r1 = ratio_1_to_almost0(layer_id, n_layer)
    d = ddd(dim)
    lin = linear(dim)
    zz = zigzag(dim, head_size)
    out = {
        name: 1.0 - d ** (p * r1)
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2))
    }
    out["w0"] = www(dim, layer_id, n_layer) + 0.5 + 2.5 * zz
    out["a0"] = -0.19 + 0.3 * zz + 0.4 * lin
    out["v0"] = 0.73 - 0.4 * lin
    out["k_k"] = 0.71 - 0.1 * lin
    out["k_a"] = np.full(dim, 1.02)
    out["r_k"] = np.full((dim // head_size, head_size), -0.04)
    out["ln_x_scale"] = np.full(dim, ((layer_id + 1) / n_layer) ** 0.7)
    out["ln_x_bias"] = np.zeros(dim)
    return out


def channel_mix_init_x_k(dim: int, layer_id: int, n_layer: int) -> np.ndarray:
    """Channel-mix lerp at init ``1 - ddd^(r1^4)``, ``[C]``."""
    return 1.0 - ddd(dim) ** (ratio_1_to_almost0(layer_id, n_layer) ** 4)


def orthogonal(key: jax.Array, shape: tuple[int, int], scale: float, dtype=jnp.float32) -> jax.Array:
    """``torch.nn.init.orthogonal_`` analogue for a 2-D ``shape`` (semi-orthogonal, times ``scale``).

    ``scale == 0`` gives zeros. The gain conventions of BlinkDL (an extra ``sqrt(rows/cols)`` when a
    torch ``[out,in]`` weight has more rows than columns) are applied by the caller via
    :func:`torch_ortho_gain`.
    """
    if scale == 0:
        return jnp.zeros(shape, dtype)
    return jax.nn.initializers.orthogonal(scale=scale)(key, shape, dtype)


def torch_ortho_gain(rows: int, cols: int) -> float:
    """BlinkDL's extra orthogonal gain ``sqrt(rows/cols)`` for a torch-layout ``[rows, cols]`` matrix with
    ``rows > cols``, else 1."""
    return math.sqrt(rows / cols) if rows > cols else 1.0

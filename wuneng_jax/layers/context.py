"""What every decoder layer call receives besides its input: the :class:`LayerContext`, and the attention
over a key/value cache.

One layer call serves four uses (the decoder layers of ``qwen2``, ``rwkv7`` and ``wuneng``):

========== ================================ ===================================================================
use        ``ctx.kv``                        layer cache in / out
========== ================================ ===================================================================
training   ``None``                          ``None`` (recurrent layers: a state to continue, or ``None``)
prefill    ``KVContext(prefill=True)``       empty cache; keys/values written at slots ``[0, T)``, attention
                                             is the model's own causal kernel over the new tokens
extend     ``KVContext(prefill=False)``      keys/values written at ``[index, index + T)``, every query sees
                                             the valid slots up to its own
decode     as extend with ``T = 1``
========== ================================ ===================================================================
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wuneng_jax.layers.attention import dot_product_attention, reference_attention
from wuneng_jax.layers.rope import RopeTables, apply_rope
from wuneng_jax.sharding import ACT_HEADS, ACT_KV_HEADS, BATCH, LENGTH, constrain

_KV_NAMES = (BATCH, None, ACT_KV_HEADS, None)


class KVContext(NamedTuple):
    """Where a call's keys/values go: ``index`` int32 ``[]`` first slot written, ``valid`` bool ``[B,S]``
    the slots holding real tokens (this call's included), ``prefill`` (static) whether the call starts the
    sequences (attention over the new tokens only, with the model's own kernel)."""

    index: jax.Array
    valid: jax.Array
    prefill: bool


class KVLayer(NamedTuple):
    """One attention layer's cache: ``k`` (after RoPE) and ``v`` ``[B,S,G,D]`` in the compute dtype."""

    k: jax.Array
    v: jax.Array


class LayerContext(NamedTuple):
    """Per-call inputs shared by every layer.

    rope: RoPE tables of the call's positions (``None`` for RWKV-7); segment_ids int ``[B,T]``;
    reset: bool ``[B,T]`` where a recurrent state restarts (``None``: nowhere but an absent state);
    kv: :class:`KVContext` when attention layers read/write a cache; wkv_impl: a ``pallas_kernels.wkv7``
    impl replacing the model's for this call (decode runs short extends step by step).
    """

    rope: RopeTables | None
    segment_ids: jax.Array
    reset: jax.Array | None = None
    kv: KVContext | None = None
    wkv_impl: str | None = None


class RunOut(NamedTuple):
    """``model.run`` result (every family): ``h`` ``[B,T,d]`` after the last layer (before the final norm), the caches
    in the stack's layout (``model.layers.layer_caches`` lists them per layer) and, when collected, the
    stacked per-layer ``LayerOut`` (``h``, ``o``, ``state_branch``; cache ``None``)."""

    h: jax.Array
    caches: Any
    layers: Any


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, ctx: LayerContext, cache: KVLayer | None, *, impl: str
) -> tuple[jax.Array, KVLayer | None]:
    """Causal attention of pre-RoPE ``q`` ``[B,T,H,D]`` over ``k``/``v`` ``[B,T,G,D]`` (and the cache).

    Without ``ctx.kv``: segment-masked self-attention with ``impl`` (the cache is passed through). With it:
    writes RoPE(k), v at slots ``[index, index + T)`` of ``cache``; prefill attends over the new tokens
    with ``impl``, extend over every valid slot ``<=`` the query's own. Returns ``A`` ``[B,T,H,D]`` and
    the updated cache.
    """
    q_r, k_r = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
    names = (BATCH, LENGTH, ACT_HEADS, None)
    if ctx.kv is None or ctx.kv.prefill:
        seg = ctx.segment_ids
        a = dot_product_attention(q_r, k_r, v, segment_ids_q=seg, segment_ids_kv=seg, causal=True, impl=impl)
    if ctx.kv is None:
        return constrain(a, names), cache
    if cache is None:
        raise ValueError("attention with a KV context needs the layer's KVLayer cache")
    zero = jnp.int32(0)
    start = (zero, ctx.kv.index, zero, zero)
    ks = constrain(jax.lax.dynamic_update_slice(cache.k, k_r.astype(cache.k.dtype), start), _KV_NAMES)
    vs = constrain(jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start), _KV_NAMES)
    if not ctx.kv.prefill:
        t, s = q.shape[1], ks.shape[1]
        slot = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
        own = ctx.kv.index + jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
        mask = jnp.logical_and(ctx.kv.valid[:, None, None, :], slot <= own)  # [B,1,T,S]
        a = reference_attention(q_r, ks.astype(q.dtype), vs.astype(q.dtype), mask, 1 / math.sqrt(q.shape[-1]))
    return constrain(a, names), KVLayer(ks, vs)


def init_kv_layer(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> KVLayer:
    """An empty cache for one attention layer (zeros ``[B,S_max,G,D]``)."""
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return KVLayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


__all__ = ["KVContext", "KVLayer", "LayerContext", "RunOut", "attend", "init_kv_layer"]

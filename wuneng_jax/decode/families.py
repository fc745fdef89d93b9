"""Prefill and decode forward passes of each family, as pure functions of ``(model, arrays, DecodeState)``.

Two modes, one function per family (:func:`forward`):

``prefill``  a fresh sequence: ``tokens`` ``[B,T]`` left-padded with ``valid`` ``[B,T]``; attention is the
             model's own causal self-attention over the prompt (its ``attention_impl``: cuDNN / splash /
             XLA), the RWKV-7 recurrence its chunked kernel (``wkv_impl``); keys/values go to cache slots
             ``[0, T)`` and the recurrent state after the last token is kept.
``extend``   continue a sequence by ``T >= 1`` real tokens per row (``T = 1``: one decode step): keys and
             values are written at slots ``[index, index + T)`` and every query attends to all valid
             slots up to itself; the recurrence continues from the carried state (fewer than
             ``STEPWISE_MAX_TOKENS`` tokens, e.g. a decode step, run the recurrent update token by token,
             ``impl="reference"``; longer chunks the chunked kernel).

The layer code is the models' own (``Qwen2Attention.project_qkv/attend/out``, RWKV-7 ``Block``, WuNeng's
``state_read`` / ``query_with_state`` / ``fuse_heads``); only the attention over the cache is added here.
``tests/test_decode.py`` checks prefill + token-by-token decode against each model's full forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.decode.state import DecodeState, KVCache, init_kv_cache
from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.layers.attention import dot_product_attention, reference_attention
from wuneng_jax.layers.rope import RopeTables, apply_rope, rope_tables
from wuneng_jax.models.registry import family_of
from wuneng_jax.sharding import ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, BATCH, LENGTH, constrain

FAMILIES = ("qwen2", "rwkv7", "wuneng")
#: ``extend`` calls shorter than this run the RWKV-7 recurrence step by step (``wkv7`` impl "reference",
#: a ``lax.scan``); longer ones, and every prefill, use the model's chunked kernel.
STEPWISE_MAX_TOKENS = 16
_KV_NAMES = (None, BATCH, None, ACT_KV_HEADS, None)


def model_family(model: nnx.Module) -> str:
    """The registered family name of ``model`` (from its ``cfg``); ValueError if decode does not know it."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no `cfg`; decode needs a wuneng_jax model")
    name = family_of(cfg)
    if name not in FAMILIES:
        raise ValueError(f"decode supports the families {FAMILIES}, not {name!r}")
    return name


# ----------------------------------------------------------------------------------------------------
# State construction
# ----------------------------------------------------------------------------------------------------


def init_state(model: nnx.Module, batch_size: int, max_len: int) -> DecodeState:
    """A fresh :class:`DecodeState` for ``batch_size`` rows and ``max_len`` cache slots (prompt + new
    tokens, padding included). RWKV-7 ignores ``max_len`` (its state does not grow)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_state: batch_size={batch_size} and max_len={max_len} must be >= 1")
    family = model_family(model)
    cfg = model.cfg
    kv, recurrent = None, None
    if family in ("qwen2", "wuneng"):
        kv = init_kv_cache(
            cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
        )
    if family in ("rwkv7", "wuneng"):
        recurrent = model.init_state(batch_size)
    return DecodeState(kv, recurrent, jnp.zeros((), jnp.int32), jnp.zeros((batch_size,), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------


def _layout(valid: jax.Array | None, state: DecodeState, t: int) -> tuple[jax.Array, jax.Array, DecodeState]:
    """Segment ids ``[B,T]`` (1 real, 0 pad), positions ``[B,T]`` and the state's new index/positions."""
    b = state.positions.shape[0]
    if valid is not None:  # prefill: left padding, positions count real tokens only
        seg = valid.astype(jnp.int32)
        positions = state.positions[:, None] + jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        new_positions = state.positions + jnp.sum(seg, axis=1)
    else:
        seg = jnp.ones((b, t), jnp.int32)
        positions = state.positions[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        new_positions = state.positions + t
    return seg, positions, state._replace(index=state.index + t, positions=new_positions)


def _write_valid(kv: KVCache, seg: jax.Array, index: jax.Array) -> KVCache:
    valid = jax.lax.dynamic_update_slice(kv.valid, seg.astype(jnp.bool_), (jnp.int32(0), index))
    return kv._replace(valid=valid)


class CachedAttention:
    """Attention that writes each layer's keys/values into a :class:`KVCache` (trace-time helper).

    ``__call__(layer, q, k, v)`` takes pre-RoPE ``q`` ``[B,T,H,D]``, ``k``/``v`` ``[B,T,G,D]``; it stores
    RoPE(k) and v at slots ``[index, index+T)`` of ``layer`` and returns ``A`` ``[B,T,H,D]``. In prefill
    mode attention runs over the new tokens only (``self_attend``: the model's own kernel); in extend mode
    over every valid slot ``<=`` the query's own slot. ``kv`` holds the updated cache afterwards.
    """

    def __init__(
        self,
        kv: KVCache,
        *,
        rope: RopeTables,
        segment_ids: jax.Array,
        index: jax.Array,
        prefill: bool,
        self_attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    ):
        self.kv = _write_valid(kv, segment_ids, index)
        self.rope = rope
        self.segment_ids = segment_ids
        self.index = index
        self.prefill = prefill
        self.self_attend = self_attend

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        kv = self.kv
        q_r, k_r = apply_rope(q, self.rope), apply_rope(k, self.rope)
        zero = jnp.int32(0)
        start = (jnp.int32(layer), zero, self.index, zero, zero)
        ks = constrain(jax.lax.dynamic_update_slice(kv.k, k_r[None].astype(kv.k.dtype), start), _KV_NAMES)
        vs = constrain(jax.lax.dynamic_update_slice(kv.v, v[None].astype(kv.v.dtype), start), _KV_NAMES)
        self.kv = kv._replace(k=ks, v=vs)
        if self.prefill:
            return self.self_attend(q, k, v)
        t, s = q.shape[1], ks.shape[2]
        slot = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
        own = self.index + jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
        mask = jnp.logical_and(kv.valid[:, None, None, :], slot <= own)  # [B,1,T,S]
        a = reference_attention(
            q_r, ks[layer].astype(q.dtype), vs[layer].astype(q.dtype), mask, 1 / math.sqrt(q.shape[-1])
        )
        return constrain(a, (BATCH, LENGTH, ACT_HEADS, None))


def _self_attention(impl: str, rope: RopeTables, segment_ids: jax.Array):
    """The models' causal, segment-masked self-attention on pre-RoPE q/k (prefill)."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        a = dot_product_attention(
            apply_rope(q, rope),
            apply_rope(k, rope),
            v,
            segment_ids_q=segment_ids,
            segment_ids_kv=segment_ids,
            causal=True,
            impl=impl,
        )
        return constrain(a, (BATCH, LENGTH, ACT_HEADS, None))

    return attend


def _stepwise(valid: jax.Array | None, t: int) -> bool:
    return valid is None and t < STEPWISE_MAX_TOKENS


def _head(model: nnx.Module, h: jax.Array, last_only: bool) -> jax.Array:
    return model.head(h[:, -1:] if last_only else h)


# ----------------------------------------------------------------------------------------------------
# qwen2
# ----------------------------------------------------------------------------------------------------


def _qwen2_layer(layer: nnx.Module, i: int, h: jax.Array, attn: CachedAttention) -> jax.Array:
    sa = layer.self_attn
    q, k, v = sa.project_qkv(layer.input_layernorm(h))
    h = h + sa.out(attn(i, q, k, v))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return constrain(h, (BATCH, LENGTH, ACT_EMBED))


def _qwen2_forward(model, tokens, valid, state: DecodeState, *, last_only: bool):
    cfg = model.cfg
    seg, positions, new_state = _layout(valid, state, tokens.shape[1])
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
    attn = CachedAttention(
        state.kv,
        rope=rope,
        segment_ids=seg,
        index=state.index,
        prefill=valid is not None,
        self_attend=_self_attention(cfg.attention_impl, rope, seg),
    )
    h = model.embed(tokens)
    for i, layer in enumerate(model.layers):
        h = _qwen2_layer(layer, i, h, attn)
    return _head(model, h, last_only), new_state._replace(kv=attn.kv)


# ----------------------------------------------------------------------------------------------------
# rwkv7
# ----------------------------------------------------------------------------------------------------


def _rwkv7_forward(model, tokens, valid, state: DecodeState, *, last_only: bool):
    from wuneng_jax.models.rwkv7 import RWKV7State

    cfg = model.cfg
    t = tokens.shape[1]
    seg, _, new_state = _layout(valid, state, t)
    reset = ops.segment_reset(seg) if valid is not None else None
    impl = "reference" if _stepwise(valid, t) else cfg.wkv_impl
    dt = jnp.dtype(cfg.dtype)
    x = constrain(jnp.take(model.emb[...], tokens, axis=0).astype(dt), (BATCH, LENGTH, ACT_EMBED))
    v_first, layer_states = None, []
    for i, block in enumerate(model.blocks):
        with _wkv_impl(block.att, impl):
            x, v_first, st = block(x, v_first, state.recurrent.layer(i), reset)
        layer_states.append(st)
    x = model.ln_out(x[:, -1:] if last_only else x)
    out_dt = jnp.promote_types(dt, jnp.float32)
    logits = (x @ model.head[...].astype(dt)).astype(out_dt)
    recurrent = RWKV7State(*(jnp.stack(parts) for parts in zip(*layer_states, strict=True)))
    return logits, new_state._replace(recurrent=recurrent)


class _wkv_impl:
    """Temporarily run one RWKV-7 time mix with another ``wkv7`` implementation (trace time only)."""

    def __init__(self, att: nnx.Module, impl: str):
        if not hasattr(att, "impl"):
            raise ValueError(f"{type(att).__name__} has no `impl` attribute; update wuneng_jax.decode")
        self.att, self.impl = att, impl

    def __enter__(self):
        self.old = self.att.impl
        self.att.impl = self.impl

    def __exit__(self, *exc):
        self.att.impl = self.old


# ----------------------------------------------------------------------------------------------------
# wuneng
# ----------------------------------------------------------------------------------------------------


def _wuneng_forward(model, tokens, valid, state: DecodeState, *, last_only: bool):
    from wuneng_jax.models.wuneng_layer import WuNengDecoderLayer, hybrid_attention

    cfg = model.cfg
    t = tokens.shape[1]
    seg, positions, new_state = _layout(valid, state, t)
    wkv_cfg = dataclasses.replace(cfg, wkv_impl="reference") if _stepwise(valid, t) else cfg
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
    attn = CachedAttention(
        state.kv,
        rope=rope,
        segment_ids=seg,
        index=state.index,
        prefill=valid is not None,
        self_attend=_self_attention(cfg.attention_impl, rope, seg),
    )
    h = model.embed(tokens)
    layer_states = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, WuNengDecoderLayer):
            out = hybrid_attention(
                layer.self_attn.params(),
                layer.input_layernorm(h),
                cfg=wkv_cfg,
                segment_ids=seg,  # with a given state: resets at later document starts only
                state=state.recurrent[i],
                attend=lambda q, k, v, i=i: attn(i, q, k, v),
            )
            st = out.state
            h = h + out.o
            h = constrain(h + layer.mlp(layer.post_attention_layernorm(h)), (BATCH, LENGTH, ACT_EMBED))
        else:
            st = None
            h = _qwen2_layer(layer, i, h, attn)
        layer_states.append(st)
    return _head(model, h, last_only), new_state._replace(kv=attn.kv, recurrent=tuple(layer_states))


_FORWARD: dict[str, Callable[..., tuple[jax.Array, DecodeState]]] = {
    "qwen2": _qwen2_forward,
    "rwkv7": _rwkv7_forward,
    "wuneng": _wuneng_forward,
}


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def _check(model, tokens, state: DecodeState, t: int) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [B,T], got {tokens.dtype} {tokens.shape}")
    if tokens.shape[0] != state.batch_size:
        raise ValueError(f"tokens have {tokens.shape[0]} rows but the decode state {state.batch_size}")
    if t < 1:
        raise ValueError("tokens are empty (T = 0)")
    s_max = state.max_len
    if s_max is not None and t > s_max:
        raise ValueError(f"{t} tokens do not fit the KV cache of max_len={s_max}; build a larger state")
    if s_max is not None and not isinstance(state.index, jax.core.Tracer) and int(state.index) + t > s_max:
        raise ValueError(
            f"the KV cache is full: {int(state.index)} of max_len={s_max} slots used, {t} more requested; "
            "build the decode state with a larger max_len"
        )


def prefill(
    model: nnx.Module, tokens: jax.Array, valid: jax.Array, state: DecodeState, *, last_only: bool = False
) -> tuple[jax.Array, DecodeState]:
    """Start sequences: left-padded ``tokens`` ``[B,T]`` with ``valid`` bool ``[B,T]`` (False on the leading
    pads) into a fresh ``state`` (:func:`init_state`).

    Returns float32 logits ``[B,T,V]`` (``[B,1,V]`` of the last column when ``last_only``; with left
    padding that is every row's last prompt token) and the state after the prompt.
    """
    _check(model, tokens, state, tokens.shape[1])
    if not isinstance(state.index, jax.core.Tracer) and int(state.index) != 0:
        raise ValueError(
            f"prefill starts new sequences but the state already holds {int(state.index)} tokens; use a fresh "
            "state (init_state) or extend() to continue"
        )
    if valid.shape != tokens.shape:
        raise ValueError(f"valid has shape {valid.shape}, expected the tokens' {tokens.shape}")
    return _FORWARD[model_family(model)](model, tokens, valid, state, last_only=last_only)


def extend(
    model: nnx.Module, tokens: jax.Array, state: DecodeState, *, last_only: bool = False
) -> tuple[jax.Array, DecodeState]:
    """Continue every row by ``tokens`` ``[B,T]`` (all real tokens; ``T = 1`` is one decode step).

    Returns float32 logits ``[B,T,V]`` (``[B,1,V]`` when ``last_only``) and the advanced state.
    """
    _check(model, tokens, state, tokens.shape[1])
    return _FORWARD[model_family(model)](model, tokens, None, state, last_only=last_only)


def decode_step(model: nnx.Module, tokens: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """One token per row: ``tokens`` int ``[B]`` -> float32 logits ``[B,V]`` and the advanced state."""
    logits, state = extend(model, tokens[:, None], state)
    return logits[:, 0], state


__all__ = ["FAMILIES", "CachedAttention", "decode_step", "extend", "init_state", "model_family", "prefill"]

"""Prefill and decode steps as pure functions of ``(model, arrays, DecodeState)``, for every family.

Two modes, both one call of the model's own forward pass (``model.run``: the same layer calls as
training, with each layer's cache in and out; :mod:`wuneng_jax.layers.context`):

``prefill``  a fresh sequence: ``tokens`` ``[B,T]`` left-padded with ``valid`` ``[B,T]``; attention is the
             model's own causal self-attention over the prompt (its ``attention_impl``: cuDNN / splash /
             XLA), the RWKV-7 recurrence its chunked kernel (``wkv_impl``); keys/values go to cache slots
             ``[0, T)`` and the recurrent state after the last token is kept.
``extend``   continue a sequence by ``T >= 1`` real tokens per row (``T = 1``: one decode step): keys and
             values are written at slots ``[index, index + T)`` and every query attends to all valid
             slots up to itself; the recurrence continues from the carried state (fewer than
             ``STEPWISE_MAX_TOKENS`` tokens, e.g. a decode step, run the recurrent update token by token,
             ``impl="reference"``; longer chunks the chunked kernel).

``tests/test_decode.py`` checks prefill + token-by-token decode against each model's full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.decode.state import DecodeState
from wuneng_jax.layers.context import KVContext
from wuneng_jax.models.registry import family_of

FAMILIES = ("qwen2", "rwkv7", "wuneng")
#: ``extend`` calls shorter than this run the RWKV-7 recurrence step by step (``wkv7`` impl "reference",
#: a ``lax.scan``); longer ones, and every prefill, use the model's chunked kernel.
STEPWISE_MAX_TOKENS = 16


def model_family(model: nnx.Module) -> str:
    """The registered family name of ``model`` (from its ``cfg``); ValueError if decode does not know it."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no `cfg`; decode needs a wuneng_jax model")
    name = family_of(cfg)
    if name not in FAMILIES:
        raise ValueError(f"decode supports the families {FAMILIES}, not {name!r}")
    return name


def init_state(model: nnx.Module, batch_size: int, max_len: int) -> DecodeState:
    """A fresh :class:`DecodeState` for ``batch_size`` rows and ``max_len`` cache slots (prompt + new
    tokens, padding included). RWKV-7 ignores ``max_len`` (its state does not grow)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_state: batch_size={batch_size} and max_len={max_len} must be >= 1")
    has_kv = model_family(model) != "rwkv7"
    valid = jnp.zeros((batch_size, max_len), jnp.bool_) if has_kv else None
    caches = model.init_cache(batch_size, max_len)
    return DecodeState(caches, valid, jnp.zeros((), jnp.int32), jnp.zeros((batch_size,), jnp.int32))


def _forward(model, tokens, valid, state: DecodeState, *, last_only: bool):
    """One ``model.run`` over ``tokens`` with the state's caches -> (logits, new state)."""
    b, t = tokens.shape
    if valid is not None:  # prefill: left padding, positions count real tokens only
        seg = valid.astype(jnp.int32)
        positions = state.positions[:, None] + jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        new_positions = state.positions + jnp.sum(seg, axis=1)
    else:
        seg = jnp.ones((b, t), jnp.int32)
        positions = state.positions[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        new_positions = state.positions + t
    kv, new_valid = None, None
    if state.valid is not None:
        new_valid = jax.lax.dynamic_update_slice(
            state.valid, seg.astype(jnp.bool_), (jnp.int32(0), state.index)
        )
        kv = KVContext(state.index, new_valid, prefill=valid is not None)
    stepwise = valid is None and t < STEPWISE_MAX_TOKENS
    out = model.run(
        tokens, seg, positions, caches=state.caches, kv=kv, wkv_impl="reference" if stepwise else None
    )
    logits = model.lm_logits(out.h[:, -1:] if last_only else out.h)
    return logits, DecodeState(out.caches, new_valid, state.index + t, new_positions)


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
    return _forward(model, tokens, valid, state, last_only=last_only)


def extend(
    model: nnx.Module, tokens: jax.Array, state: DecodeState, *, last_only: bool = False
) -> tuple[jax.Array, DecodeState]:
    """Continue every row by ``tokens`` ``[B,T]`` (all real tokens; ``T = 1`` is one decode step).

    Returns float32 logits ``[B,T,V]`` (``[B,1,V]`` when ``last_only``) and the advanced state.
    """
    _check(model, tokens, state, tokens.shape[1])
    return _forward(model, tokens, None, state, last_only=last_only)


def decode_step(model: nnx.Module, tokens: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """One token per row: ``tokens`` int ``[B]`` -> float32 logits ``[B,V]`` and the advanced state."""
    logits, state = extend(model, tokens[:, None], state)
    return logits[:, 0], state


__all__ = ["FAMILIES", "decode_step", "extend", "init_state", "model_family", "prefill"]

"""The ``wuneng`` family: a Qwen2 decoder whose attention layers are WuNeng hybrid layers (``ARCHITECTURE.md`` §2).

:class:`WuNeng` is a :class:`Qwen2` (same embedding, final norm, head and parameter paths, so Qwen2 weights map
one to one) whose layer ``i`` is a :class:`WuNengDecoderLayer` when ``cfg.is_hybrid(i)``, else a plain
:class:`Qwen2DecoderLayer`, and whose forward carries each hybrid layer's recurrent state. The hybrid layer
is :mod:`wuneng_jax.models.wuneng_layer`, its settings :mod:`wuneng_jax.models.wuneng_config`, its new
parameters :mod:`wuneng_jax.models.wuneng_params`. Decode (with a KV cache) is :mod:`wuneng_jax.decode`;
here, passing a state continues the recurrence while attention only sees the tokens of the call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.remat import remat_layer
from wuneng_jax.layers.rope import RopeTables
from wuneng_jax.models.qwen2 import Qwen2
from wuneng_jax.models.registry import register_family, register_preset
from wuneng_jax.models.wuneng_config import WUNENG_0_5B, WUNENG_1_5B, WUNENG_7B, WUNENG_TINY, WuNengConfig
from wuneng_jax.models.wuneng_layer import LayerOut, WuNengDecoderLayer, WuNengLayerState


def run_layer(
    layer: nnx.Module,
    h: jax.Array,
    *,
    rope: RopeTables,
    segment_ids: jax.Array,
    state: WuNengLayerState | None = None,
) -> LayerOut:
    """Run a hybrid or plain layer with one interface (teacher-forced, layer-wise training uses this)."""
    if isinstance(layer, WuNengDecoderLayer):
        return layer(h, rope=rope, segment_ids=segment_ids, state=state)
    h, o = layer(h, rope=rope, segment_ids=segment_ids)
    return LayerOut(h, o, None, None)


def _run_layer_positional(
    layer: nnx.Module, h: jax.Array, rope: RopeTables, segment_ids: jax.Array, state: WuNengLayerState | None
) -> LayerOut:
    return run_layer(layer, h, rope=rope, segment_ids=segment_ids, state=state)


class WuNengOutputs(NamedTuple):
    """``forward_with_intermediates`` result.

    logits: float32 ``[B,T,V]``.
    hidden_states: ``L+1`` arrays ``[B,T,d]``: each layer's input, then the last layer's output.
    attn_outputs: ``L`` arrays ``[B,T,d]``: each layer's (fused) attention-block output.
    state_outputs: ``L`` entries: ``W_O[R_{g(h)}]_h`` ``[B,T,d]`` for hybrid layers, ``None`` for plain ones.
    state: ``L`` entries: the :class:`WuNengLayerState` after the last token (``None`` for plain layers).
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    attn_outputs: tuple[jax.Array, ...]
    state_outputs: tuple[jax.Array | None, ...]
    state: tuple[WuNengLayerState | None, ...]


class WuNeng(Qwen2):
    """WuNeng causal LM: ``model(tokens, segment_ids=None, positions=None) -> float32 logits [B,T,V]``.

    A :class:`Qwen2` (``embed_tokens``, ``layers``, ``norm``, ``lm_head``; ``prepare``, ``embed``, ``head``)
    whose layer ``i`` is a :class:`WuNengDecoderLayer` when ``cfg.is_hybrid(i)``.
    """

    def __init__(self, cfg: WuNengConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, WuNengConfig):
            raise ValueError(f"WuNeng needs a WuNengConfig, got {type(cfg).__name__}")
        super().__init__(cfg, rngs=rngs)

    def make_layer(self, cfg: WuNengConfig, layer_id: int, rngs: nnx.Rngs) -> nnx.Module:
        if cfg.is_hybrid(layer_id):
            return WuNengDecoderLayer(cfg, layer_id, rngs=rngs)
        return super().make_layer(cfg, layer_id, rngs)

    def init_state(self, batch_size: int) -> tuple[WuNengLayerState | None, ...]:
        """Zero recurrent state (``None`` for plain attention layers)."""
        cfg = self.cfg
        sdt = jnp.promote_types(jnp.dtype(cfg.dtype), jnp.float32)
        n = cfg.state_head_size
        zero = lambda: WuNengLayerState(
            jnp.zeros((batch_size, cfg.hidden_size), sdt), jnp.zeros((batch_size, cfg.state_heads, n, n), sdt)
        )
        return tuple(zero() if cfg.is_hybrid(i) else None for i in range(cfg.num_layers))

    def _check_state(self, state: Any, batch_size: int) -> None:
        cfg = self.cfg
        if len(state) != cfg.num_layers:
            raise ValueError(f"WuNeng: state has {len(state)} entries, expected num_layers={cfg.num_layers}")
        n = cfg.state_head_size
        for i, st in enumerate(state):
            if not cfg.is_hybrid(i):
                if st is not None:
                    raise ValueError(
                        f"WuNeng: layer {i} is a plain attention layer; its state entry must be None"
                    )
                continue
            want = ((batch_size, cfg.hidden_size), (batch_size, cfg.state_heads, n, n))
            got = (tuple(st.shift.shape), tuple(st.wkv.shape)) if st is not None else None
            if got != want:
                raise ValueError(
                    f"WuNeng: layer {i} state shapes {got} != (shift, wkv) {want}; build one with "
                    "model.init_state(batch_size)"
                )

    def forward_with_intermediates(  # type: ignore[override]
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        state: tuple[WuNengLayerState | None, ...] | None = None,
    ) -> WuNengOutputs:
        """Logits plus every layer's input, attention-block output, state branch and state."""
        segment_ids, _, rope = self.prepare(tokens, segment_ids, positions)
        if state is not None:
            self._check_state(state, tokens.shape[0])
        h = self.embed(tokens)
        hidden, attn, branch, states = [h], [], [], []
        call = remat_layer(_run_layer_positional, self.cfg.remat)
        for i, layer in enumerate(self.layers):
            out = call(layer, h, rope, segment_ids, None if state is None else state[i])
            h = out.h
            hidden.append(h)
            attn.append(out.o)
            branch.append(out.state_branch)
            states.append(out.state)
        return WuNengOutputs(self.head(h), tuple(hidden), tuple(attn), tuple(branch), tuple(states))

    def __call__(  # type: ignore[override]
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        state: tuple[WuNengLayerState | None, ...] | None = None,
        return_state: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple[WuNengLayerState | None, ...]]:
        """tokens int ``[B,T]`` (+ segment ids, positions ``[B,T]``) -> float32 logits ``[B,T,V]``
        (and the per-layer state after the last token when ``return_state``)."""
        out = self.forward_with_intermediates(tokens, segment_ids, positions, state=state)
        return (out.logits, out.state) if return_state else out.logits


register_family("wuneng", WuNengConfig, WuNeng)
register_preset("wuneng_tiny", WUNENG_TINY)
register_preset("wuneng-0.5b", WUNENG_0_5B)
register_preset("wuneng-1.5b", WUNENG_1_5B)
register_preset("wuneng-7b", WUNENG_7B)

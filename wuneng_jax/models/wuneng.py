"""The ``wuneng`` family: a Qwen2 decoder whose attention layers are WuNeng hybrid layers (``ARCHITECTURE.md`` §2).

:class:`WuNeng` is a :class:`Qwen2` (same embedding, final norm, head and parameter paths, so Qwen2 weights map
one to one) whose layer ``i`` is a :class:`WuNengDecoderLayer` when ``cfg.is_hybrid(i)``, else a plain
:class:`Qwen2DecoderLayer`, and whose forward carries each hybrid layer's recurrent state. The hybrid layer
is :mod:`wuneng_jax.models.wuneng_layer`, its settings :mod:`wuneng_jax.models.wuneng_config`, its new
parameters :mod:`wuneng_jax.models.wuneng_params`. Decode (with a KV cache) runs the same
layers through :meth:`Qwen2.run`; passing ``state`` here continues the recurrence while attention only sees
the tokens of the call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.context import init_kv_layer
from wuneng_jax.models.qwen2 import Qwen2
from wuneng_jax.models.registry import register_family, register_preset
from wuneng_jax.models.wuneng_config import WUNENG_0_5B, WUNENG_1_5B, WUNENG_7B, WUNENG_TINY, WuNengConfig
from wuneng_jax.models.wuneng_layer import HybridCache, WuNengDecoderLayer, WuNengLayerState


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

    A :class:`Qwen2` (``embed_tokens``, ``layers``, ``norm``, ``lm_head``; ``prepare``, ``embed``, ``head``,
    ``run``) whose layer ``i`` is a :class:`WuNengDecoderLayer` when ``cfg.is_hybrid(i)``; a hybrid layer's
    cache is a :class:`HybridCache` (KV cache and recurrent state).
    """

    def __init__(self, cfg: WuNengConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, WuNengConfig):
            raise ValueError(f"WuNeng needs a WuNengConfig, got {type(cfg).__name__}")
        super().__init__(cfg, rngs=rngs)

    @staticmethod
    def layer_kinds(cfg: WuNengConfig) -> list[str]:  # type: ignore[override]
        return ["hybrid" if cfg.is_hybrid(i) else "attention" for i in range(cfg.num_layers)]

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

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """Empty KV caches and zero recurrent states of every layer (stacked layout)."""
        cfg = self.cfg
        kv = init_kv_layer(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))
        per_layer = [kv if st is None else HybridCache(kv, st) for st in self.init_state(batch_size)]
        return self.layers.group_caches(per_layer)

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
        """Logits plus every layer's input, attention-block output, state branch and state.

        ``state`` continues each hybrid layer's recurrence (attention sees only this call's tokens)."""
        caches = None
        if state is not None:
            self._check_state(state, tokens.shape[0])
            caches = self.layers.group_caches([None if st is None else HybridCache(None, st) for st in state])
        out = self.run(tokens, segment_ids, positions, caches=caches, collect=True)
        per_layer = self.layers.layer_caches(out.layers)
        cache_list = self.layers.layer_caches(out.caches)
        states = tuple(c.state if isinstance(c, HybridCache) else None for c in cache_list)
        return WuNengOutputs(
            self.head(out.h),
            (self.embed(tokens), *(o.h for o in per_layer)),
            tuple(o.o for o in per_layer),
            tuple(o.state_branch for o in per_layer),
            states,
        )

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
        if state is None and not return_state:
            return super().__call__(tokens, segment_ids, positions)
        out = self.forward_with_intermediates(tokens, segment_ids, positions, state=state)
        return (out.logits, out.state) if return_state else out.logits


register_family("wuneng", WuNengConfig, WuNeng)
register_preset("wuneng_tiny", WUNENG_TINY)
register_preset("wuneng-0.5b", WUNENG_0_5B)
register_preset("wuneng-1.5b", WUNENG_1_5B)
register_preset("wuneng-7b", WUNENG_7B)

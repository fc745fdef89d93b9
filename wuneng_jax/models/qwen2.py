"""Qwen2 / Qwen2.5 decoder in Flax NNX, with Hugging Face ``transformers`` semantics.

Per layer (pre-norm)::

    u = RMSNorm(h);  q,k,v = u W_{Q,K,V} + b_{Q,K,V}       (project_qkv, pre-RoPE)
    A = softmax(RoPE(q) RoPE(k)ᵀ / √D + mask) v              (attend; GQA head h -> KV head h // (H/G))
    h = h + A W_O                                             (out; no bias)
    h = h + W_down (silu(n W_gate) ⊙ n W_up),   n = RMSNorm(h)
    logits = RMSNorm(h_L) W_head   (W_head = embeddingᵀ when tie_word_embeddings)

Numerics as Hugging Face: RMSNorm statistics, RoPE tables and the attention softmax in float32 (float64
when the model runs in float64 under ``jax.enable_x64``); logits float32. Parameters carry logical axis
names from ``wuneng_jax.sharding``.

One layer call for every use: ``Qwen2DecoderLayer(h, ctx, cache) -> LayerOut`` serves training, prefill,
extend and one-token decode (:mod:`wuneng_jax.layers.context`); the layers are a scanned
:class:`~wuneng_jax.layers.stack.LayerStack` and :meth:`Qwen2.run` is the one forward pass.

Hooks for the WuNeng model (a subclass of :class:`Qwen2`): ``Qwen2.make_layer`` / ``layer_kinds`` build the
layers, ``Qwen2DecoderLayer(attention=...)`` takes another attention block, ``Qwen2Attention.project_qkv`` /
``attend`` / ``out`` split the block, and ``Qwen2.forward_with_intermediates`` returns each layer's input and
attention-block output (teacher targets for the ``align`` stage).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wuneng_jax.layers.attention import IMPLS
from wuneng_jax.layers.context import KVContext, KVLayer, LayerContext, RunOut, attend, init_kv_layer
from wuneng_jax.layers.embed import Embed, logits_from_hidden
from wuneng_jax.layers.linear import Linear
from wuneng_jax.layers.mlp import SwiGLU
from wuneng_jax.layers.norms import RMSNorm
from wuneng_jax.layers.packing import resolve_segments
from wuneng_jax.layers.remat import check_remat
from wuneng_jax.layers.rope import RopeTables, rope_tables
from wuneng_jax.layers.stack import LayerStack
from wuneng_jax.models.registry import register_family, register_preset
from wuneng_jax.sharding import (
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV_HEADS,
    ACT_VOCAB,
    BATCH,
    EMBED,
    HEADS,
    KV_HEADS,
    LENGTH,
    VOCAB,
    constrain,
)

DTYPES = ("float32", "bfloat16", "float64")


def _check_dtype_available(dtype: str) -> None:
    if dtype == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("dtype='float64' needs 64-bit JAX: run inside `with jax.enable_x64(True):`")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Shapes and numerics of a Qwen2 decoder (field names follow this project, not HF's config.json).

    ``head_dim`` defaults to ``hidden_size // num_heads``. ``dtype`` is the compute dtype ("float32",
    "bfloat16"; "float64" for x64 reference runs), ``param_dtype`` the storage dtype of parameters.
    """

    family: ClassVar[str] = "qwen2"

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    attention_impl: str = "auto"
    remat: str = "none"  # per-layer rematerialisation policy (wuneng_jax.layers.remat)

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            if isinstance(self.hidden_size, int) and self.hidden_size % self.num_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Qwen2Config.{name}={v!r}: must be a positive integer")
        if self.head_dim is None:
            raise ValueError(
                f"Qwen2Config.num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}: "
                "choose num_heads dividing hidden_size, or set head_dim explicitly"
            )
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"Qwen2Config.head_dim={self.head_dim!r}: must be a positive integer")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"Qwen2Config.head_dim={self.head_dim}: RoPE (rotate-half) needs an even head_dim"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"Qwen2Config.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}: "
                "grouped-query attention needs num_heads to be a multiple of num_kv_heads"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"Qwen2Config.{name}={v!r}: must be a positive number")
        if (
            isinstance(self.initializer_range, bool)
            or not isinstance(self.initializer_range, int | float)
            or self.initializer_range < 0
        ):
            raise ValueError(f"Qwen2Config.initializer_range={self.initializer_range!r}: must be >= 0")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"Qwen2Config.tie_word_embeddings={self.tie_word_embeddings!r}: must be true/false"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"Qwen2Config.{name}={getattr(self, name)!r}: must be one of {list(DTYPES)}")
        check_remat(f"{type(self).__name__}.remat", self.remat)
        if self.attention_impl not in IMPLS:
            raise ValueError(
                f"Qwen2Config.attention_impl={self.attention_impl!r}: must be one of {list(IMPLS)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class Qwen2Outputs(NamedTuple):
    """``forward_with_intermediates`` result.

    logits: float32 ``[B,T,V]``.
    hidden_states: ``L+1`` arrays ``[B,T,d]``: the input of each layer (``[0]`` = embeddings), then the
      last layer's output (before the final norm).
    attn_outputs: ``L`` arrays ``[B,T,d]``: each layer's attention-block output ``A W_O`` (before the
      residual add).
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    attn_outputs: tuple[jax.Array, ...]


class LayerOut(NamedTuple):
    """A decoder layer's result: new ``h`` ``[B,T,d]``, attention-block output ``o`` ``[B,T,d]`` (before the
    residual add), the state branch ``W_O[R]`` ``[B,T,d]`` (hybrid layers; ``None`` otherwise) and the
    layer's cache after the call."""

    h: jax.Array
    o: jax.Array
    state_branch: jax.Array | None
    cache: Any


class Qwen2Attention(nnx.Module):
    """GQA self-attention with q/k/v bias and RoPE; ``__call__ = out(attend(*project_qkv(u)))``.

    q_proj ``[d, H·D]`` (EMBED, HEADS), k_proj/v_proj ``[d, G·D]`` (EMBED, KV_HEADS), biases ``[H·D]`` /
    ``[G·D]``, o_proj ``[H·D, d]`` (HEADS, EMBED), no o bias.
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.attention_impl = cfg.attention_impl
        kw = dict(
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nnx.initializers.normal(cfg.initializer_range),
            rngs=rngs,
        )
        d = cfg.hidden_size
        self.q_proj = Linear(d, cfg.q_size, names=(EMBED, HEADS), use_bias=True, **kw)
        self.k_proj = Linear(d, cfg.kv_size, names=(EMBED, KV_HEADS), use_bias=True, **kw)
        self.v_proj = Linear(d, cfg.kv_size, names=(EMBED, KV_HEADS), use_bias=True, **kw)
        self.o_proj = Linear(cfg.q_size, d, names=(HEADS, EMBED), use_bias=False, **kw)

    def project_qkv(self, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """u ``[B,T,d]`` (normed) -> q ``[B,T,H,D]``, k ``[B,T,G,D]``, v ``[B,T,G,D]`` (bias added, pre-RoPE)."""
        b, t, _ = u.shape
        q = self.q_proj(u).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(q, (BATCH, LENGTH, ACT_HEADS, None))
        k = constrain(k, (BATCH, LENGTH, ACT_KV_HEADS, None))
        v = constrain(v, (BATCH, LENGTH, ACT_KV_HEADS, None))
        return q, k, v

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, ctx: LayerContext, cache: KVLayer | None = None
    ) -> tuple[jax.Array, KVLayer | None]:
        """RoPE on pre-RoPE q/k, then causal segment-masked attention (over the cache when ``ctx.kv``)
        -> (A ``[B,T,H,D]``, cache)."""
        return attend(q, k, v, ctx, cache, impl=self.attention_impl)

    def out(self, a: jax.Array) -> jax.Array:
        """A ``[B,T,H,D]`` -> o ``[B,T,d]`` (``o_proj``)."""
        b, t = a.shape[:2]
        return constrain(self.o_proj(a.reshape(b, t, -1)), (BATCH, LENGTH, ACT_EMBED))

    def __call__(
        self, u: jax.Array, ctx: LayerContext, cache: KVLayer | None = None
    ) -> tuple[jax.Array, KVLayer | None]:
        """u ``[B,T,d]`` -> (attention-block output ``[B,T,d]``, cache)."""
        a, cache = self.attend(*self.project_qkv(u), ctx, cache)
        return self.out(a), cache


class Qwen2DecoderLayer(nnx.Module):
    """``h + attn(RMSNorm(h))`` then ``+ SwiGLU(RMSNorm(·))``. ``attention``: the attention block (the
    WuNeng layer passes its hybrid block), a :class:`Qwen2Attention` when None."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, attention: nnx.Module | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs) if attention is None else attention
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype
        )
        self.mlp = SwiGLU(
            cfg.hidden_size,
            cfg.intermediate_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_std=cfg.initializer_range,
            rngs=rngs,
        )

    def residual(self, h: jax.Array, o: jax.Array) -> jax.Array:
        """``h + o`` then the MLP block."""
        h = h + o
        h = h + self.mlp(self.post_attention_layernorm(h))
        return constrain(h, (BATCH, LENGTH, ACT_EMBED))

    def __call__(self, h: jax.Array, ctx: LayerContext, cache: KVLayer | None = None) -> LayerOut:
        """h ``[B,T,d]`` -> :class:`LayerOut` (training, prefill, extend and decode: see
        :mod:`wuneng_jax.layers.context`)."""
        o, cache = self.self_attn(self.input_layernorm(h), ctx, cache)
        return LayerOut(self.residual(h, o), o, None, cache)


class Qwen2(nnx.Module):
    """Qwen2 causal LM: ``model(tokens, segment_ids=None, positions=None) -> float32 logits [B,T,V]``.

    ``layers`` is a :class:`LayerStack` (parameters stacked per scanned group; ``layers.view(i)`` is layer
    ``i``). :meth:`run` is the one forward pass (training, prefill, extend, decode).
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        cfg.validate()
        _check_dtype_available(cfg.dtype)
        _check_dtype_available(cfg.param_dtype)
        self.cfg = cfg
        self.embed_tokens = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_std=cfg.initializer_range,
            rngs=rngs,
        )
        layers = [self.make_layer(cfg, i, rngs) for i in range(cfg.num_layers)]
        self.layers = LayerStack(layers, self.layer_kinds(cfg), remat=cfg.remat)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                names=(EMBED, VOCAB),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nnx.initializers.normal(cfg.initializer_range),
                rngs=rngs,
            )
        )

    @staticmethod
    def layer_kinds(cfg: Qwen2Config) -> list[str]:
        """The kind of each layer (layers of one kind are stacked together)."""
        return ["attention"] * cfg.num_layers

    def make_layer(self, cfg: Qwen2Config, layer_id: int, rngs: nnx.Rngs) -> nnx.Module:
        """Decoder layer ``layer_id`` (the WuNeng model overrides this)."""
        return Qwen2DecoderLayer(cfg, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """Empty KV caches of every layer for ``batch_size`` rows and ``max_len`` slots (stacked layout)."""
        cfg = self.cfg
        kv = init_kv_layer(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))
        return self.layers.group_caches([kv] * cfg.num_layers)

    # -- pieces ----------------------------------------------------------------------------------

    def prepare(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, RopeTables]:
        """Validated ``(segment_ids, positions, rope tables)`` for ``tokens`` ``[B,T]``."""
        segment_ids, positions = resolve_segments(tokens, segment_ids, positions)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.dtype)
        return segment_ids, positions, rope

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens ``[B,T]`` -> h ``[B,T,d]`` in the compute dtype."""
        return constrain(self.embed_tokens(tokens), (BATCH, LENGTH, ACT_EMBED))

    def head(self, h: jax.Array) -> jax.Array:
        """Final RMSNorm and LM head: h ``[B,T,d]`` -> float32 logits ``[B,T,V]``."""
        x = self.norm(h)
        if self.lm_head is None:
            logits = self.embed_tokens.attend(x)
        else:
            logits = logits_from_hidden(x, self.lm_head.kernel[...], transposed=False)
        return constrain(logits, (BATCH, LENGTH, ACT_VOCAB))

    def head_weight(self) -> tuple[jax.Array, bool]:
        """``(weight, transposed)`` of the LM head: the tied embedding ``[V,d]`` (``transposed``) or the
        ``lm_head`` kernel ``[d,V]`` (for the vocabulary-tiled loss, ``wuneng_jax.layers.vocab_tiling``)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...], True
        return self.lm_head.kernel[...], False

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """The head of :meth:`run`'s output (the name every family shares; here :meth:`head`)."""
        return self.head(h)

    # -- whole model ---------------------------------------------------------------------------

    def hidden(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """``__call__`` minus the LM head: the final-normed hidden state ``[B,T,d]`` (compute dtype) that
        :meth:`head` multiplies by :meth:`head_weight`."""
        return self.norm(self.run(tokens, segment_ids, positions).h)

    def run(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        caches: Any = None,
        kv: KVContext | None = None,
        wkv_impl: str | None = None,
        collect: bool = False,
    ) -> RunOut:
        """Embedding and every layer (one :class:`LayerStack` scan per group), no head.

        ``caches``: the layers' caches in the stack's layout (:meth:`init_cache`; WuNeng: recurrent states
        too), ``None`` for training; ``kv``: where keys/values go (decode); ``wkv_impl``: the RWKV-7 kernel
        for this call; ``collect``: also return every layer's :class:`LayerOut`.
        """
        segment_ids, _, rope = self.prepare(tokens, segment_ids, positions)
        ctx = LayerContext(rope, segment_ids, None, kv, wkv_impl)

        def step(layer, h, cache):
            out = layer(h, ctx, cache)
            return out.h, out.cache, out._replace(cache=None) if collect else None

        h, caches, aux = self.layers(step, self.embed(tokens), caches)
        return RunOut(h, caches, aux if collect else None)

    def forward_with_intermediates(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> Qwen2Outputs:
        """Logits plus every layer's input hidden state and attention-block output (see ``Qwen2Outputs``)."""
        out = self.run(tokens, segment_ids, positions, collect=True)
        per_layer = self.layers.layer_caches(out.layers)
        hidden = (self.embed(tokens), *(o.h for o in per_layer))
        return Qwen2Outputs(self.head(out.h), hidden, tuple(o.o for o in per_layer))

    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """tokens int ``[B,T]`` (+ segment ids, positions ``[B,T]``) -> float32 logits ``[B,T,V]``."""
        return self.head(self.run(tokens, segment_ids, positions).h)


register_family("qwen2", Qwen2Config, Qwen2)

QWEN2_TINY = Qwen2Config(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=160,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)
# Qwen2.5 shapes (Hugging Face Qwen/Qwen2.5-{0.5B,1.5B,7B} config.json).
QWEN25_0_5B = Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
QWEN25_1_5B = dataclasses.replace(
    QWEN25_0_5B,
    hidden_size=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    intermediate_size=8960,
    head_dim=None,
)
QWEN25_7B = dataclasses.replace(
    QWEN25_0_5B,
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    tie_word_embeddings=False,
    head_dim=None,
)

register_preset("qwen2_tiny", QWEN2_TINY)
register_preset("qwen2.5-0.5b", QWEN25_0_5B)
register_preset("qwen2.5-1.5b", QWEN25_1_5B)
register_preset("qwen2.5-7b", QWEN25_7B)

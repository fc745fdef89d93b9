"""The ``rwkv7`` family: BlinkDL's RWKV-7 "Goose" (x070) language model in Flax NNX.

Exact semantics of ``rwkv7-and-kernels.md`` §1 and §7.2 (BlinkDL's ``rwkv`` package, x070 path)::

    x = LN0(emb[tokens])                                  # ln0 on layer 0 only
    per layer:  x = x + TimeMix(LN1(x), v_first);  x = x + ChannelMix(LN2(x))
    logits = LN_out(x) @ head                              # LayerNorm eps 1e-5 everywhere

The time mix and channel mix are pure functions of a parameter mapping and arrays
(:func:`time_mix`, :func:`channel_mix`); the NNX modules below hold the parameters and call them. The
recurrence runs in :func:`pallas_kernels.wkv7`.

Parameter layout (JAX convention, ``y = x @ W`` with ``W`` ``[in, out]``; BlinkDL names with the
``[1,1,C]`` vectors stored as ``[C]``; :mod:`wuneng_jax.convert.blinkdl_rwkv7` maps to and from BlinkDL's
state dict). Layer 0 has no ``v0/v1/v2`` (it produces ``v_first`` instead of consuming it).

Recurrent state (:class:`RWKV7State`): per layer the last ln1 output ``att_x`` ``[B,C]``, the WKV state
``att_kv`` ``[B,H,N,N]`` (value rows x key columns) and the last ln2 output ``ffn_x`` ``[B,C]``, all
float32 and stacked over layers. ``model(tokens, state=s, return_state=True)`` resumes a sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import wkv7
from pallas_kernels.wkv7 import IMPLS as WKV_IMPLS
from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.layers.context import LayerContext, RunOut
from wuneng_jax.layers.norms import GroupNorm, LayerNorm, group_norm
from wuneng_jax.layers.params import sharded_param
from wuneng_jax.layers.remat import check_remat
from wuneng_jax.layers.stack import LayerStack
from wuneng_jax.models.registry import register_family, register_preset
from wuneng_jax.sharding import (
    ACT_EMBED,
    ACT_HEADS,
    ACT_MLP,
    ACT_VOCAB,
    BATCH,
    EMBED,
    LENGTH,
    LORA,
    MLP,
    NORM,
    STATE_HEADS,
    VOCAB,
    constrain,
)

DTYPES = ("float32", "bfloat16", "float16", "float64")

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
    """Shape and numerics of an RWKV-7 (x070) model.

    Fields left ``None`` are resolved in ``__post_init__``: ``dim_ffn = 4 * n_embd`` and the LoRA ranks
    by BlinkDL's suggestion ``max(32, round(f * sqrt(C) / 32) * 32)`` with f = 2.5 (decay, ``d_decay``),
    2.5 (ICLR, ``d_aaa``), 1.7 (value residual, ``d_mv``), 5 (gate, ``d_gate``). Released checkpoints do
    not always follow the formula, so the loader reads them from the checkpoint's shapes. (Note that
    ``dataclasses.replace`` keeps already-resolved values: pass the ranks explicitly when changing
    ``n_embd``.) ``dtype`` is the compute dtype ("float32", "bfloat16"; "float64" for x64 reference runs),
    ``param_dtype`` the storage dtype of parameters; the WKV state is float32 whatever ``dtype``.
    """

    family: ClassVar[str] = "rwkv7"

    vocab_size: int
    n_embd: int
    n_layer: int
    head_size: int = 64
    dim_ffn: int | None = None
    d_decay: int | None = None
    d_aaa: int | None = None
    d_mv: int | None = None
    d_gate: int | None = None
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    wkv_impl: str = "auto"  # pallas_kernels.wkv7 impl
    wkv_chunk_size: int | None = None
    remat: str = "none"  # per-layer rematerialisation policy (wuneng_jax.layers.remat)

    def __post_init__(self) -> None:
        if isinstance(self.n_embd, int) and self.n_embd > 0:
            ranks = ops.default_lora_ranks(self.n_embd)
            for name, value in ranks.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            if self.dim_ffn is None:
                object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        self.validate()

    @property
    def n_head(self) -> int:
        """``H = C / N``."""
        return self.n_embd // self.head_size

    def validate(self) -> RWKV7Config:
        """Check every field; raise ``ValueError`` naming the field and the fix. Returns ``self``."""
        for name in (
            "vocab_size",
            "n_embd",
            "n_layer",
            "head_size",
            "dim_ffn",
            "d_decay",
            "d_aaa",
            "d_mv",
            "d_gate",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"RWKV7Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.head_size != 0:
            raise ValueError(
                f"RWKV7Config: head_size={self.head_size} does not divide n_embd={self.n_embd}; choose n_embd as "
                f"a multiple of head_size (e.g. {self.n_embd - self.n_embd % self.head_size or self.head_size}) "
                "or another head_size (64 in released models)"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"RWKV7Config.{name}={getattr(self, name)!r} is not supported; use one of {DTYPES}"
                )
        check_remat("RWKV7Config.remat", self.remat)
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(
                f"RWKV7Config.wkv_impl={self.wkv_impl!r} is unknown; use one of {list(WKV_IMPLS)}"
            )
        if self.wkv_chunk_size is not None and (
            isinstance(self.wkv_chunk_size, bool)
            or not isinstance(self.wkv_chunk_size, int | np.integer)
            or self.wkv_chunk_size < 1
        ):
            raise ValueError(
                f"RWKV7Config.wkv_chunk_size must be a positive integer or None, got {self.wkv_chunk_size!r}"
            )
        return self


#: Named shapes: a tiny test model and the released RWKV-7 World shapes (vocab 65536). Registered with
#: ``wuneng_jax.models.registry`` at the bottom of this module.
PRESETS: dict[str, dict[str, Any]] = {
    "rwkv7_tiny": dict(
        vocab_size=256, n_embd=64, n_layer=2, head_size=16, d_decay=16, d_aaa=16, d_mv=8, d_gate=16
    ),
    "rwkv7-0.1b": dict(vocab_size=65536, n_embd=768, n_layer=12),  # ranks 64/64/32/128 (formula)
    "rwkv7-0.4b": dict(vocab_size=65536, n_embd=1024, n_layer=24),  # ranks by formula: 64/64/64/160
    "rwkv7-1.5b": dict(vocab_size=65536, n_embd=2048, n_layer=24, d_decay=96, d_aaa=96, d_mv=64, d_gate=256),
}


def rwkv7_preset(name: str, **overrides: Any) -> RWKV7Config:
    """``RWKV7Config`` of a named preset (keys of :data:`PRESETS`), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown rwkv7 preset {name!r}; choose one of {sorted(PRESETS)}")
    return RWKV7Config(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# Functional cores
# ----------------------------------------------------------------------------------------------------


class TimeMixOut(NamedTuple):
    out: jax.Array  # [B,T,C] residual update
    v_first: jax.Array  # [B,T,C] layer 0's value (passed through by later layers)
    shift: jax.Array  # [B,C] last input token (next call's token-shift state)
    wkv_state: jax.Array  # [B,H,N,N] float32


def time_mix(
    p: Mapping[str, jax.Array],
    x: jax.Array,
    v_first: jax.Array | None,
    *,
    head_size: int,
    shift: jax.Array | None = None,
    wkv_state: jax.Array | None = None,
    reset: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> TimeMixOut:
    """RWKV-7 time mix (x070) on the ln1 output ``x`` ``[B,T,C]``, in ``x``'s dtype.

    Args:
      p: parameters ``x_r x_w x_k x_v x_a x_g w0 a0 k_k k_a ln_x_scale ln_x_bias`` ``[C]``,
        ``(v0 [C])`` , ``w1 a1 (v1) g1`` ``[C,D]``, ``w2 a2 (v2) g2`` ``[D,C]``, ``r_k`` ``[H,N]``,
        ``receptance key value output`` ``[C,C]`` (``[in,out]``). ``v0/v1/v2`` only when ``v_first`` is
        given.
      v_first: ``[B,T,C]`` value of layer 0, or ``None`` for layer 0 itself (which then returns its v).
      shift: ``[B,C]`` previous token (state), zeros when None.
      wkv_state: ``[B,H,N,N]`` float32 initial WKV state, zeros when None.
      reset: bool ``[B,T]`` document starts (state and token shift restart there).
    Returns:
      :class:`TimeMixOut`.
    """
    dt = x.dtype
    c = lambda name: p[name].astype(dt)
    heads = x.shape[-1] // head_size

    xx = ops.token_shift(x, shift, reset) - x
    xr, xw, xk, xv, xa, xg = (ops.lerp_mix(x, xx, c(f"x_{m}")) for m in "rwkvag")

    r = xr @ c("receptance")
    log_w = ops.decay_log(xw, p["w0"], c("w1"), c("w2"))  # float32
    k = xk @ c("key")
    v = xv @ c("value")
    iclr = jax.nn.sigmoid(c("a0") + ops.lora(xa, c("a1"), c("a2")))
    g = ops.lora(xg, c("g1"), c("g2"), jax.nn.sigmoid)

    kk = ops.removal_key(k, c("k_k"), head_size)  # from the ORIGINAL k
    k = ops.modify_key(k, iclr, c("k_a"))
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * jax.nn.sigmoid(c("v0") + ops.lora(xv, c("v1"), c("v2")))

    heads_names = (BATCH, LENGTH, ACT_HEADS, None)
    rh, kh, vh, kkh, iclrh = (
        constrain(ops.split_heads(t, head_size), heads_names) for t in (r, k, v, kk, iclr)
    )
    log_wh = constrain(ops.split_heads(log_w, head_size), heads_names)
    o, new_state = wkv7(
        rh,
        log_wh,
        kh,
        vh,
        -kkh,
        kkh * iclrh,
        wkv_state,
        reset=reset,
        impl=impl,
        chunk_size=chunk_size,
        partition=ops.wkv7_partition(ACT_HEADS),
    )
    y = group_norm(ops.merge_heads(o), p["ln_x_scale"], p["ln_x_bias"], heads, ops.LN_X_EPS)
    y = y + ops.merge_heads(ops.bonus(rh, kh, vh, c("r_k")))
    out = (y * g) @ c("output")
    return TimeMixOut(out, v_first, x[:, -1], new_state)


def channel_mix(
    p: Mapping[str, jax.Array],
    x: jax.Array,
    *,
    shift: jax.Array | None = None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 channel mix on the ln2 output ``x`` ``[B,T,C]``: ``relu(lerp @ key)² @ value``.

    Args:
      p: ``x_k`` ``[C]``, ``key`` ``[C,F]``, ``value`` ``[F,C]`` (``[in,out]``).
      shift: ``[B,C]`` previous token (state); reset: bool ``[B,T]`` document starts.
    Returns:
      (``[B,T,C]`` residual update, ``[B,C]`` last input token).
    """
    dt = x.dtype
    xx = ops.token_shift(x, shift, reset) - x
    h = ops.lerp_mix(x, xx, p["x_k"].astype(dt)) @ p["key"].astype(dt)
    h = constrain(jnp.square(jax.nn.relu(h)), (BATCH, LENGTH, ACT_MLP))
    return h @ p["value"].astype(dt), x[:, -1]


# ----------------------------------------------------------------------------------------------------
# NNX modules
# ----------------------------------------------------------------------------------------------------


def _vec(value: np.ndarray, dtype: jnp.dtype, names: tuple[str | None, ...] = (NORM,)) -> nnx.Param:
    return sharded_param(jnp.asarray(value, dtype), names)


def _ortho(
    key: jax.Array, torch_shape: tuple[int, int], scale: float, dtype: jnp.dtype, transpose: bool
) -> jax.Array:
    """BlinkDL orthogonal init of a torch-layout ``[rows, cols]`` matrix (gain ``sqrt(rows/cols)`` when
    rows > cols, times ``scale``), returned transposed when ``transpose`` (torch Linear -> ``[in,out]``)."""
    gain = ops.torch_ortho_gain(*torch_shape) * scale
    w = ops.orthogonal(key, torch_shape, gain, dtype)
    return w.T if transpose else w


class TimeMix(nnx.Module):
    """Parameters of one x070 time mix; calls :func:`time_mix`. ``key``: PRNG key of its random inits."""

    def __init__(self, cfg: RWKV7Config, layer_id: int, *, key: jax.Array):
        dim, n = cfg.n_embd, cfg.head_size
        pdt = jnp.dtype(cfg.param_dtype)
        self.first = layer_id == 0  # layer 0 makes v_first (no v0/v1/v2)
        self.head_size = n
        self.impl = cfg.wkv_impl
        self.chunk_size = cfg.wkv_chunk_size
        init = ops.time_mix_init_vectors(dim, n, layer_id, cfg.n_layer)
        keys = iter(jax.random.split(key, 7))
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, _vec(init[name], pdt))
        # LoRAs: first matrix zeros, second orthogonal * 0.1 (BlinkDL ortho_init on [D, C]).
        loras = [("w", cfg.d_decay), ("a", cfg.d_aaa), ("g", cfg.d_gate)]
        if layer_id > 0:
            loras.append(("v", cfg.d_mv))
        for prefix, rank in loras:
            setattr(self, f"{prefix}1", sharded_param(jnp.zeros((dim, rank), pdt), (EMBED, LORA)))
            setattr(
                self,
                f"{prefix}2",
                sharded_param(_ortho(next(keys), (rank, dim), 0.1, pdt, False), (LORA, STATE_HEADS)),
            )
        self.w0 = _vec(init["w0"], pdt)
        self.a0 = _vec(init["a0"], pdt)
        if layer_id > 0:
            self.v0 = _vec(init["v0"], pdt)
        self.k_k = _vec(init["k_k"], pdt)
        self.k_a = _vec(init["k_a"], pdt)
        self.r_k = _vec(init["r_k"], pdt, (NORM, None))
        # Projections [in, out]; BlinkDL generate_init_weight: orthogonal gains 1 / 0.1 / 1 / 0.
        self.receptance = sharded_param(_ortho(next(keys), (dim, dim), 1.0, pdt, True), (EMBED, STATE_HEADS))
        self.key = sharded_param(_ortho(next(keys), (dim, dim), 0.1, pdt, True), (EMBED, STATE_HEADS))
        self.value = sharded_param(_ortho(next(keys), (dim, dim), 1.0, pdt, True), (EMBED, STATE_HEADS))
        self.output = sharded_param(jnp.zeros((dim, dim), pdt), (STATE_HEADS, EMBED))
        self.ln_x = GroupNorm(dim, cfg.n_head, ops.LN_X_EPS, param_dtype=pdt)
        self.ln_x.scale = _vec(init["ln_x_scale"], pdt)

    def params(self) -> dict[str, jax.Array]:
        """The parameter mapping of :func:`time_mix`."""
        names = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "g1", "g2"]
        names += ["k_k", "k_a", "r_k", "receptance", "key", "value", "output"]
        if not self.first:
            names += ["v0", "v1", "v2"]
        p = {name: getattr(self, name)[...] for name in names}
        p["ln_x_scale"] = self.ln_x.scale[...]
        p["ln_x_bias"] = self.ln_x.bias[...]
        return p

    def __call__(self, x, v_first, *, shift=None, wkv_state=None, reset=None, impl=None) -> TimeMixOut:
        """:func:`time_mix` with this layer's parameters (``impl`` replaces the model's wkv7 impl)."""
        return time_mix(
            self.params(),
            x,
            None if self.first else v_first,
            head_size=self.head_size,
            shift=shift,
            wkv_state=wkv_state,
            reset=reset,
            impl=self.impl if impl is None else impl,
            chunk_size=self.chunk_size,
        )


class ChannelMix(nnx.Module):
    """Parameters of one x070 channel mix (relu² FFN with token shift); calls :func:`channel_mix`."""

    def __init__(self, cfg: RWKV7Config, layer_id: int, *, key: jax.Array):
        dim, ffn = cfg.n_embd, cfg.dim_ffn
        pdt = jnp.dtype(cfg.param_dtype)
        self.x_k = _vec(ops.channel_mix_init_x_k(dim, layer_id, cfg.n_layer), pdt)
        self.key = sharded_param(_ortho(key, (ffn, dim), 1.0, pdt, True), (EMBED, MLP))
        self.value = sharded_param(jnp.zeros((ffn, dim), pdt), (MLP, EMBED))

    def params(self) -> dict[str, jax.Array]:
        return {"x_k": self.x_k[...], "key": self.key[...], "value": self.value[...]}

    def __call__(self, x, *, shift=None, reset=None) -> tuple[jax.Array, jax.Array]:
        return channel_mix(self.params(), x, shift=shift, reset=reset)


class LayerState(NamedTuple):
    """Recurrent state of one layer: ``att_x`` ``[B,C]``, ``att_kv`` ``[B,H,N,N]``, ``ffn_x`` ``[B,C]``."""

    att_x: jax.Array
    att_kv: jax.Array
    ffn_x: jax.Array


class Block(nnx.Module):
    """One RWKV-7 layer: (ln0 on layer 0) ln1 + time mix, ln2 + channel mix."""

    def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.first = layer_id == 0
        # One rngs call per layer: each call updates an RNG counter, which is slow to trace (eval_shape).
        att_key, ffn_key = jax.random.split(rngs.params())
        if layer_id == 0:
            self.ln0 = LayerNorm(cfg.n_embd, ops.LN_EPS, param_dtype=pdt)
        self.ln1 = LayerNorm(cfg.n_embd, ops.LN_EPS, param_dtype=pdt)
        self.att = TimeMix(cfg, layer_id, key=att_key)
        self.ln2 = LayerNorm(cfg.n_embd, ops.LN_EPS, param_dtype=pdt)
        self.ffn = ChannelMix(cfg, layer_id, key=ffn_key)

    def __call__(
        self, x: jax.Array, v_first: jax.Array | None, ctx: LayerContext, state: LayerState | None = None
    ) -> tuple[jax.Array, jax.Array, LayerState]:
        """x ``[B,T,C]`` -> (x, v_first, new state); ``state`` None means zeros; ``ctx.reset`` the document
        starts, ``ctx.wkv_impl`` the kernel for this call (training, prefill, extend and decode alike)."""
        if self.first:
            x = self.ln0(x)
        xa = self.ln1(x)
        reset = ctx.reset
        att = self.att(
            xa,
            v_first,
            shift=None if state is None else state.att_x,
            wkv_state=None if state is None else state.att_kv,
            reset=reset,
            impl=ctx.wkv_impl,
        )
        x = constrain(x + att.out, (BATCH, LENGTH, ACT_EMBED))
        xf = self.ln2(x)
        dx, ffn_x = self.ffn(xf, shift=None if state is None else state.ffn_x, reset=reset)
        x = constrain(x + dx, (BATCH, LENGTH, ACT_EMBED))
        sdt = att.wkv_state.dtype  # float32 (float64 for a float64 model)
        new_state = LayerState(att.shift.astype(sdt), att.wkv_state, ffn_x.astype(sdt))
        return x, att.v_first, new_state


class RWKV7State(NamedTuple):
    """Recurrent state of the whole model, stacked over layers (float32).

    ``att_x`` ``[L,B,C]`` (last ln1 output), ``att_kv`` ``[L,B,H,N,N]`` (WKV state, value rows x key
    columns, BlinkDL layout), ``ffn_x`` ``[L,B,C]`` (last ln2 output). The ``rwkv`` package's state list
    holds layer ``i``'s three entries at indices ``3i``, ``3i+1``, ``3i+2``.
    """

    att_x: jax.Array
    att_kv: jax.Array
    ffn_x: jax.Array

    def layer(self, i: int) -> LayerState:
        return LayerState(self.att_x[i], self.att_kv[i], self.ffn_x[i])


class RWKV7(nnx.Module):
    """RWKV-7 (x070) language model.

    ``model(tokens, segment_ids=None, positions=None)`` -> float32 logits ``[B,T,V]``;
    ``model(tokens, ..., state=s, return_state=True)`` -> ``(logits, RWKV7State)``.
    """

    def __init__(self, cfg: RWKV7Config, *, rngs: nnx.Rngs):
        cfg.validate()
        if (
            "float64" in (cfg.dtype, cfg.param_dtype)
            and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64
        ):
            raise ValueError(
                "RWKV7Config dtype/param_dtype 'float64' needs 64-bit JAX: run inside `with jax.enable_x64(True):`"
            )
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        vocab, dim = cfg.vocab_size, cfg.n_embd
        self.emb = sharded_param(
            jax.random.uniform(rngs.params(), (vocab, dim), pdt, -1e-4, 1e-4), (VOCAB, EMBED)
        )
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)]
        self.blocks = LayerStack(blocks, ["first"] + ["block"] * (cfg.n_layer - 1), remat=cfg.remat)
        self.ln_out = LayerNorm(dim, ops.LN_EPS, param_dtype=pdt)
        head_gain = 0.5 * float(np.sqrt(vocab / dim)) if vocab > dim else 0.5
        # BlinkDL: orthogonal_(head.weight [V,C], gain) with no extra sqrt(rows/cols) factor.
        head = ops.orthogonal(rngs.params(), (vocab, dim), head_gain, pdt).T
        self.head = sharded_param(head, (EMBED, VOCAB))

    def init_state(self, batch_size: int) -> RWKV7State:
        """Zero recurrent state for ``batch_size`` rows."""
        cfg = self.cfg
        n_l, dim, h, n = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        sdt = jnp.promote_types(jnp.dtype(cfg.dtype), jnp.float32)
        return RWKV7State(
            jnp.zeros((n_l, batch_size, dim), sdt),
            jnp.zeros((n_l, batch_size, h, n, n), sdt),
            jnp.zeros((n_l, batch_size, dim), sdt),
        )

    def _check_inputs(self, tokens, segment_ids, positions, state) -> None:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"RWKV7: tokens must be int [B,T], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"RWKV7: tokens must be an integer array, got {tokens.dtype}")
        if tokens.shape[1] < 1:
            raise ValueError("RWKV7: the sequence is empty (T = 0)")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
                raise ValueError(
                    f"RWKV7: {name} has shape {tuple(arr.shape)}, expected tokens' shape {tokens.shape}"
                )
        if not isinstance(tokens, jax.core.Tracer):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(
                    f"RWKV7: token ids must lie in [0, vocab_size={cfg.vocab_size}), got range [{lo}, {hi}]"
                )
        if state is not None:
            bsz = tokens.shape[0]
            want = (
                (cfg.n_layer, bsz, cfg.n_embd),
                (cfg.n_layer, bsz, cfg.n_head, cfg.head_size, cfg.head_size),
                (cfg.n_layer, bsz, cfg.n_embd),
            )
            got = tuple(tuple(s.shape) for s in state)
            if got != want:
                raise ValueError(
                    f"RWKV7: state shapes {got} do not match (att_x, att_kv, ffn_x) = {want}; "
                    "build one with model.init_state(batch_size)"
                )

    def init_cache(self, batch_size: int, max_len: int | None = None) -> Any:
        """Zero recurrent state in the stack's layout (``max_len`` is ignored: the state does not grow)."""
        return self.blocks.group_caches(self._layer_states(self.init_state(batch_size)))

    def _layer_states(self, state: RWKV7State) -> list[LayerState]:
        return [state.layer(i) for i in range(self.cfg.n_layer)]

    def run(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        caches: Any = None,
        kv: Any = None,
        wkv_impl: str | None = None,
        reset: jax.Array | None = None,
    ) -> RunOut:
        """Embedding and every block -> :class:`RunOut` (``h``: x ``[B,T,C]`` before ``ln_out``; caches in
        the stack's layout).

        ``caches``: recurrent states (:meth:`init_cache`), ``None`` for zeros; ``reset``: document starts
        (default: where ``segment_ids`` changes); ``kv`` is accepted for the common decode interface
        (RWKV-7 keeps no KV cache); ``wkv_impl`` the kernel for this call.
        """
        del positions, kv  # no positional encoding, no KV cache
        tokens = jnp.asarray(tokens)
        if reset is None and segment_ids is not None:
            reset = ops.segment_reset(jnp.asarray(segment_ids))
        ctx = LayerContext(None, segment_ids, reset, None, wkv_impl)
        x = jnp.take(self.emb[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        x = constrain(x, (BATCH, LENGTH, ACT_EMBED))

        def step(block, carry, state):
            x, v_first, state = block(*carry, ctx, state)
            return (x, v_first), state, None

        (x, _), caches, _ = self.blocks(step, (x, None), caches)
        return RunOut(x, caches, None)

    def lm_logits(self, x: jax.Array) -> jax.Array:
        """``ln_out`` and the head: x ``[B,T,C]`` -> float32 logits ``[B,T,V]`` (float64 in x64 runs)."""
        dt = jnp.dtype(self.cfg.dtype)
        out_dt = jnp.promote_types(dt, jnp.float32)
        logits = (self.ln_out(x) @ self.head[...].astype(dt)).astype(out_dt)
        return constrain(logits, (BATCH, LENGTH, ACT_VOCAB))

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        state: RWKV7State | None = None,
        return_state: bool = False,
    ) -> jax.Array | tuple[jax.Array, RWKV7State]:
        """Logits of every position.

        Args:
          tokens: int ``[B,T]``.
          segment_ids: int ``[B,T]`` document ids of a packed row (0 = padding); the WKV state and the
            token shift restart where it changes. Position 0 continues ``state`` (zeros when None).
          positions: ignored (RWKV has no positional encoding); accepted for the common interface.
          state: :class:`RWKV7State` to resume from (zeros when None).
          return_state: also return the state after the last token.
        Returns:
          float32 logits ``[B,T,V]``, and the new :class:`RWKV7State` when ``return_state``.
        """
        tokens = jnp.asarray(tokens)
        self._check_inputs(tokens, segment_ids, positions, state)
        caches = None if state is None else self.blocks.group_caches(self._layer_states(state))
        x, caches, _ = self.run(tokens, segment_ids, caches=caches)
        logits = self.lm_logits(x)
        if not return_state:
            return logits
        layer_states = self.blocks.layer_caches(caches)
        return logits, RWKV7State(*(jnp.stack(parts) for parts in zip(*layer_states, strict=True)))

    def hidden(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """``__call__`` minus the head: ``ln_out`` of the last block's output ``[B,T,C]`` in the compute
        dtype, which the LM head multiplies by :meth:`head_weight` (the vocabulary-tiled loss,
        ``wuneng_jax.layers.vocab_tiling``)."""
        tokens = jnp.asarray(tokens)
        self._check_inputs(tokens, segment_ids, positions, None)
        return self.ln_out(self.run(tokens, segment_ids).h).astype(jnp.dtype(self.cfg.dtype))

    def head_weight(self) -> tuple[jax.Array, bool]:
        """``(head [C,V], transposed=False)``: the LM head as ``hidden(...) @ head``."""
        return self.head[...], False


register_family("rwkv7", RWKV7Config, RWKV7)
for _name in PRESETS:
    register_preset(_name, rwkv7_preset(_name))

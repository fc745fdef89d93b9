"""The ``wuneng`` family: a Qwen2 decoder whose attention is augmented with RWKV-7 state-driven heads.

This file is the whole hybrid layer of ``ARCHITECTURE.md`` §2 (read that page for the why). Per hybrid
decoder layer, input ``h`` ``[B,T,d]``; ``H`` query heads, ``G`` KV heads, head dim ``D``; ``S`` state heads
of size ``N`` with ``S·N = G·D`` (default ``S = G``, ``N = D``; state head ``s`` covers channels
``[s·N, (s+1)·N)`` of the KV-group-major layout, so KV group ``g`` owns state heads ``g·D/N .. (g+1)·D/N - 1``)::

    u = RMSNorm(h);  u_m = u + (u_prev - u) ⊙ μ_m     (token shift; u_prev = previous token's u, 0 at doc starts)
    q, k, v = u W_{Q,K,V} + b_{Q,K,V}                  [B,T,H,D], [B,T,G,D], [B,T,G,D]   (pre-RoPE)
    r̂ = u_r W_R̂                                       [B,T,S·N]   state-derived key ("receptance")
    κ̂ = L2norm_per_state_head(u_κ W_κ)                [B,T,S·N]   removal key
    log w = -e^{-1/2} sigmoid(w0 + tanh(u_w W1) W2)    [B,T,S·N]   (w in (0.545, 1))
    α = sigmoid(a0 + (u_a A1) A2);   k̃ = k ⊙ (1 + (α - 1) ⊙ k_a);   g = sigmoid(u_g G1) G2
    v^s = v (state_value=attention_value)  or  [A_1..A_H] W_Vs (state_value=attention_output)
    S_t = S_{t-1}(diag(w_t) - κ̂_tᵀ(α_t ⊙ κ̂_t)) + v^s_t k̃_tᵀ        (pallas_kernels.wkv7, a=-κ̂, b=κ̂⊙α)
    R_t = (GroupNorm(S_t r̂_t) + (Σ r̂ ⊙ k̃ ⊙ r_k) v^s_t) ⊙ g_t            [B,T,S,N] -> R_g [B,T,G,D]
    state_query:  q_h ← q_h + λ_h ⊙ (R_{g(h)} W^state_h)                  (before RoPE; λ zero-init)
    A_h = softmax(RoPE(q_h) RoPE(k_{g(h)})ᵀ/√D + mask) v_{g(h)}
    o = F(A, R)  (fusion: concat | add | gate | full, table below);   h ← h + o;  h ← h + SwiGLU(RMSNorm(h))

Fusion (``Norm`` = per-state-head RMSNorm without scale, eps = ``rms_norm_eps``; ``N_h = Norm(R)_{g(h)}``)::

    concat: o = W_O[A] + W_Os[R]                                   W_Os zero
    add:    o = W_O[A_h + β_h ⊙ N_h]                               β [H,D] zero
    gate:   M_h = A_h + γ_h ⊙ σ(W^g_h [A_h; N_h] + c_h) ⊙ (N_h - A_h);  o = W_O[M]       γ [H,D] zero
    full:   o = W_O[A] + W_Os[β ⊙ Norm(R)] + W_Om[M]               W_Os, W_Om zero (β [S,N] ones, γ ones)

so every hybrid layer starts exactly equal to its plain attention layer. In ``full`` mode ``W_Om`` is
low-rank by default (``middle_out_rank``: ``W_Om = P Q``, ``P`` ``[H·D, r]`` orthogonal, ``Q`` ``[r, d]`` zero;
``None`` gives a full ``[H·D, d]`` matrix) to keep the additions under 5 % of the base model
(``docs/params.md``).

Layout: :func:`hybrid_attention` is the functional core (a pure function of a parameter mapping and
arrays); :class:`WuNengAttention` (a :class:`Qwen2Attention` with the new parameters beside ``q_proj``..
``o_proj``) holds the parameters; :class:`WuNengDecoderLayer` and :class:`WuNeng` wrap it. Layers outside
``hybrid_layers`` are plain :class:`Qwen2DecoderLayer`. Every parameter path of the Qwen2 part equals
the one in :class:`Qwen2`, so Qwen2 weights map one to one (upcycling, Hugging Face names).

Recurrent state per hybrid layer (:class:`WuNengLayerState`): the last ``u`` (token shift) ``[B,d]`` and
the WKV state ``[B,S,N,N]`` (value rows x key columns), both float32. Decode also needs the KV cache,
which this module does not build yet: passing a state continues the recurrence, while attention only
sees the tokens of the call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import wkv7
from pallas_kernels.wkv7 import IMPLS as WKV_IMPLS
from pallas_kernels.wkv7 import SUPPORTED_HEAD_SIZES
from wuneng_jax.config import register_family, register_preset
from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.layers.attention import dot_product_attention
from wuneng_jax.layers.linear import linear
from wuneng_jax.layers.norms import group_norm, rms_norm
from wuneng_jax.layers.packing import document_starts
from wuneng_jax.layers.params import sharded_param
from wuneng_jax.layers.remat import remat_layer
from wuneng_jax.layers.rope import RopeTables, apply_rope
from wuneng_jax.models.qwen2 import (
    QWEN2_TINY,
    QWEN25_0_5B,
    QWEN25_1_5B,
    QWEN25_7B,
    Qwen2,
    Qwen2Attention,
    Qwen2Config,
    Qwen2DecoderLayer,
)
from wuneng_jax.sharding import (
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV_HEADS,
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    LENGTH,
    LORA,
    NORM,
    STATE_HEADS,
    constrain,
)

FUSIONS = ("concat", "add", "gate", "full")
STATE_VALUES = ("attention_value", "attention_output")
Names = tuple[str | None, ...]

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def _is_pos_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v > 0


def _default_state_head_size(head_dim: int) -> int | None:
    """``D`` when the kernel supports it, else the largest supported size dividing ``D``."""
    if head_dim in SUPPORTED_HEAD_SIZES:
        return head_dim
    fits = [n for n in SUPPORTED_HEAD_SIZES if head_dim % n == 0]
    return max(fits) if fits else None


def _resolve_hybrid_layers(spec: Any, num_layers: int) -> str | tuple[int, ...]:
    """``"all"``, a list of layer ids or ``{"every": k, "offset": o}`` -> ``"all"`` or a sorted id tuple."""
    if isinstance(spec, str):
        return spec  # validate() checks it is "all"
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"every", "offset"})
        if unknown or "every" not in spec:
            raise ValueError(
                f"WuNengConfig.hybrid_layers={dict(spec)!r}: a mapping must be {{every: k}} or "
                "{every: k, offset: o} (hybrid layers o, o+k, o+2k, ...)"
            )
        every, offset = spec["every"], spec.get("offset", 0)
        if not _is_pos_int(every):
            raise ValueError(f"WuNengConfig.hybrid_layers.every={every!r}: must be a positive integer")
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or not 0 <= offset < every:
            raise ValueError(
                f"WuNengConfig.hybrid_layers.offset={offset!r}: must be an integer in [0, every={every})"
            )
        return tuple(range(int(offset), num_layers, int(every)))
    if isinstance(spec, list | tuple):
        return tuple(spec)
    raise ValueError(f"WuNengConfig.hybrid_layers={spec!r}: use 'all', a list of layer ids, or {{every: k}}")


@dataclasses.dataclass(frozen=True)
class WuNengConfig(Qwen2Config):
    """A :class:`Qwen2Config` plus the hybrid settings of ``ARCHITECTURE.md`` §2.

    Fields left ``None`` are resolved in ``__post_init__``:

    * ``state_head_size`` ``N``: ``head_dim`` (or the largest kernel size in (16, 32, 64, 128) dividing it);
      must divide ``head_dim``.
    * ``state_heads`` ``S``: ``num_kv_heads · head_dim / N`` (= ``num_kv_heads`` when ``N = head_dim``); the
      state stream reuses the attention key/value, so ``S·N`` must equal ``num_kv_heads · head_dim``.
    * ``decay_lora_rank`` / ``iclr_lora_rank`` / ``gate_lora_rank``: BlinkDL's RWKV-7 formula
      ``max(32, round(f·sqrt(C)/32)·32)``, f = 2.5 / 2.5 / 5, applied to the state width ``C = S·N``.

    ``hybrid_layers``: ``"all"``, a list of layer ids, or ``{every: k}`` / ``{every: k, offset: o}`` (layers
    o, o+k, ...); stored as ``"all"`` or a sorted tuple. ``middle_out_rank``: rank of ``W_Om`` in ``full``
    fusion (``None``: a full ``[H·D, d]`` matrix). ``wkv_impl`` / ``wkv_chunk_size`` go to
    :func:`pallas_kernels.wkv7`.
    """

    family: ClassVar[str] = "wuneng"

    fusion: str = "full"
    state_query: bool = True
    state_value: str = "attention_value"
    hybrid_layers: str | tuple[int, ...] | dict = "all"
    state_heads: int | None = None
    state_head_size: int | None = None
    decay_lora_rank: int | None = None
    iclr_lora_rank: int | None = None
    gate_lora_rank: int | None = None
    middle_out_rank: int | None = 64
    wkv_impl: str = "auto"
    wkv_chunk_size: int | None = None

    def __post_init__(self) -> None:
        # Resolve defaults only where their inputs are sane; validate() reports everything else.
        if self.head_dim is None and _is_pos_int(self.num_heads) and _is_pos_int(self.hidden_size):
            if self.hidden_size % self.num_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        hd, g = self.head_dim, self.num_kv_heads
        if self.state_head_size is None and _is_pos_int(hd):
            object.__setattr__(self, "state_head_size", _default_state_head_size(hd))
        n = self.state_head_size
        if self.state_heads is None and _is_pos_int(hd) and _is_pos_int(g) and _is_pos_int(n):
            if (g * hd) % n == 0:
                object.__setattr__(self, "state_heads", g * hd // n)
        if _is_pos_int(self.state_heads) and _is_pos_int(n):
            width = self.state_heads * n
            for name, factor in (("decay_lora_rank", 2.5), ("iclr_lora_rank", 2.5), ("gate_lora_rank", 5.0)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, ops.lora_rank(width, factor))
        if _is_pos_int(self.num_layers):
            layers = _resolve_hybrid_layers(self.hybrid_layers, self.num_layers)
            object.__setattr__(self, "hybrid_layers", layers)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        try:
            super().validate()
        except ValueError as e:
            raise ValueError(str(e).replace("Qwen2Config.", "WuNengConfig.")) from None
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"WuNengConfig.fusion={self.fusion!r} is unknown; choose one of {list(FUSIONS)} "
                "(ARCHITECTURE.md §2; 'full' is the paper's design)"
            )
        if not isinstance(self.state_query, bool):
            raise ValueError(f"WuNengConfig.state_query={self.state_query!r}: must be true/false")
        if self.state_value not in STATE_VALUES:
            raise ValueError(
                f"WuNengConfig.state_value={self.state_value!r} is unknown; choose one of {list(STATE_VALUES)}"
            )
        if self.state_value == "attention_output" and self.state_query:
            raise ValueError(
                "WuNengConfig: state_value='attention_output' together with state_query=true would make the "
                "layer sequential over tokens (attention output -> state value -> state read-out -> next "
                "query -> attention ...), which cannot be trained in parallel. Set state_query: false, or "
                "use state_value: attention_value"
            )
        hd, n = self.head_dim, self.state_head_size
        if n is None:
            raise ValueError(
                f"WuNengConfig.state_head_size: head_dim={hd} has no divisor in the kernel's head sizes "
                f"{SUPPORTED_HEAD_SIZES}; use a head_dim divisible by 16"
            )
        if not _is_pos_int(n):
            raise ValueError(f"WuNengConfig.state_head_size={n!r}: must be a positive integer")
        if hd % n != 0:
            fits = [s for s in SUPPORTED_HEAD_SIZES if hd % s == 0]
            raise ValueError(
                f"WuNengConfig.state_head_size={n} does not divide head_dim={hd}; choose one of {fits} "
                "(or leave it unset for head_dim)"
            )
        if n not in SUPPORTED_HEAD_SIZES:
            raise ValueError(
                f"WuNengConfig.state_head_size={n} is not supported by the wkv7 kernel; choose one of "
                f"{[s for s in SUPPORTED_HEAD_SIZES if hd % s == 0]} (it must also divide head_dim={hd})"
            )
        want = self.num_kv_heads * hd // n
        if not _is_pos_int(self.state_heads) or self.state_heads != want:
            raise ValueError(
                f"WuNengConfig.state_heads={self.state_heads!r}: the state stream reuses the attention "
                f"key/value split into heads of state_head_size={n}, so state_heads must be "
                f"num_kv_heads*head_dim/state_head_size = {self.num_kv_heads}*{hd}/{n} = {want} (or leave it unset)"
            )
        for name in ("decay_lora_rank", "iclr_lora_rank", "gate_lora_rank"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(
                    f"WuNengConfig.{name}={getattr(self, name)!r}: must be a positive integer "
                    "(or leave it unset for RWKV-7's rank formula)"
                )
        if self.middle_out_rank is not None and not _is_pos_int(self.middle_out_rank):
            raise ValueError(
                f"WuNengConfig.middle_out_rank={self.middle_out_rank!r}: must be a positive integer, or null "
                "for a full-rank W_Om"
            )
        layers = self.hybrid_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(
                    f"WuNengConfig.hybrid_layers={layers!r}: use 'all', a list of layer ids, or {{every: k}}"
                )
        else:
            if not isinstance(layers, tuple):
                raise ValueError(
                    f"WuNengConfig.hybrid_layers={layers!r}: use 'all', a list of layer ids, or {{every: k}}"
                )
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int | np.integer)]
            if bad:
                raise ValueError(f"WuNengConfig.hybrid_layers: layer ids must be integers, got {bad}")
            out = sorted(i for i in layers if not 0 <= i < self.num_layers)
            if out:
                raise ValueError(
                    f"WuNengConfig.hybrid_layers: layer id(s) {out} out of range; num_layers={self.num_layers} "
                    f"allows 0..{self.num_layers - 1}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"WuNengConfig.hybrid_layers={list(layers)}: layer ids repeat")
            if not layers:
                raise ValueError(
                    "WuNengConfig.hybrid_layers is empty: a WuNeng model needs at least one hybrid layer "
                    "(use family qwen2 for a plain attention model)"
                )
            if list(layers) != sorted(layers):
                raise ValueError(
                    f"WuNengConfig.hybrid_layers={list(layers)}: list layer ids in increasing order"
                )
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(
                f"WuNengConfig.wkv_impl={self.wkv_impl!r} is unknown; choose one of {list(WKV_IMPLS)}"
            )
        if self.wkv_chunk_size is not None and not _is_pos_int(self.wkv_chunk_size):
            raise ValueError(
                f"WuNengConfig.wkv_chunk_size={self.wkv_chunk_size!r}: must be a positive integer or null"
            )

    # -- derived ---------------------------------------------------------------------------------

    @property
    def state_size(self) -> int:
        """``S·N`` (= ``num_kv_heads · head_dim``)."""
        return self.state_heads * self.state_head_size

    @property
    def hybrid_layer_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.hybrid_layers == "all" else tuple(self.hybrid_layers)

    @property
    def num_hybrid_layers(self) -> int:
        return len(self.hybrid_layer_ids)

    def is_hybrid(self, layer_id: int) -> bool:
        return layer_id in self.hybrid_layer_ids

    def to_qwen2(self) -> Qwen2Config:
        """The base :class:`Qwen2Config` (the Qwen2 fields of this config)."""
        return Qwen2Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Qwen2Config)})

    def flops_dims(self) -> dict[str, Any]:
        """Dimensions for ``train.metrics.flops_dims`` (attention in every layer, state in hybrid ones)."""
        return dict(
            n_embedding_lookup=self.vocab_size * self.hidden_size,
            tied_head=self.tie_word_embeddings,
            attn_layers=self.num_layers,
            attn_heads=self.num_heads,
            attn_head_dim=self.head_dim,
            state_layers=self.num_hybrid_layers,
            state_heads=self.state_heads,
            state_dim=self.state_head_size,
        )


def wuneng_config_from_qwen2(cfg: Qwen2Config, **overrides: Any) -> WuNengConfig:
    """A :class:`WuNengConfig` with ``cfg``'s Qwen2 fields plus ``overrides`` (hybrid settings, dtype ...)."""
    if not isinstance(cfg, Qwen2Config):
        raise ValueError(f"expected a Qwen2Config, got {type(cfg).__name__}")
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Qwen2Config)}
    names = {f.name for f in dataclasses.fields(WuNengConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown WuNengConfig field(s) {unknown}; valid fields: {sorted(names)}")
    return WuNengConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------------------------------
# Parameters of the hybrid layer (names, logical axes, init recipe)
# ----------------------------------------------------------------------------------------------------


def hybrid_param_names(cfg: WuNengConfig) -> tuple[str, ...]:
    """Names of the parameters a hybrid layer adds to a Qwen2 attention layer (attributes of
    :class:`WuNengAttention`, keys of :func:`hybrid_attention`'s mapping), for ``cfg``'s settings."""
    names = ["mu_r", "mu_kappa", "mu_w", "mu_a", "mu_g", "r_proj", "kappa_proj"]
    names += ["w0", "w1", "w2", "a0", "a1", "a2", "k_a", "g1", "g2", "r_k", "ln_x_scale", "ln_x_bias"]
    if cfg.state_query:
        names += ["state_q_proj", "state_q_scale"]
    if cfg.state_value == "attention_output":
        names += ["state_v_proj"]
    if cfg.fusion == "concat":
        names += ["o_state"]
    elif cfg.fusion == "add":
        names += ["beta"]
    elif cfg.fusion == "gate":
        names += ["gamma", "gate_w", "gate_b"]
    else:  # full
        names += ["beta", "o_state", "gamma", "gate_w", "gate_b"]
        names += ["o_middle"] if cfg.middle_out_rank is None else ["o_middle_a", "o_middle_b"]
    return tuple(names)


def init_hybrid_params(
    cfg: WuNengConfig, layer_id: int, *, q_kernel: jax.Array, k_kernel: jax.Array, key: jax.Array
) -> dict[str, tuple[jax.Array, Names]]:
    """Initial values (``param_dtype``) and logical axis names of one hybrid layer's new parameters.

    The upcycling recipe of ``ARCHITECTURE.md`` §2: ``W_R̂`` = group-mean of the query projection
    ``q_kernel`` ``[d, H·D]``; ``W_κ`` = the key projection ``k_kernel`` ``[d, G·D]``; lerps ``μ``, decay
    bias ``w0``, ``a0``, ``k_a``, ``r_k``, ``ln_x`` and the LoRAs (first factor zero, second orthogonal·0.1)
    from RWKV-7's init recipe (:mod:`wuneng_jax.layers.rwkv7_ops`); every fusion/λ parameter at the value
    that makes the layer equal to the plain attention layer.
    """
    d, hh, g, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s, n, c = cfg.state_heads, cfg.state_head_size, cfg.state_size
    pdt = jnp.dtype(cfg.param_dtype)
    vec = lambda x: jnp.asarray(x, pdt)
    k_lora, k_ortho = jax.random.split(key)
    lora_keys = iter(jax.random.split(k_lora, 3))
    mix = ops.time_mix_init_vectors(d, 1, layer_id, cfg.num_layers)  # the [d] lerps (no heads involved)
    rec = ops.time_mix_init_vectors(c, n, layer_id, cfg.num_layers)  # the [S·N] state-stream vectors

    def lora2(rank: int) -> jax.Array:
        return ops.orthogonal(next(lora_keys), (rank, c), 0.1 * ops.torch_ortho_gain(rank, c), pdt)

    p: dict[str, tuple[jax.Array, Names]] = {
        # RWKV-7 recipe: r uses x_r, the removal key x_k, decay x_w, ICLR x_a, gate x_g.
        "mu_r": (vec(mix["x_r"]), (NORM,)),
        "mu_kappa": (vec(mix["x_k"]), (NORM,)),
        "mu_w": (vec(mix["x_w"]), (NORM,)),
        "mu_a": (vec(mix["x_a"]), (NORM,)),
        "mu_g": (vec(mix["x_g"]), (NORM,)),
        "r_proj": (
            q_kernel.reshape(d, g, hh // g, hd).mean(axis=2).reshape(d, c).astype(pdt),
            (EMBED, STATE_HEADS),
        ),
        "kappa_proj": (k_kernel.astype(pdt), (EMBED, STATE_HEADS)),
        "w0": (vec(rec["w0"]), (NORM,)),
        "w1": (jnp.zeros((d, cfg.decay_lora_rank), pdt), (EMBED, LORA)),
        "w2": (lora2(cfg.decay_lora_rank), (LORA, STATE_HEADS)),
        "a0": (vec(rec["a0"]), (NORM,)),
        "a1": (jnp.zeros((d, cfg.iclr_lora_rank), pdt), (EMBED, LORA)),
        "a2": (lora2(cfg.iclr_lora_rank), (LORA, STATE_HEADS)),
        "k_a": (vec(rec["k_a"]), (NORM,)),
        "g1": (jnp.zeros((d, cfg.gate_lora_rank), pdt), (EMBED, LORA)),
        "g2": (lora2(cfg.gate_lora_rank), (LORA, STATE_HEADS)),
        "r_k": (vec(rec["r_k"]), (NORM, None)),
        "ln_x_scale": (vec(rec["ln_x_scale"]), (NORM,)),
        "ln_x_bias": (vec(rec["ln_x_bias"]), (NORM,)),
    }
    head_vec = lambda value: (jnp.full((hh, hd), value, pdt), (HEADS, HEAD_DIM))
    if cfg.state_query:
        # W^state_h starts as the identity (adds the group's read-out itself); λ = 0 switches it off.
        p["state_q_proj"] = (jnp.broadcast_to(jnp.eye(hd, dtype=pdt), (hh, hd, hd)), (HEADS, HEAD_DIM, None))
        p["state_q_scale"] = head_vec(0.0)
    if cfg.state_value == "attention_output":
        # W_Vs starts as the group mean of the attention heads: v^s_g = mean_{h in g} A_h.
        blocks = np.kron(np.eye(g), np.tile(np.eye(hd), (hh // g, 1)) / (hh // g))  # [H·D, G·D]
        p["state_v_proj"] = (jnp.asarray(blocks, pdt), (HEADS, STATE_HEADS))
    gate_w = (jnp.zeros((hh, 2 * hd, hd), pdt), (HEADS, HEAD_DIM, None))
    if cfg.fusion == "concat":
        p["o_state"] = (jnp.zeros((c, d), pdt), (STATE_HEADS, EMBED))
    elif cfg.fusion == "add":
        p["beta"] = head_vec(0.0)
    elif cfg.fusion == "gate":
        p.update(gamma=head_vec(0.0), gate_w=gate_w, gate_b=head_vec(0.0))
    else:  # full: W_Os, W_Om zero; β, γ at one so the state and middle heads are live once W_Os/W_Om move
        p["beta"] = (jnp.ones((s, n), pdt), (STATE_HEADS, HEAD_DIM))
        p["o_state"] = (jnp.zeros((c, d), pdt), (STATE_HEADS, EMBED))
        p.update(gamma=head_vec(1.0), gate_w=gate_w, gate_b=head_vec(0.0))
        if cfg.middle_out_rank is None:
            p["o_middle"] = (jnp.zeros((hh * hd, d), pdt), (HEADS, EMBED))
        else:
            r = cfg.middle_out_rank
            p["o_middle_a"] = (ops.orthogonal(k_ortho, (hh * hd, r), 1.0, pdt), (HEADS, LORA))
            p["o_middle_b"] = (jnp.zeros((r, d), pdt), (LORA, EMBED))
    assert tuple(p) == hybrid_param_names(cfg), (tuple(p), hybrid_param_names(cfg))
    return p


# ----------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------


class WuNengLayerState(NamedTuple):
    """Recurrent state of one hybrid layer: ``shift`` ``[B,d]`` (last ``u``), ``wkv`` ``[B,S,N,N]``
    (value rows x key columns); float32 (float64 in x64 runs)."""

    shift: jax.Array
    wkv: jax.Array


class HybridOut(NamedTuple):
    """:func:`hybrid_attention` result.

    o: ``[B,T,d]`` the fused attention-block output (before the residual add).
    state_branch: ``[B,T,d]`` the state-driven heads alone through the output projection,
      ``W_O [R_{g(1)} .. R_{g(H)}]`` (the student branch of the ``align`` stage).
    state: :class:`WuNengLayerState` after the last token.
    """

    o: jax.Array
    state_branch: jax.Array
    state: WuNengLayerState


def _heads(x: jax.Array, n: int) -> jax.Array:
    """``[B,T,C]`` -> ``[B,T,C/n,n]`` with a sharding constraint on the head axis."""
    return constrain(ops.split_heads(x, n), (BATCH, LENGTH, ACT_KV_HEADS, None))


def _per_query_head(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B,T,G,D]`` -> ``[B,T,H,D]``: query head ``h`` gets group ``h // (H/G)`` (the GQA mapping)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def state_read(
    p: Mapping[str, jax.Array],
    u: jax.Array,
    k: jax.Array,
    v_s: jax.Array,
    *,
    cfg: WuNengConfig,
    reset: jax.Array,
    state: WuNengLayerState | None = None,
) -> tuple[jax.Array, WuNengLayerState]:
    """The state-driven heads: RWKV-7 recurrence written with the attention key, read with ``r̂``.

    Args:
      p: the hybrid parameters (``mu_* r_proj kappa_proj w0 w1 w2 a0 a1 a2 k_a g1 g2 r_k ln_x_*``).
      u: ``[B,T,d]`` normed layer input; k: ``[B,T,G,D]`` attention key (bias added, pre-RoPE);
      v_s: ``[B,T,S·N]`` the value written into the state.
      reset: bool ``[B,T]`` document starts (state and token shift restart there).
      state: the layer's state before ``u[:, 0]`` (zeros when None).
    Returns:
      ``R`` ``[B,T,G,D]`` (state heads merged per KV group, gate applied) and the new state.
    """
    dt = u.dtype
    c = lambda name: p[name].astype(dt)
    b, t, _ = u.shape
    n = cfg.state_head_size
    uu = ops.token_shift(u, None if state is None else state.shift, reset) - u
    u_r, u_kappa, u_w, u_a, u_g = (ops.lerp_mix(u, uu, c(f"mu_{m}")) for m in ("r", "kappa", "w", "a", "g"))
    r_hat = linear(u_r, p["r_proj"])
    kappa_hat = ops.l2_normalize_heads(linear(u_kappa, p["kappa_proj"]), n)
    log_w = ops.decay_log(u_w, p["w0"], c("w1"), c("w2"))  # float32 (float64 in x64 runs)
    alpha = jax.nn.sigmoid(c("a0") + ops.lora(u_a, c("a1"), c("a2")))
    k_tilde = ops.modify_key(k.reshape(b, t, cfg.state_size), alpha, c("k_a"))
    g = ops.lora(u_g, c("g1"), c("g2"), jax.nn.sigmoid)

    rh, kh, vh, kkh, ah = (_heads(x, n) for x in (r_hat, k_tilde, v_s, kappa_hat, alpha))
    o, wkv_state = wkv7(
        rh,
        _heads(log_w, n),
        kh,
        vh,
        -kkh,
        kkh * ah,
        None if state is None else state.wkv,
        reset=reset,
        impl=cfg.wkv_impl,
        chunk_size=cfg.wkv_chunk_size,
    )
    y = group_norm(ops.merge_heads(o), p["ln_x_scale"], p["ln_x_bias"], cfg.state_heads, ops.LN_X_EPS)
    y = y + ops.merge_heads(ops.bonus(rh, kh, vh, c("r_k")))
    r = (y * g).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    r = constrain(r, (BATCH, LENGTH, ACT_KV_HEADS, None))
    sdt = wkv_state.dtype
    return r, WuNengLayerState(u[:, -1].astype(sdt), wkv_state)


def query_with_state(p: Mapping[str, jax.Array], q: jax.Array, r: jax.Array) -> jax.Array:
    """Multi-token state processing: ``q_h + λ_h ⊙ (R_{g(h)} W^state_h)`` (pre-RoPE).

    q ``[B,T,H,D]``, r ``[B,T,G,D]``; ``state_q_proj`` ``[H,D,D]``, ``state_q_scale`` (λ) ``[H,D]``.
    """
    dt = q.dtype
    rq = jnp.einsum("bthd,hde->bthe", _per_query_head(r, q.shape[2]), p["state_q_proj"].astype(dt))
    return q + p["state_q_scale"].astype(dt) * rq


def _state_norm(r: jax.Array, n: int, eps: float) -> jax.Array:
    """Per-state-head RMSNorm without a scale: ``[B,T,G,D]`` normalised over each ``N`` block."""
    b, t, g, hd = r.shape
    x = r.reshape(b, t, g * hd // n, n)
    return rms_norm(x, jnp.ones((n,), r.dtype), eps).reshape(b, t, g, hd)


def fuse_heads(p: Mapping[str, jax.Array], a: jax.Array, r: jax.Array, *, cfg: WuNengConfig) -> jax.Array:
    """Cross-head interaction ``F`` and the output projection -> o ``[B,T,d]``.

    a ``[B,T,H,D]`` standard heads; r ``[B,T,G,D]`` state read-out; ``p`` holds ``o_kernel`` (``W_O``
    ``[H·D, d]``) and the fusion parameters of ``cfg.fusion`` (module docstring table).
    """
    dt = a.dtype
    c = lambda name: p[name].astype(dt)
    b, t, hh, _ = a.shape
    flat = lambda x: x.reshape(b, t, -1)
    if cfg.fusion == "concat":
        return linear(flat(a), p["o_kernel"]) + linear(flat(r), p["o_state"])
    nr = _state_norm(r, cfg.state_head_size, cfg.rms_norm_eps)
    nr_h = _per_query_head(nr, hh)
    if cfg.fusion == "add":
        return linear(flat(a + c("beta") * nr_h), p["o_kernel"])
    z = jnp.einsum("bthi,hij->bthj", jnp.concatenate([a, nr_h], axis=-1), c("gate_w")) + c("gate_b")
    m = a + c("gamma") * jax.nn.sigmoid(z) * (nr_h - a)  # middle heads
    m = constrain(m, (BATCH, LENGTH, ACT_HEADS, None))
    if cfg.fusion == "gate":
        return linear(flat(m), p["o_kernel"])
    # full: standard + state-driven + middle heads
    beta_nr = c("beta").reshape(-1) * flat(nr)
    if "o_middle" in p:
        middle = linear(flat(m), p["o_middle"])
    else:
        middle = linear(linear(flat(m), p["o_middle_a"]), p["o_middle_b"])
    return linear(flat(a), p["o_kernel"]) + linear(beta_nr, p["o_state"]) + middle


def hybrid_attention(
    p: Mapping[str, jax.Array],
    u: jax.Array,
    *,
    cfg: WuNengConfig,
    rope: RopeTables,
    segment_ids: jax.Array,
    state: WuNengLayerState | None = None,
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> HybridOut:
    """The WuNeng hybrid attention block on the normed input ``u`` ``[B,T,d]`` (compute dtype ``u.dtype``).

    Args:
      p: ``q_kernel`` ``[d,H·D]``, ``q_bias``, ``k_kernel``/``v_kernel`` ``[d,G·D]``, ``k_bias``, ``v_bias``,
        ``o_kernel`` ``[H·D,d]`` (the Qwen2 attention) plus :func:`hybrid_param_names` ``(cfg)``.
      rope: RoPE tables ``[B,T,D]``; segment_ids: int ``[B,T]`` (attention mask and state resets).
      state: state before ``u[:, 0]``; ``None`` starts from zeros (and resets at t = 0), a given state
        is continued at t = 0 (later document starts in ``segment_ids`` still reset it).
      attend: ``attend(q, k, v) -> A`` ``[B,T,H,D]`` from pre-RoPE ``q`` ``[B,T,H,D]``, ``k``/``v``
        ``[B,T,G,D]`` (the decoder's KV-cached attention); default: causal attention within segments.
    Returns:
      :class:`HybridOut`.
    """
    b, t, _ = u.shape
    hh, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(u, p["q_kernel"], p["q_bias"]).reshape(b, t, hh, hd)
    k = linear(u, p["k_kernel"], p["k_bias"]).reshape(b, t, g, hd)
    v = linear(u, p["v_kernel"], p["v_bias"]).reshape(b, t, g, hd)
    q = constrain(q, (BATCH, LENGTH, ACT_HEADS, None))
    k = constrain(k, (BATCH, LENGTH, ACT_KV_HEADS, None))
    v = constrain(v, (BATCH, LENGTH, ACT_KV_HEADS, None))
    reset = document_starts(segment_ids) if state is None else ops.segment_reset(segment_ids)

    if attend is None:

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return dot_product_attention(
                apply_rope(q, rope),
                apply_rope(k, rope),
                v,
                segment_ids_q=segment_ids,
                segment_ids_kv=segment_ids,
                causal=True,
                impl=cfg.attention_impl,
            )

    def attend_q(q: jax.Array) -> jax.Array:
        return constrain(attend(q, k, v), (BATCH, LENGTH, ACT_HEADS, None))

    if cfg.state_value == "attention_value":
        r, new_state = state_read(p, u, k, v.reshape(b, t, -1), cfg=cfg, reset=reset, state=state)
        a = attend_q(query_with_state(p, q, r) if cfg.state_query else q)
    else:  # attention_output (validated: state_query is off)
        a = attend_q(q)
        v_s = linear(a.reshape(b, t, -1), p["state_v_proj"])
        r, new_state = state_read(p, u, k, v_s, cfg=cfg, reset=reset, state=state)
    o = constrain(fuse_heads(p, a, r, cfg=cfg), (BATCH, LENGTH, ACT_EMBED))
    branch = linear(_per_query_head(r, hh).reshape(b, t, -1), p["o_kernel"])
    return HybridOut(o, constrain(branch, (BATCH, LENGTH, ACT_EMBED)), new_state)


# ----------------------------------------------------------------------------------------------------
# NNX modules
# ----------------------------------------------------------------------------------------------------


class WuNengAttention(Qwen2Attention):
    """A Qwen2 attention (``q_proj k_proj v_proj o_proj``) plus the hybrid parameters of
    :func:`hybrid_param_names` as attributes; ``__call__`` runs :func:`hybrid_attention`."""

    def __init__(self, cfg: WuNengConfig, layer_id: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.cfg = cfg
        self.layer_id = layer_id
        init = init_hybrid_params(
            cfg,
            layer_id,
            q_kernel=self.q_proj.kernel[...],
            k_kernel=self.k_proj.kernel[...],
            key=rngs.params(),
        )
        for name, (value, names) in init.items():
            setattr(self, name, sharded_param(value, names))

    def params(self) -> dict[str, jax.Array]:
        """The parameter mapping of :func:`hybrid_attention`."""
        p = {
            "q_kernel": self.q_proj.kernel[...],
            "q_bias": self.q_proj.bias[...],
            "k_kernel": self.k_proj.kernel[...],
            "k_bias": self.k_proj.bias[...],
            "v_kernel": self.v_proj.kernel[...],
            "v_bias": self.v_proj.bias[...],
            "o_kernel": self.o_proj.kernel[...],
        }
        p.update({name: getattr(self, name)[...] for name in hybrid_param_names(self.cfg)})
        # Compute dtype: the Qwen2 projections cast their kernels like ``Linear`` does.
        dt = jnp.dtype(self.cfg.dtype)
        for name in ("q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias", "o_kernel"):
            p[name] = p[name].astype(dt)
        return p

    def __call__(  # type: ignore[override]
        self,
        u: jax.Array,
        *,
        rope: RopeTables,
        segment_ids: jax.Array,
        state: WuNengLayerState | None = None,
    ) -> HybridOut:
        """u ``[B,T,d]`` (normed) -> :class:`HybridOut`."""
        return hybrid_attention(
            self.params(), u, cfg=self.cfg, rope=rope, segment_ids=segment_ids, state=state
        )


class LayerOut(NamedTuple):
    """A decoder layer's result: new ``h``, attention-block output ``o``, the state branch ``W_O[R]`` and
    the recurrent state (the last two ``None`` for plain attention layers)."""

    h: jax.Array
    o: jax.Array
    state_branch: jax.Array | None
    state: WuNengLayerState | None


class WuNengDecoderLayer(Qwen2DecoderLayer):
    """``h + hybrid_attn(RMSNorm(h))`` then ``+ SwiGLU(RMSNorm(·))``; attribute names as Qwen2's layer."""

    def __init__(self, cfg: WuNengConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.layer_id = layer_id
        super().__init__(cfg, rngs=rngs)

    def make_attention(self, cfg: WuNengConfig, rngs: nnx.Rngs) -> nnx.Module:
        return WuNengAttention(cfg, self.layer_id, rngs=rngs)

    def __call__(
        self, h: jax.Array, *, rope: RopeTables, segment_ids: jax.Array, state: WuNengLayerState | None = None
    ) -> LayerOut:
        """h ``[B,T,d]`` -> :class:`LayerOut`."""
        out = self.self_attn(self.input_layernorm(h), rope=rope, segment_ids=segment_ids, state=state)
        h = h + out.o
        h = h + self.mlp(self.post_attention_layernorm(h))
        return LayerOut(constrain(h, (BATCH, LENGTH, ACT_EMBED)), out.o, out.state_branch, out.state)


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


class WuNeng(nnx.Module):
    """WuNeng causal LM: ``model(tokens, segment_ids=None, positions=None) -> float32 logits [B,T,V]``.

    Same attribute layout as :class:`Qwen2` (``embed_tokens``, ``layers``, ``norm``, ``lm_head``); layer ``i``
    is a :class:`WuNengDecoderLayer` when ``cfg.is_hybrid(i)``, else a :class:`Qwen2DecoderLayer`.
    """

    # The embedding, final norm / head and input preparation are Qwen2's (same attributes and config fields).
    prepare = Qwen2.prepare
    embed = Qwen2.embed
    head = Qwen2.head

    def __init__(self, cfg: WuNengConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, WuNengConfig):
            raise ValueError(f"WuNeng needs a WuNengConfig, got {type(cfg).__name__}")
        Qwen2.__init__(
            self,
            cfg,
            rngs=rngs,
            make_layer=lambda i: (
                WuNengDecoderLayer(cfg, i, rngs=rngs)
                if cfg.is_hybrid(i)
                else Qwen2DecoderLayer(cfg, rngs=rngs)
            ),
        )

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

    def forward_with_intermediates(
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

    def __call__(
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

WUNENG_TINY = wuneng_config_from_qwen2(
    QWEN2_TINY, state_head_size=16, decay_lora_rank=8, iclr_lora_rank=8, gate_lora_rank=16, middle_out_rank=16
)
WUNENG_0_5B = wuneng_config_from_qwen2(QWEN25_0_5B)
WUNENG_1_5B = wuneng_config_from_qwen2(QWEN25_1_5B)
WUNENG_7B = wuneng_config_from_qwen2(QWEN25_7B)

register_preset("wuneng_tiny", WUNENG_TINY)
register_preset("wuneng-0.5b", WUNENG_0_5B)
register_preset("wuneng-1.5b", WUNENG_1_5B)
register_preset("wuneng-7b", WUNENG_7B)

"""The ``wuneng`` family's config: a :class:`Qwen2Config` plus the hybrid settings of ``ARCHITECTURE.md`` §2.

:class:`WuNengConfig` resolves its unset fields (state head size and count, LoRA ranks, the hybrid layer ids)
and validates every field with an error that names it and the fix. ``fusion`` picks the cross-head
interaction ``F`` (concat | add | gate | full), ``state_query`` the state-modulated queries, ``state_value``
what the state stores (the attention value or a projection of the attention output), ``hybrid_layers``
which layers are hybrid (the rest stay plain attention), ``init`` how the new parameters start (``upcycle``:
the layer equals its attention layer; ``scratch``: state branch and fusion active at step 0). The layer itself is
:mod:`wuneng_jax.models.wuneng_layer`; the presets below are registered by :mod:`wuneng_jax.models.wuneng`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from pallas_kernels.wkv7 import IMPLS as WKV_IMPLS
from pallas_kernels.wkv7 import SUPPORTED_HEAD_SIZES
from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.models.qwen2 import QWEN2_TINY, QWEN25_0_5B, QWEN25_1_5B, QWEN25_7B, Qwen2Config

FUSIONS = ("concat", "add", "gate", "full")
INITS = ("upcycle", "scratch")
STATE_VALUES = ("attention_value", "attention_output")


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

    ``init``: ``upcycle`` (default; every fusion/λ parameter at the value that makes each hybrid layer
    exactly its plain attention layer, ``ARCHITECTURE.md`` §2) or ``scratch`` (fusion weights and λ drawn
    with fan-in scaling, so the state branch and the fusion are active at step 0: for training from
    scratch; the recipe is :func:`wuneng_jax.models.wuneng_params.init_hybrid_params`).
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
    init: str = "upcycle"

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
        if self.init not in INITS:
            raise ValueError(
                f"WuNengConfig.init={self.init!r} is unknown; choose one of {list(INITS)} (upcycle: the "
                "hybrid layer starts equal to its attention layer; scratch: state branch and fusion active)"
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


# Presets: the tiny test model and the Qwen2.5 shapes with default hybrid settings.
WUNENG_TINY = wuneng_config_from_qwen2(
    QWEN2_TINY, state_head_size=16, decay_lora_rank=8, iclr_lora_rank=8, gate_lora_rank=16, middle_out_rank=16
)
WUNENG_0_5B = wuneng_config_from_qwen2(QWEN25_0_5B)
WUNENG_1_5B = wuneng_config_from_qwen2(QWEN25_1_5B)
WUNENG_7B = wuneng_config_from_qwen2(QWEN25_7B)

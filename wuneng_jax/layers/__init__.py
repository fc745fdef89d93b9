"""Building blocks shared by the model families: pure functions of arrays and thin NNX wrappers."""

from wuneng_jax.layers.attention import dot_product_attention
from wuneng_jax.layers.embed import Embed
from wuneng_jax.layers.linear import Linear, linear
from wuneng_jax.layers.mlp import SwiGLU, swiglu
from wuneng_jax.layers.norms import GroupNorm, LayerNorm, RMSNorm, group_norm, layer_norm, rms_norm
from wuneng_jax.layers.packing import document_starts, positions_from_segments, resolve_segments
from wuneng_jax.layers.params import init_param, place, sharded_param, sharding_active
from wuneng_jax.layers.rope import RopeTables, apply_rope, rope_tables

__all__ = [
    "Embed",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "RopeTables",
    "SwiGLU",
    "apply_rope",
    "document_starts",
    "dot_product_attention",
    "group_norm",
    "init_param",
    "layer_norm",
    "linear",
    "place",
    "positions_from_segments",
    "resolve_segments",
    "rms_norm",
    "rope_tables",
    "sharded_param",
    "sharding_active",
    "swiglu",
]

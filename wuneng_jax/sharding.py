"""Logical axis names: the one vocabulary shared by parameters, activations and the mesh rules table.

Every parameter and key activation in ``wuneng_jax`` is annotated with these names (never with mesh
axes). ``train/`` owns the table that maps them to mesh axes (``data``, ``fsdp``, ``tensor``,
``sequence``); ``DEFAULT_RULES`` below is that table's default, loaded into the training config.
"""

from __future__ import annotations

import jax
from flax.core import spmd

# Activation axes
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"

# Parameter axes
EMBED = "embed"  # model width d / C
VOCAB = "vocab"
MLP = "mlp"  # feed-forward width
HEADS = "heads"  # query heads (or flattened heads*head_dim projections)
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
STATE_HEADS = "state_heads"  # RWKV-7 / WuNeng state heads (flattened S*N projections)
LORA = "lora"  # low-rank dims of RWKV-7 LoRAs
NORM = "norm"  # norm scales / small vectors
LAYERS = "layers"  # stacked (scanned) layers

# Default logical -> mesh axis rules (MaxText style: one table; first matching mesh axes win).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, "sequence"),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (EMBED, ("fsdp", "sequence")),  # parameters and optimizer state also over the sequence devices
    (VOCAB, "tensor"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (STATE_HEADS, "tensor"),
    (LORA, None),
    (NORM, None),
    (LAYERS, None),
)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names.

    A no-op outside a mesh context (``jax.set_mesh``) or without rules (``nnx.logical_axis_rules``),
    so model code runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {names} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, spmd.apply_rules(jax.sharding.PartitionSpec(*names), rules))

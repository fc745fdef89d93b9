"""Parameter creation with logical axis names.

``sharded_param(value, names)`` is the one way model code creates a parameter: the value gets an
``nnx.Param`` carrying ``out_sharding=names`` (logical names from ``wuneng_jax.sharding``). The value is
sharded eagerly only when both a mesh (``jax.set_mesh``) and logical rules (``nnx.logical_axis_rules``)
are active, so the same model code builds on one CPU without any mesh and shards on creation under a
mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

Names = tuple[str | None, ...]


def sharding_active() -> bool:
    """True when a mesh and logical axis rules are both in context."""
    return (not jax.sharding.get_abstract_mesh().empty) and bool(spmd.get_logical_axis_rules())


def sharded_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` holding ``value`` annotated with logical axis ``names`` (one per dim)."""
    names = tuple(names)
    if len(names) != value.ndim:
        raise ValueError(
            f"sharded_param: {len(names)} logical names {names} for a value of shape {value.shape}"
        )
    return nnx.Param(value, out_sharding=names, eager_sharding=sharding_active())


def init_param(
    rngs: nnx.Rngs,
    init: Callable[..., jax.Array],
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype | str = jnp.float32,
) -> nnx.Param:
    """``sharded_param(init(key, shape, dtype), names)`` with a key from ``rngs.params()``."""
    return sharded_param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)), names)


def place(
    value: np.ndarray | jax.Array, var: nnx.Variable, dtype: jnp.dtype | str | None = None
) -> jax.Array:
    """``value`` as a device array for ``var``: cast to ``dtype`` (default: keep) and, when sharding is
    active, put with the sharding that ``var``'s logical names resolve to."""
    arr = np.asarray(value) if not isinstance(value, jax.Array) else value
    if dtype is not None:
        arr = arr.astype(jnp.dtype(dtype))
    names = var.get_metadata().get("out_sharding")
    if names and sharding_active():
        spec = spmd.apply_rules(jax.sharding.PartitionSpec(*names), spmd.get_logical_axis_rules())
        mesh = jax.sharding.get_mesh()  # the concrete mesh of ``jax.set_mesh``
        if getattr(mesh, "empty", True):  # only an abstract mesh in context: constrain instead
            return jax.lax.with_sharding_constraint(
                jnp.asarray(arr), jax.sharding.NamedSharding(jax.sharding.get_abstract_mesh(), spec)
            )
        return jax.device_put(arr, jax.sharding.NamedSharding(mesh, spec))
    return jnp.asarray(arr)

"""The train state (a pytree of arrays) and its sharded initialisation.

``TrainState`` holds everything a step reads and writes: the step counter, the float32 parameters
(an ``nnx.State`` of ``nnx.Param``s), the optax state (moments inherit the parameters' logical
axes, so they shard like them), the model's other variables (``rest``, not trained) and an RNG key.

Sharded initialisation never materialises the model on one host: the model is first traced
abstractly (``nnx.eval_shape`` under the mesh and rules, shapes + logical names only), the logical
names are turned into ``NamedSharding``s on the concrete mesh, and the real initialiser runs inside
``jax.jit(..., out_shardings=...)`` so each device creates only its own shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.config import Rules
from train.mesh import MeshError, check_divisible, mesh_context

ModelBuilder = Callable[[Any], nnx.Module]  # rngs -> module (config already bound)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], batches consumed (= steps run, skipped ones included)
    params: Any  # nnx.State of Param (float32)
    opt_state: Any  # optax state
    rest: Any  # nnx.State of the model's non-Param variables
    rng: jax.Array  # uint32 [2], raw PRNG key data

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """What the jitted functions need besides arrays: the model's graph definition, the abstract
    state (``ShapeDtypeStruct``s) and the state's shardings on the concrete mesh."""

    graphdef: Any
    abstract: TrainState
    shardings: TrainState


def _init_fn(
    build: ModelBuilder, tx: optax.GradientTransformation, seed: int
) -> Callable[[], tuple[Any, TrainState]]:
    def init() -> tuple[Any, TrainState]:
        model = build(nnx.Rngs(params=seed, dropout=seed + 1))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rest=rest,
            rng=jax.random.key_data(jax.random.PRNGKey(seed + 2)),
        )
        return graphdef, state

    return init


def _specs_to_shardings(specs: Any, mesh: Mesh) -> Any:
    """PartitionSpec tree (possibly inside Variables) -> NamedSharding on the concrete mesh."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def make_layout(
    build: ModelBuilder, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, seed: int
) -> StateLayout:
    """Trace the model + optimizer abstractly and derive the state's shardings (no allocation)."""
    init = _init_fn(build, tx, seed)
    with mesh_context(mesh, rules):
        graphdef, abstract = nnx.eval_shape(init)
        specs = nnx.get_partition_spec(abstract)
    shardings = _specs_to_shardings(specs, mesh)
    _check_shardable(abstract, shardings)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return StateLayout(graphdef=graphdef, abstract=abstract, shardings=shardings)


def _check_shardable(abstract: TrainState, shardings: TrainState) -> None:
    paths = jax.tree_util.tree_leaves_with_path(abstract.params)
    shards = jax.tree_util.tree_leaves(shardings.params)
    for (path, leaf), sh in zip(paths, shards, strict=True):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        check_divisible(leaf.shape, sh.spec, sh.mesh, f"parameter {name}")


def init_state(
    build: ModelBuilder,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    seed: int,
    layout: StateLayout,
) -> TrainState:
    """Materialise the state directly in its shards (``jax.jit`` with ``out_shardings``)."""
    init = _init_fn(build, tx, seed)

    def only_state() -> TrainState:
        return init()[1]

    with mesh_context(mesh, rules):
        return jax.jit(only_state, out_shardings=layout.shardings)()


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def param_shapes(params: Any) -> dict[str, list[int]]:
    """``{"path/to/param": shape}`` for the checkpoint metadata and mismatch messages."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


__all__ = [
    "MeshError",
    "StateLayout",
    "TrainState",
    "count_params",
    "init_state",
    "make_layout",
    "param_shapes",
]

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
from typing import Any, Protocol

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


class ParamSplit(Protocol):
    """A fixed split of the parameters into a trained and a frozen part (``train.upcycle.params``).

    ``split(params) -> (trainable, frozen)`` and ``merge(trainable, frozen) -> params`` (the same tree
    structure as the input). The optimizer state covers the trainable part only; frozen parameters
    pass through a step untouched.
    """

    def split(self, params: Any) -> tuple[Any, Any]: ...

    def merge(self, trainable: Any, frozen: Any) -> Any: ...


def trainable_part(params: Any, trainable: ParamSplit | None) -> Any:
    """The parameters the optimizer updates (all of them when ``trainable`` is None)."""
    return params if trainable is None else trainable.split(params)[0]


def _new_state(params: Any, rest: Any, tx: optax.GradientTransformation, seed: int, trainable) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(trainable_part(params, trainable)),
        rest=rest,
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 2)),
    )


def _init_fn(
    build: ModelBuilder, tx: optax.GradientTransformation, seed: int, trainable: ParamSplit | None = None
) -> Callable[[], tuple[Any, TrainState]]:
    def init() -> tuple[Any, TrainState]:
        model = build(nnx.Rngs(params=seed, dropout=seed + 1))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, _new_state(params, rest, tx, seed, trainable)

    return init


def specs_to_shardings(specs: Any, mesh: Mesh) -> Any:
    """PartitionSpec tree (possibly inside Variables) -> NamedSharding on the concrete mesh."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def make_layout(
    build: ModelBuilder,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    seed: int,
    *,
    trainable: ParamSplit | None = None,
) -> StateLayout:
    """Trace the model + optimizer abstractly and derive the state's shardings (no allocation).

    ``trainable``: only that part of the parameters gets optimizer state (default: all).
    """
    init = _init_fn(build, tx, seed, trainable)
    with mesh_context(mesh, rules):
        graphdef, abstract = nnx.eval_shape(init)
        specs = nnx.get_partition_spec(abstract)
    shardings = specs_to_shardings(specs, mesh)
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
    *,
    trainable: ParamSplit | None = None,
) -> TrainState:
    """Materialise the state directly in its shards (``jax.jit`` with ``out_shardings``)."""
    init = _init_fn(build, tx, seed, trainable)

    def only_state() -> TrainState:
        return init()[1]

    with mesh_context(mesh, rules):
        return jax.jit(only_state, out_shardings=layout.shardings)()


def conform_params(params: Any, abstract: Any, where: str) -> Any:
    """``params`` (an ``nnx.State`` of loaded weights) rebuilt in the structure of ``abstract`` (the
    layout's parameter ``State``: same paths, same ``Variable`` metadata). ValueError naming the first
    missing, extra or mis-shaped parameter (``where`` names the source)."""
    got = {tuple(p): v for p, v in nnx.to_flat_state(params)}
    want = nnx.to_flat_state(abstract)
    names = lambda paths: [".".join(map(str, p)) for p in sorted(paths, key=str)[:8]]
    missing = [p for p, _ in want if tuple(p) not in got]
    if missing:
        raise ValueError(f"{where}: the weights lack parameter(s) {names(missing)} of the configured model")
    extra = set(got) - {tuple(p) for p, _ in want}
    if extra:
        raise ValueError(f"{where}: the weights have parameter(s) {names(extra)} the configured model lacks")
    out = []
    for path, var in want:
        value = got[tuple(path)]
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if tuple(value.shape) != tuple(var.shape) or value.dtype != var.dtype:
            raise ValueError(
                f"{where}: parameter {'.'.join(map(str, path))} is {value.dtype}{list(value.shape)}, "
                f"the configured model expects {var.dtype}{list(var.shape)}"
            )
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def state_from_params(
    params: Any,
    rest: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    seed: int,
    layout: StateLayout,
    *,
    trainable: ParamSplit | None = None,
) -> TrainState:
    """A fresh ``TrainState`` (step 0, new optimizer state) around given parameters (e.g. a converted
    checkpoint), laid out in ``layout``'s shardings. ``params``/``rest`` must have the layout's
    structure (:func:`conform_params`); their buffers are donated (an array appearing twice, e.g. a
    weight copied into two parameters by a conversion, is copied first)."""

    def make(params: Any, rest: Any) -> TrainState:
        return _new_state(params, rest, tx, seed, trainable)

    seen: set[int] = set()

    def distinct(x: Any) -> Any:
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    params, rest = jax.tree.map(distinct, (params, rest))

    with mesh_context(mesh, rules):
        fn = jax.jit(
            make,
            in_shardings=(layout.shardings.params, layout.shardings.rest),
            out_shardings=layout.shardings,
            donate_argnums=(0, 1),
        )
        return fn(params, rest)


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
    "ParamSplit",
    "StateLayout",
    "TrainState",
    "conform_params",
    "count_params",
    "init_state",
    "make_layout",
    "param_shapes",
    "specs_to_shardings",
    "state_from_params",
    "trainable_part",
]

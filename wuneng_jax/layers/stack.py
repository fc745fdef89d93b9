"""Decoder layers stored stacked and run with ``jax.lax.scan``: compile time independent of depth.

A model builds its layers one by one (each initialised as in the reference implementations) and hands
them to :class:`LayerStack` with a *kind* per layer; layers of one kind have the same parameter
structure. :func:`plan_groups` cuts the layer sequence into runs of a repeating pattern of kinds:

* ``qwen2``: ``[attn × L]`` -> one group, period 1;
* ``rwkv7``: ``[first, block × (L-1)]`` -> layer 0 alone (it makes ``v_first``), then period 1;
* ``wuneng``, every 4th layer hybrid: ``[attn, attn, attn, hybrid] × L/4`` -> one group of period 4.

Each pattern position ``j`` of group ``g`` holds its layers' parameters stacked on a leading ``LAYERS``
axis (``[n, ...]``, parameter path ``layers/blocks/<g>/<j>/...``). :meth:`LayerStack.__call__` runs a
group as one ``lax.scan`` over its ``n`` repeats with the ``period`` layers of the pattern unrolled in the
body, each layer under the model's remat policy; a group of one repeat runs without a scan.

Per-layer views (the layout of Hugging Face / BlinkDL checkpoints and of run directories written before
layers were stacked): :func:`unstack_flat` / :func:`stack_flat` convert flat ``{path: array}`` mappings
between ``("layers", i, ...)`` and the stacked paths; :meth:`LayerStack.view` is one layer as a
read-only module; :meth:`LayerStack.group_caches` / :meth:`LayerStack.layer_caches` convert per-layer
caches (decode state) to the stacked layout the scan carries and back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.layers.params import sharding_active
from wuneng_jax.layers.remat import REMAT_POLICIES, check_remat
from wuneng_jax.sharding import LAYERS

#: Longest repeating pattern looked for (a hybrid layer every ``k`` layers needs ``k <= MAX_PERIOD``).
MAX_PERIOD = 16
#: ``step(layer, carry, cache) -> (carry, cache, aux)``: one decoder layer call (the model's).
Step = Callable[[nnx.Module, Any, Any], tuple[Any, Any, Any]]


class Group(NamedTuple):
    """Layers ``start + r·period + j`` (``r < repeats``, ``j < period``) of one scanned group."""

    start: int
    period: int
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def layer(self, r: int, j: int) -> int:
        return self.start + r * self.period + j

    def ids(self, j: int) -> list[int]:
        """The layers at pattern position ``j``, in order."""
        return [self.layer(r, j) for r in range(self.repeats)]


def plan_groups(kinds: Sequence[Hashable]) -> tuple[Group, ...]:
    """Cut ``kinds`` (one per layer) into groups of a repeating pattern, greedily from layer 0: at each
    start, the period (``<= MAX_PERIOD``, repeated at least twice) that covers the most layers, the
    shortest on a tie; a layer that starts no repetition is a group of its own."""
    kinds = list(kinds)
    groups, i, n = [], 0, len(kinds)
    while i < n:
        best = Group(i, 1, 1)
        for p in range(1, min(MAX_PERIOD, n - i) + 1):
            reps = 1
            while i + (reps + 1) * p <= n and kinds[i + reps * p : i + (reps + 1) * p] == kinds[i : i + p]:
                reps += 1
            if (reps > 1 or p == 1) and reps * p > best.period * best.repeats:
                best = Group(i, p, reps)
        groups.append(best)
        i = best.stop
    return tuple(groups)


def _stacked_variable(vs: Sequence[nnx.Variable]) -> nnx.Variable:
    """One variable holding ``vs``' values stacked on a new leading ``LAYERS`` axis."""
    meta = dict(vs[0].get_metadata())
    names = meta.get("out_sharding")
    if names is not None:
        meta["out_sharding"] = (LAYERS, *names)
    meta["eager_sharding"] = sharding_active() and names is not None
    for k in ("hijax", "ref"):
        meta.pop(k, None)
    return type(vs[0])(jnp.stack([v[...] for v in vs]), **meta)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of ``modules``' structure whose variables are theirs stacked (``[n, ...]``)."""
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    for k, (g, _) in enumerate(splits[1:], 1):
        if g != graphdef:
            raise ValueError(
                f"stack_modules: module {k} ({type(modules[k]).__name__}) differs in structure from module 0; "
                "layers of one kind must have identical parameters and static attributes"
            )
    is_var = lambda x: isinstance(x, nnx.Variable)
    stacked = jax.tree.map(lambda *vs: _stacked_variable(vs), *(s for _, s in splits), is_leaf=is_var)
    return nnx.merge(graphdef, stacked)


def _layer_variable(v: nnx.Variable, r: int) -> nnx.Variable:
    """Layer ``r`` of a stacked variable, its logical names without the leading ``LAYERS``."""
    meta = dict(v.get_metadata())
    names = meta.get("out_sharding")
    if names and names[0] == LAYERS:
        meta["out_sharding"] = tuple(names[1:])
    meta["eager_sharding"] = False
    meta["on_set_value"] = _read_only
    for k in ("hijax", "ref"):
        meta.pop(k, None)
    return type(v)(_take_value(v.get_value(), r), **meta)


def _read_only(var: nnx.Variable, value: Any) -> Any:
    raise ValueError(
        "this variable belongs to a read-only view of one stacked layer (LayerStack.view): setting it would "
        "not change the model; set layer parameters with wuneng_jax.layers.stack.set_per_layer_params"
    )


def _take(tree: Any, r: int | jax.Array) -> Any:
    return jax.tree.map(lambda x: x[r], tree)


class LayerStack(nnx.Module):
    """The decoder layers of a model as scanned groups (module docstring).

    ``layers``: the built layers in order; ``kinds``: a hashable kind per layer (equal kinds, equal
    parameter structure). ``remat``: the per-layer rematerialisation policy applied in the scan body.
    """

    def __init__(self, layers: Sequence[nnx.Module], kinds: Sequence[Hashable], *, remat: str = "none"):
        if len(layers) != len(kinds) or not layers:
            raise ValueError(f"LayerStack: {len(layers)} layers and {len(kinds)} kinds (need as many, >= 1)")
        check_remat("LayerStack.remat", remat)
        self.num_layers = len(layers)
        self.remat = remat
        self.groups = plan_groups(kinds)
        self.blocks = nnx.List(
            [
                nnx.List([stack_modules([layers[i] for i in g.ids(j)]) for j in range(g.period)])
                for g in self.groups
            ]
        )

    def __len__(self) -> int:
        return self.num_layers

    def locate(self, i: int) -> tuple[int, int, int]:
        """``(group, position, repeat)`` of layer ``i``."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for {self.num_layers} layers")
        for g, grp in enumerate(self.groups):
            if i < grp.stop:
                r, j = divmod(i - grp.start, grp.period)
                return g, j, r
        raise AssertionError("unreachable")

    def view(self, i: int) -> nnx.Module:
        """Layer ``i`` as its own module, its parameters sliced out of the stack: a read-only copy (setting
        one of its variables raises; :func:`set_per_layer_params` sets layer parameters)."""
        g, j, r = self.locate(i)
        graphdef, state = nnx.split(self.blocks[g][j])
        is_var = lambda x: isinstance(x, nnx.Variable)
        return nnx.merge(graphdef, jax.tree.map(lambda v: _layer_variable(v, r), state, is_leaf=is_var))

    def views(self) -> Iterator[nnx.Module]:
        """Every layer as :meth:`view` (read-only copies), in order."""
        return (self.view(i) for i in range(self.num_layers))

    # -- caches -------------------------------------------------------------------------------------

    def group_caches(self, per_layer: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
        """Per-layer caches (any pytrees, equal structure per kind) -> the stacked layout of ``__call__``."""
        if len(per_layer) != self.num_layers:
            raise ValueError(f"{len(per_layer)} layer caches for {self.num_layers} layers")
        return tuple(
            tuple(
                jax.tree.map(lambda *xs: jnp.stack(xs), *(per_layer[i] for i in g.ids(j)))
                for j in range(g.period)
            )
            for g in self.groups
        )

    def layer_caches(self, grouped: Sequence[Sequence[Any]]) -> list[Any]:
        """The inverse of :meth:`group_caches` (also turns the stacked ``aux`` of ``__call__`` into a
        per-layer list)."""
        out: list[Any] = [None] * self.num_layers
        for g, grp in enumerate(self.groups):
            for j in range(grp.period):
                for r, i in enumerate(grp.ids(j)):
                    out[i] = _take(grouped[g][j], r)
        return out

    # -- the forward pass -----------------------------------------------------------------------------

    def __call__(
        self,
        step: Step,
        carry: Any,
        caches: Sequence[Sequence[Any]] | None = None,
        *,
        only: frozenset[int] | None = None,
    ) -> tuple[Any, tuple[tuple[Any, ...], ...], tuple[tuple[Any, ...], ...]]:
        """Run every layer in order: ``carry, cache_i, aux_i = step(layer_i, carry, cache_i)``.

        Args:
          step: the model's layer call.
          carry: what flows from layer to layer (e.g. the hidden state ``[B,T,d]``).
          caches: ``None`` (every layer gets ``None``) or the stacked layout of :meth:`group_caches`.
          only: run only the pattern positions whose layers are all in this set (the others are skipped,
            their caches and aux ``None``); for calls without a carried state (teacher-forced layers).
        Returns:
          ``(carry, caches, aux)``: the caches and per-layer ``aux`` outputs in the stacked layout
          (``layer_caches`` gives per-layer lists).
        """
        policy = REMAT_POLICIES[self.remat]
        out_caches, out_aux = [], []
        for g, (grp, blocks) in enumerate(zip(self.groups, self.blocks, strict=True)):
            run = [only is None or set(grp.ids(j)) <= only for j in range(grp.period)]
            if only is not None:
                partial_pos = [j for j in range(grp.period) if not run[j] and set(grp.ids(j)) & only]
                if partial_pos:
                    raise ValueError(
                        f"LayerStack: `only` selects some but not all of layers {grp.ids(partial_pos[0])} "
                        "(one stacked position); select all of them or none"
                    )
            splits = [nnx.split(b) for b in blocks]
            graphdefs = [s[0] for s in splits]
            states = tuple(s[1] if run[j] else None for j, s in enumerate(splits))
            gcache = (None,) * grp.period if caches is None else tuple(caches[g])

            def call(graphdef, state, carry, cache):
                return step(nnx.merge(graphdef, state), carry, cache)

            layer_calls = [
                partial(call, d)
                if policy is None and self.remat == "none"
                else jax.checkpoint(partial(call, d), policy=policy, prevent_cse=grp.repeats == 1)
                for d in graphdefs
            ]

            def body(carry, xs, layer_calls=layer_calls, run=run):
                states, cache = xs
                new_cache, aux = [], []
                for j, fn in enumerate(layer_calls):
                    if not run[j]:
                        new_cache.append(cache[j])
                        aux.append(None)
                        continue
                    carry, c, a = fn(states[j], carry, cache[j])
                    new_cache.append(c)
                    aux.append(a)
                return carry, (tuple(new_cache), tuple(aux))

            if grp.repeats == 1:
                carry, ys = body(carry, _take((states, gcache), 0))
                ys = jax.tree.map(lambda y: y[None], ys)
            else:
                carry, ys = jax.lax.scan(body, carry, (states, gcache))
            out_caches.append(ys[0])
            out_aux.append(ys[1])
        return carry, tuple(out_caches), tuple(out_aux)


# ----------------------------------------------------------------------------------------------------
# Per-layer <-> stacked parameter paths
# ----------------------------------------------------------------------------------------------------

Path = tuple[Any, ...]


def _stack_values(values: Sequence[Any]) -> Any:
    if all(isinstance(v, np.ndarray | np.generic) for v in values):
        return np.stack(values)
    if all(isinstance(v, jax.ShapeDtypeStruct) for v in values):
        return jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
    return jnp.stack(values)


def _take_value(x: Any, r: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[r]


def unstack_flat(
    flat: Mapping[Path, Any], groups: Sequence[Group], prefix: str = "layers"
) -> dict[Path, Any]:
    """``{path: array}`` with stacked paths ``(prefix, "blocks", g, j, *rest)`` -> per-layer paths
    ``(prefix, i, *rest)`` (every other path unchanged). Works on numpy/jax arrays and shape structs."""
    out: dict[Path, Any] = {}
    for path, x in flat.items():
        if len(path) > 3 and path[0] == prefix and path[1] == "blocks":
            g, j, rest = int(path[2]), int(path[3]), tuple(path[4:])
            for r, i in enumerate(groups[g].ids(j)):
                out[(prefix, i, *rest)] = _take_value(x, r)
        else:
            out[tuple(path)] = x
    return out


def stack_flat(flat: Mapping[Path, Any], groups: Sequence[Group], prefix: str = "layers") -> dict[Path, Any]:
    """The inverse of :func:`unstack_flat`: per-layer paths ``(prefix, i, *rest)`` -> stacked paths.
    Raises ValueError naming a layer whose entries are missing or differ from its group's."""
    out: dict[Path, Any] = {}
    per_layer: dict[int, dict[Path, Any]] = {}
    for path, x in flat.items():
        if len(path) > 1 and path[0] == prefix and isinstance(path[1], int | np.integer):
            per_layer.setdefault(int(path[1]), {})[tuple(path[2:])] = x
        else:
            out[tuple(path)] = x
    for g, grp in enumerate(groups):
        for j in range(grp.period):
            ids = grp.ids(j)
            keys = set(per_layer.get(ids[0], {}))
            for i in ids:
                got = set(per_layer.get(i, {}))
                if got != keys:
                    raise ValueError(
                        f"layer {i}: parameters {sorted(map(str, got ^ keys))[:6]} differ from layer {ids[0]}'s "
                        "(layers of one stacked group need the same parameters)"
                    )
            for rest in keys:
                out[(prefix, "blocks", g, j, *rest)] = _stack_values([per_layer[i][rest] for i in ids])
    covered = {i for grp in groups for j in range(grp.period) for i in grp.ids(j)}
    extra = sorted(set(per_layer) - covered)
    if extra:
        raise ValueError(f"per-layer parameters for layers {extra} beyond the model's {len(covered)} layers")
    return out


def _stack_prefixes(model: nnx.Module) -> dict[str, LayerStack]:
    return {name: v for name, v in vars(model).items() if isinstance(v, LayerStack)}


def unstack_model_flat(model: nnx.Module, flat: Mapping[Path, Any]) -> dict[Path, Any]:
    """:func:`unstack_flat` for every :class:`LayerStack` attribute of ``model``."""
    out = dict(flat)
    for prefix, stack in _stack_prefixes(model).items():
        out = unstack_flat(out, stack.groups, prefix)
    return out


def stack_model_flat(model: nnx.Module, flat: Mapping[Path, Any]) -> dict[Path, Any]:
    """:func:`stack_flat` for every :class:`LayerStack` attribute of ``model``."""
    out = dict(flat)
    for prefix, stack in _stack_prefixes(model).items():
        out = stack_flat(out, stack.groups, prefix)
    return out


def layer_paths(model: nnx.Module, path: Path) -> list[Path]:
    """The per-layer paths a parameter path of ``model`` stands for (a stacked path: one per layer)."""
    path = tuple(path)
    stacks = _stack_prefixes(model)
    if len(path) > 3 and path[0] in stacks and path[1] == "blocks":
        g, j = int(path[2]), int(path[3])
        return [(path[0], i, *path[4:]) for i in stacks[path[0]].groups[g].ids(j)]
    return [path]


def per_layer_params(model: nnx.Module) -> dict[Path, Any]:
    """Every parameter value of ``model`` by per-layer path (``("layers", i, "self_attn", ...)``); shape
    structs for an abstract model (``nnx.eval_shape``)."""
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return unstack_model_flat(model, flat)


def set_per_layer_params(
    model: nnx.Module, values: Mapping[Path, Any], dtype: Any = None, *, where: str = "values"
) -> None:
    """Set parameters of ``model`` from per-layer paths, cast to ``dtype`` (default: each parameter's own)
    and placed with each parameter's sharding. A subset is fine: the other layers of a stacked group keep their values (an
    abstract model needs every layer of a group). Shapes are checked; ``where`` names the source in errors."""
    from wuneng_jax.layers.params import place

    stacks = _stack_prefixes(model)
    current = per_layer_params(model)
    touched: dict[Path, list[Path]] = {}  # stacked path -> its per-layer paths
    for path, value in values.items():
        path = tuple(path)
        if path not in current:
            raise ValueError(f"{where}: the model has no parameter {'.'.join(map(str, path))}")
        want = tuple(current[path].shape)
        if tuple(np.shape(value)) != want:
            raise ValueError(
                f"{where}: {'.'.join(map(str, path))} has shape {tuple(np.shape(value))}, expected {want}"
            )
        if path[0] in stacks and isinstance(path[1], int | np.integer):
            stack = stacks[path[0]]
            g, j, _ = stack.locate(int(path[1]))
            spath = (path[0], "blocks", g, j, *path[2:])
            touched[spath] = [(path[0], i, *path[2:]) for i in stack.groups[g].ids(j)]
        else:
            touched[path] = [path]
    flat_vars = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for spath, sources in touched.items():
        parts = [values[p] if p in values else current[p] for p in sources]
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in parts):
            missing = [".".join(map(str, p)) for p in sources if p not in values]
            raise ValueError(f"{where}: {missing[:3]} not given (an abstract model must be set whole)")
        var = flat_vars[spath]
        if len(sources) == 1 and spath == sources[0]:
            value = parts[0]
        else:
            value = _stack_values([np.asarray(x) if not isinstance(x, jax.Array) else x for x in parts])
        var.set_value(place(value, var, var.get_value().dtype if dtype is None else dtype))


__all__ = [
    "Group",
    "LayerStack",
    "layer_paths",
    "per_layer_params",
    "plan_groups",
    "set_per_layer_params",
    "stack_flat",
    "stack_model_flat",
    "stack_modules",
    "unstack_flat",
    "unstack_model_flat",
]

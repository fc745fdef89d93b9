"""Model configs: the family registry, YAML loading, presets.

Each family's config is a frozen dataclass living with its model (``Qwen2Config`` in
``wuneng_jax/models/qwen2.py`` ...). A family module registers itself at import time with one line::

    register_family("qwen2", Qwen2Config, Qwen2)          # name, config class, model class / builder
    register_preset("qwen2.5-0.5b", Qwen2Config(...))     # optional named configs

Family modules are imported lazily by name (``wuneng_jax.models.<family>``), so ``load_model_config``,
``preset`` and ``build_model`` find a family without anyone importing it first.

A YAML model config is a mapping with a ``family:`` key plus that family's fields, optionally starting
from a preset (``preset: qwen2.5-0.5b`` then overrides)::

    family: qwen2
    preset: qwen2.5-0.5b
    dtype: bfloat16
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from wuneng_jax.files import read_yaml

FAMILY_MODULES: dict[str, str] = {
    "qwen2": "wuneng_jax.models.qwen2",
    "rwkv7": "wuneng_jax.models.rwkv7",
    "wuneng": "wuneng_jax.models.wuneng",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered model family: its config dataclass and ``model_cls(cfg, *, rngs) -> nnx.Module``."""

    name: str
    config_cls: type
    model_cls: Callable[..., Any]


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Any] = {}


def register_family(name: str, config_cls: type, model_cls: Callable[..., Any]) -> None:
    """Register a family (call once, at the bottom of the family's module)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_family({name!r}): {config_cls} is not a dataclass")
    old = _FAMILIES.get(name)
    if old is not None and (old.config_cls.__qualname__, old.model_cls.__qualname__) != (
        config_cls.__qualname__,
        model_cls.__qualname__,
    ):
        raise ValueError(f"family {name!r} is already registered with {old.config_cls.__qualname__}")
    _FAMILIES[name] = Family(name, config_cls, model_cls)


def register_preset(name: str, cfg: Any) -> None:
    """Register a named config instance of a registered family."""
    family_of(cfg)  # raises for an unregistered config class
    _PRESETS[name] = cfg


def _import_family_module(name: str) -> bool:
    module = FAMILY_MODULES.get(name, f"wuneng_jax.models.{name}")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return False
        raise
    return True


def get_family(name: str) -> Family:
    """The registered family ``name``, importing ``wuneng_jax.models.<name>`` on first use."""
    if name not in _FAMILIES:
        _import_family_module(name)
    if name not in _FAMILIES:
        known = sorted(set(FAMILY_MODULES) | set(_FAMILIES))
        raise ValueError(f"unknown model family {name!r}; known families: {known}")
    return _FAMILIES[name]


def family_of(cfg: Any) -> str:
    """The family name of a config instance (by its class)."""
    for fam in _FAMILIES.values():
        if type(cfg) is fam.config_cls:
            return fam.name
    raise ValueError(f"{type(cfg).__qualname__} is not a registered model config class")


def _load_all_families() -> None:
    for name in FAMILY_MODULES:
        if name not in _FAMILIES:
            _import_family_module(name)


def list_presets() -> list[str]:
    """Names of all registered presets (importing every known family module)."""
    _load_all_families()
    return sorted(_PRESETS)


def preset(name: str) -> Any:
    """The preset config ``name`` (e.g. ``"qwen2_tiny"``, ``"qwen2.5-0.5b"``)."""
    for fam in FAMILY_MODULES:  # import family modules only until the preset is found
        if name in _PRESETS:
            break
        if fam not in _FAMILIES:
            _import_family_module(fam)
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(_PRESETS)}")
    return _PRESETS[name]


# ----------------------------------------------------------------------------------------------
# dict / YAML <-> config


def _coerce(cls_name: str, key: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value against a field annotation; ValueError naming the field."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"{cls_name}.{key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad(" or ".join(getattr(a, "__name__", str(a)) for a in args))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(cls_name, key, value, a)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise bad("a list")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(cls_name, key, v, elem) for v in value) if origin is tuple else list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e6" (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                raise bad("a number") from None
            if math.isfinite(out):
                return out
        raise bad("a number")
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """Build and validate a config from a mapping with a ``family`` key (and optional ``preset``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a model config must be a mapping, got {type(d).__name__}")
    d = dict(d)
    if "family" not in d:
        raise ValueError(f"model config has no 'family' key; add one of {sorted(FAMILY_MODULES)}")
    fam = get_family(d.pop("family"))
    base: dict[str, Any] = {}
    if "preset" in d:
        p = preset(d.pop("preset"))
        if type(p) is not fam.config_cls:
            raise ValueError(f"preset belongs to family {family_of(p)!r}, not {fam.name!r}")
        base = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}
    fields = {f.name: f for f in dataclasses.fields(fam.config_cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} for model family {fam.name!r}; valid keys: ['family', 'preset'] + "
            f"{sorted(fields)}"
        )
    hints = typing.get_type_hints(fam.config_cls)
    kwargs = dict(base)
    for key, value in d.items():
        kwargs[key] = _coerce(fam.config_cls.__name__, key, value, hints[key])
    missing = sorted(
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"model family {fam.name!r}: missing required key(s) {missing}")
    cfg = fam.config_cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_model_config(source: str | Path | Mapping[str, Any]) -> Any:
    """A validated model config from a YAML file path, a mapping, or a preset name."""
    if isinstance(source, Mapping):
        return config_from_dict(source)
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and source in list_presets():
            return preset(source)
        raise FileNotFoundError(f"model config {str(source)!r}: no such file (and not a preset name)")
    data = read_yaml(path)
    try:
        return config_from_dict(data if data is not None else {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``{"family": ..., **fields}`` (tuples as lists), the inverse of ``config_from_dict``."""
    out: dict[str, Any] = {"family": family_of(cfg)}
    for f in dataclasses.fields(cfg):
        if f.init:
            v = getattr(cfg, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def save_model_config(cfg: Any, path: str | Path) -> None:
    """Write ``config_to_dict(cfg)`` as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def count_params(cfg: Any) -> int:
    """Total number of parameters of ``build_model(cfg)``, from shapes only (no allocation)."""
    from wuneng_jax.models import count_params as _count

    return _count(cfg)

"""Model configs from YAML files, mappings and preset names (and back).

Each family's config is a frozen dataclass living with its model (``Qwen2Config`` in
``wuneng_jax/models/qwen2.py`` ...), registered in :mod:`wuneng_jax.models.registry` with its presets. This
module reads and writes them; it re-exports the registry's look-ups (``preset``, ``family_of`` ...) as the
one place callers get model configs from.

A YAML model config is a mapping with a ``family:`` key plus that family's fields, optionally starting
from a preset (``preset: qwen2.5-0.5b`` then overrides)::

    family: qwen2
    preset: qwen2.5-0.5b
    dtype: bfloat16
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from wuneng_jax.coerce import CoercionError, coerce
from wuneng_jax.files import read_yaml
from wuneng_jax.models import count_params
from wuneng_jax.models.registry import FAMILY_MODULES, family_of, get_family, list_presets, preset

__all__ = [
    "FAMILY_MODULES",
    "CoercionError",
    "coerce",
    "config_from_dict",
    "config_to_dict",
    "count_params",
    "family_of",
    "get_family",
    "list_presets",
    "load_model_config",
    "preset",
    "save_model_config",
]

# ----------------------------------------------------------------------------------------------
# dict / YAML <-> config


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
        kwargs[key] = coerce(hints[key], value, f"{fam.config_cls.__name__}.{key}")
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

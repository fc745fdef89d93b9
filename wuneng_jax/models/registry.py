"""The model-family registry: each family's config class and model class, and named presets.

A family module (``wuneng_jax/models/<family>.py``) registers itself at import time::

    register_family("qwen2", Qwen2Config, Qwen2)          # name, config class, model class / builder
    register_preset("qwen2.5-0.5b", Qwen2Config(...))     # optional named configs

Family modules are imported lazily by name (:data:`FAMILY_MODULES`), so :func:`get_family`,
:func:`preset` and ``build_model`` find a family without anyone importing it first. YAML loading of
model configs (``wuneng_jax.config``) builds on this module; nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

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

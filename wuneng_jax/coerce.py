"""The one YAML value coercer of model configs (:mod:`wuneng_jax.config`) and training configs
(``train.config``): a value read from YAML or a command-line override, checked and converted against its
dataclass field annotation, or an error naming the field and what was expected."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

__all__ = ["CoercionError", "coerce"]


class CoercionError(ValueError):
    """A YAML value does not fit its field: ``field`` (dotted name) and ``problem`` ("expected ..., got ...")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def coerce(
    tp: Any,
    value: Any,
    field: str,
    *,
    integral_floats: bool = False,
    nested: typing.Callable[[Any, Any, str], Any] | None = None,
) -> Any:
    """Check/convert one YAML value against a field annotation (the one coercer of model and training
    configs); :class:`CoercionError` naming ``field`` otherwise.

    Handles ``X | None`` / unions (first member that fits), ``Literal``, ``tuple[X, ...]`` (a lone string
    for ``tuple[str, ...]`` is a one-element tuple), ``list``, ``bool``, ``int`` (integral floats such as
    ``1.0e+4`` only with ``integral_floats``), ``float`` (also from strings such as ``"1e-3"``, which YAML
    1.1 reads as strings; never NaN/inf), ``str``; dataclass annotations go to ``nested(tp, value, field)``.
    """

    def bad(expected: str) -> CoercionError:
        return CoercionError(field, f"expected {expected}, got {value!r} ({type(value).__name__})")

    sub = lambda t, v, f=field: coerce(t, v, f, integral_floats=integral_floats, nested=nested)  # noqa: E731
    origin = typing.get_origin(tp)
    if nested is not None and dataclasses.is_dataclass(tp):
        return nested(tp, value, field)
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
                return sub(a, value)
            except CoercionError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if origin is tuple and isinstance(value, str) and args == (str, Ellipsis):
            return (value,)  # `data.prepare=stdlib` means [stdlib]
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if origin is list:
            return list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(sub(elem, v, f"{field}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true/false")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if integral_floats and isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, int | float):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad("a number") from None
        else:
            raise bad("a number")
        if not math.isfinite(out):
            raise bad("a finite number")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value

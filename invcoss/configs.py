"""Configuration dataclasses to and from their JSON form: the one ``from_dict`` of invcoss.

Every configuration (``MAEConfig``, ``GeneratorConfig``, ``PreprocessConfig``,
``InversionConfig``, ``ContinualConfig``) is a frozen dataclass written to JSON with
:func:`dataclasses.asdict`; :func:`config_from_dict` reads it back: JSON lists become tuples
(recursively, so nested pairs survive the round trip), a key the class does not know is an
error that names it, never silently dropped, and a value of the wrong type (``"12"`` for an ``int``,
``"abc"`` for a ``float``) is an error that names the field, the type it needs and the value it got
(:func:`check_field_types`), before the class's own checks compare it with anything.

Example:
    >>> import json
    >>> from invcoss.models import GeneratorConfig
    >>> c = GeneratorConfig(ndim=2, out_size=(32, 32))
    >>> config_from_dict(GeneratorConfig, json.loads(json.dumps(dataclasses.asdict(c)))) == c
    True
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["ConfigTypeError", "check_field_types", "config_from_dict"]

C = TypeVar("C")


class ConfigTypeError(TypeError, ValueError):
    """A configuration value of the wrong type.

    A ``TypeError``, and also a ``ValueError`` because the value usually comes from a file (a
    checkpoint's ``config.json``, a run's ``continual.json``, a cache manifest) or the command line,
    whose readers report a bad value as ``ValueError`` (as ``numpy.exceptions.AxisError`` is both an
    ``IndexError`` and a ``ValueError``).
    """


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (after the list-to-tuple step) is of the annotated type ``hint``; an
    annotation this check does not model (a class, ``object``, ``Any``) accepts anything."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 2.0 as 2.0, but a hand-edited file or --set may say 2
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, h) for v, h in zip(value, args))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return True


def check_field_types(config_class: type, values: Mapping[str, Any], where: str | None = None) -> None:
    """Check that each value has its field's annotated type (lists are read as tuples).

    Args:
        config_class: a dataclass.
        values: field name to value, e.g. read from JSON or given on the command line.
        where: how the fields are named in the message (default: ``ClassName.field``), e.g. ``--set``.

    Raises:
        ConfigTypeError: (a ``TypeError`` and a ``ValueError``) naming the field, the type it needs
            and the value received, e.g. ``MAEConfig.depth expects int, got '12' (str)``.

    Example:
        >>> from invcoss.models import MAEConfig
        >>> check_field_types(MAEConfig, {"depth": 4, "img_size_2d": [32, 32]})
        >>> try:
        ...     check_field_types(MAEConfig, {"depth": "4"})
        ... except ConfigTypeError as e:
        ...     print(e)
        MAEConfig.depth expects int, got '4' (str)
    """
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _fits(_tuples(value), hint):
            label = f"{where} {name}" if where else f"{config_class.__name__}.{name}"
            raise ConfigTypeError(
                f"{label} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})"
            )


def config_from_dict(config_class: type[C], values: Mapping[str, Any]) -> C:
    """Rebuild ``config_class`` from its JSON form, refusing keys the class does not know and values
    of the wrong type.

    Raises:
        ValueError: a key that is not a field of ``config_class`` (the message lists the fields), or
            ``values`` that is not a mapping.
        ConfigTypeError: a value of the wrong type (:func:`check_field_types`).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{config_class.__name__} is read from a JSON object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    check_field_types(config_class, values)
    return config_class(**{k: _tuples(v) for k, v in values.items()})

"""Configuration dataclasses to and from their JSON form: the one ``from_dict`` of invcoss.

Every configuration (``MAEConfig``, ``GeneratorConfig``, ``PreprocessConfig``,
``InversionConfig``, ``ContinualConfig``) is a frozen dataclass written to JSON with
:func:`dataclasses.asdict`; :func:`config_from_dict` reads it back: JSON lists become tuples
(recursively, so nested pairs survive the round trip) and a key the class does not know is an
error that names it, never silently dropped.

Example:
    >>> import json
    >>> from invcoss.models import GeneratorConfig
    >>> c = GeneratorConfig(ndim=2, out_size=(32, 32))
    >>> config_from_dict(GeneratorConfig, json.loads(json.dumps(dataclasses.asdict(c)))) == c
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["config_from_dict"]

C = TypeVar("C")


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_dict(config_class: type[C], values: Mapping[str, Any]) -> C:
    """Rebuild ``config_class`` from its JSON form, refusing keys the class does not know.

    Raises:
        ValueError: a key that is not a field of ``config_class`` (the message lists the fields).
    """
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    return config_class(**{k: _tuples(v) for k, v in values.items()})

"""Checkpoints as a directory: ``model.safetensors`` (weights) and ``config.json`` (architecture).

No pickle anywhere: the weights are safetensors, the configuration is the model's config dataclass
as JSON, under ``{"model_type": <class name>, "format_version": 1, "config": {...}}``. The same JSON
is also stored in the safetensors metadata, so a directory whose two files come from different saves
is detected on load. Both files are written to a temporary name in the target directory, flushed to
disk and renamed over the final name, so an interrupted save never leaves a half-written file.

Two ways to load:

* ``Model.from_pretrained(dir)`` builds the model the checkpoint describes. With ``expect=`` (a
  config, or a preset name for :class:`~invcoss.models.MAE`) it first checks that the checkpoint
  is that architecture.
* :func:`load_pretrained_into` loads into a model you built. ``strict=True`` requires the whole
  config to match; ``strict=False`` only the fields that decide the weights' shapes (so an MAE can be
  loaded at another input size, its position tables being rebuilt, not stored).

Every mismatch raises ``ValueError`` naming each field that differs, with both values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from torch import nn

from invcoss.configs import config_from_dict
from invcoss.data.atomic import atomic_write_file, atomic_write_safetensors

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "config_differences",
    "config_from_dict",
    "load_pretrained_into",
    "read_checkpoint_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

C = TypeVar("C")
M = TypeVar("M", bound="PretrainedMixin")


def config_differences(
    saved: Any, current: Any, ignore: tuple[str, ...] = (), labels: tuple[str, str] = ("checkpoint", "model")
) -> list[str]:
    """The fields where two configs of one class differ, as ``"name: checkpoint A, model B"``.

    Example:
        >>> from invcoss.models import GeneratorConfig
        >>> config_differences(GeneratorConfig(ndim=2), GeneratorConfig(ndim=2, latent_dim=64))
        ['latent_dim: checkpoint 128, model 64']
    """
    rows = []
    for f in dataclasses.fields(current):
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name not in ignore and a != b:
            rows.append(f"{f.name}: {labels[0]} {a!r}, {labels[1]} {b!r}")
    return rows


def _read_header(directory: Path) -> dict[str, Any]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint directory {directory} has no {path.name}")
    with open(config_path, encoding="utf-8") as f:
        header = json.load(f)
    if not isinstance(header, dict) or not {"model_type", "config"} <= set(header):
        raise ValueError(f"{config_path} is not an invcoss checkpoint config (needs model_type and config)")
    return header


def read_checkpoint_config(directory: str | os.PathLike, config_class: type[C]) -> tuple[str, C]:
    """``(model_type, config)`` of a checkpoint directory, without loading its weights."""
    header = _read_header(Path(directory))
    return header["model_type"], config_from_dict(config_class, header["config"])


def _load_state(directory: Path, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_NAME
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        stored = (f.metadata() or {}).get("config")
        state = {k: f.get_tensor(k) for k in f.keys()}
    if stored is not None and json.loads(stored) != header["config"]:
        raise ValueError(
            f"{weights_path} was saved with a different config than {directory / CONFIG_NAME}; "
            "the directory mixes two checkpoints"
        )
    return state


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], directory: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {directory} do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )


def load_pretrained_into(model: PretrainedMixin, directory: str | os.PathLike, strict: bool = True) -> None:
    """Load a checkpoint directory into an existing model, in place.

    Args:
        model: an MAE, InvUNet or BottomUpGenerator (anything with :class:`PretrainedMixin`).
        directory: what ``save_pretrained`` wrote.
        strict: require the whole config to match; with ``False`` fields listed in the config
            class's ``runtime_fields`` (those that do not change any weight's shape, e.g. the MAE's
            input sizes and ``norm_pix_loss``) may differ and the model keeps its own.

    Raises:
        ValueError: other model type, or a config field that differs (each one named), or weights
            that do not fit the model.
        FileNotFoundError: a file of the checkpoint is missing.

    Example:
        >>> import tempfile
        >>> from invcoss.models import create_model
        >>> a = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
        >>> b = create_model("vit_nano", img_size_2d=64, img_size_3d=(16, 32, 32))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = a.save_pretrained(d)
        ...     load_pretrained_into(b, d, strict=False)
        >>> bool((a.cls_token == b.cls_token).all())
        True
    """
    directory = Path(directory)
    header = _read_header(directory)
    kind = type(model).__name__
    if header["model_type"] != kind:
        raise ValueError(f"checkpoint {directory} holds a {header['model_type']}, not a {kind}")
    saved = config_from_dict(type(model.config), header["config"])
    ignore = () if strict else type(model.config).runtime_fields
    diffs = config_differences(saved, model.config, ignore=ignore)
    if diffs:
        raise ValueError(f"checkpoint {directory} does not match this {kind}: " + "; ".join(diffs))
    state = _load_state(directory, header)
    _check_state(model, state, directory)
    model.load_state_dict(state, strict=True)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a module whose ``config`` is a frozen dataclass.

    A class using it sets ``config`` in ``__init__`` and ``config_class``; its config class declares
    ``runtime_fields`` (see :func:`load_pretrained_into`). ``from_config`` passes the config's fields
    as keyword arguments; a class whose constructor takes the config itself overrides it.
    """

    config: Any
    config_class: ClassVar[type]

    @classmethod
    def from_config(cls: type[M], config: Any) -> M:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @classmethod
    def _resolve_expected(cls, expect: Any) -> Any:
        if not isinstance(expect, cls.config_class):
            raise TypeError(f"expect must be a {cls.config_class.__name__}, got {type(expect).__name__}")
        return expect

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Returns:
            the directory, as a ``Path``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        header = {"model_type": type(self).__name__, "format_version": FORMAT_VERSION, "config": config}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "model_type": header["model_type"], "config": json.dumps(config)}
        atomic_write_safetensors(directory / WEIGHTS_NAME, state, metadata)

        def write_json(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(header, f, indent=2, sort_keys=True)
                f.write("\n")

        atomic_write_file(directory / CONFIG_NAME, write_json)
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, expect: Any = None) -> M:
        """Build the model a checkpoint directory describes and load its weights (on CPU).

        Args:
            directory: what ``save_pretrained`` wrote.
            expect: optional config (or, for MAE, a preset name) the checkpoint must match in
                every field that shapes the weights; a mismatch raises ``ValueError``.
        """
        directory = Path(directory)
        header = _read_header(directory)
        if header["model_type"] != cls.__name__:
            raise ValueError(f"checkpoint {directory} holds a {header['model_type']}, not a {cls.__name__}")
        saved = config_from_dict(cls.config_class, header["config"])
        if expect is not None:
            wanted = cls._resolve_expected(expect)
            ignore = cls.config_class.runtime_fields
            diffs = config_differences(saved, wanted, ignore=ignore, labels=("checkpoint", "expected"))
            if diffs:
                raise ValueError(
                    f"checkpoint {directory} is not the expected {cls.__name__}: " + "; ".join(diffs)
                )
        # Its random initialisation is overwritten at once: draw it from a forked generator, so that
        # loading a checkpoint leaves the caller's random stream where it was.
        with torch.random.fork_rng(devices=[]):
            model = cls.from_config(saved)
        load_pretrained_into(model, directory, strict=True)
        return model

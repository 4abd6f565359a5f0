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

A checkpoint is validated before a model is built from it (:func:`validate_checkpoint`): the
config's values have their fields' types; the safetensors header is read on its own (8-byte length,
JSON, every tensor's dtype, shape and byte range inside the file, the ranges covering the data
exactly), so a truncated or corrupt file is a ``ValueError`` naming it; the header's config equals
``config.json``; and the parameter shapes the config implies (computed on the ``meta`` device, which
allocates nothing) equal the stored ones, with a floating dtype where the model has one. An edited
``config.json`` therefore cannot make the loader allocate a model larger than its weights file.

:func:`checkpoint_weights_hash` is :func:`invcoss.models.weights.weights_hash` of the weights a
checkpoint directory holds, as loaded; feature statistics record that hash
(:mod:`invcoss.feature_stats`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from invcoss.configs import config_from_dict
from invcoss.data.atomic import atomic_write_file, atomic_write_safetensors
from invcoss.models.hub import hub_snapshot, looks_like_repo_id
from invcoss.models.weights import FLOATING_DTYPES, TORCH_DTYPE_NAMES, read_safetensors_header, weights_hash

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "checkpoint_weights_hash",
    "config_differences",
    "config_from_dict",
    "load_pretrained_into",
    "read_checkpoint_config",
    "validate_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# Tables derived from the config and not stored (the MAE's sin-cos position tables): a config whose
# tables exceed both this and the weights file's size is refused as edited or corrupt.
MAX_DERIVED_BYTES = 1 << 30

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


def checkpoint_weights_hash(directory: str | os.PathLike) -> str:
    """:func:`weights_hash` of a checkpoint's weights as ``from_pretrained`` loads them (floating
    tensors as float32), so it equals the hash of the loaded model; the files are checked first
    (:func:`~invcoss.models.weights.read_safetensors_header`)."""
    directory = Path(directory)
    _read_header(directory)
    read_safetensors_header(directory / WEIGHTS_NAME)
    state = _read_tensors(directory / WEIGHTS_NAME)
    return weights_hash({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def _read_header(directory: Path) -> dict[str, Any]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint directory {directory} has no {path.name}")
    try:
        with open(config_path, encoding="utf-8") as f:
            header = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if (
        not isinstance(header, dict)
        or not {"model_type", "config"} <= set(header)
        or not isinstance(header["config"], dict)
    ):
        raise ValueError(f"{config_path} is not an invcoss checkpoint config (needs model_type and config)")
    return header


def _config(config_class: type[C], header: dict[str, Any], directory: Path) -> C:
    """The checkpoint's config; a wrongly typed or invalid value is a ``ValueError`` naming the file."""
    try:
        return config_from_dict(config_class, header["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None


def validate_checkpoint(directory: str | os.PathLike, cls: type[PretrainedMixin]) -> Any:
    """Check a checkpoint directory before a model of class ``cls`` is built from it; its config.

    Checks, in this order and without allocating the model: ``config.json`` is JSON of a ``cls``
    with correctly typed values; ``model.safetensors`` is whole
    (:func:`~invcoss.models.weights.read_safetensors_header`) and was saved with the same config;
    every parameter and buffer the config implies (the model built on the ``meta`` device) is
    stored with that shape and a compatible dtype, none is missing or extra; the tables the config
    derives (not stored) are not larger than the weights and 1 GiB.

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        ValueError: anything else, naming the file and what differs.
    """
    directory = Path(directory)
    model_type, config_class = cls.__name__, cls.config_class
    header = _read_header(directory)
    if header["model_type"] != model_type:
        raise ValueError(f"checkpoint {directory} holds a {header['model_type']}, not a {model_type}")
    config = _config(config_class, header, directory)
    weights_path = directory / WEIGHTS_NAME
    stored, metadata = read_safetensors_header(weights_path)
    saved_with = metadata.get("config")
    if saved_with is not None:
        try:
            same = json.loads(saved_with) == header["config"]
        except json.JSONDecodeError:
            same = False
        if not same:
            raise ValueError(
                f"{weights_path} was saved with a different config than {directory / CONFIG_NAME}; "
                "the directory mixes two checkpoints or config.json was edited"
            )
    with torch.device("meta"):
        try:
            meta = cls.from_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{directory / CONFIG_NAME} does not describe a {model_type}: {e}") from None
    own = meta.state_dict()
    try:
        _check_shapes(
            {k: v.shape for k, v in own.items()}, {k: v[1] for k, v in stored.items()}, model_type, directory
        )
    except ValueError as e:
        implied = sum(t.numel() for t in own.values()) * 4
        raise ValueError(
            f"{e}; {directory / CONFIG_NAME} implies {implied / 2**20:.1f} MiB of float32 weights, "
            f"{weights_path} holds {weights_path.stat().st_size / 2**20:.1f} MiB"
        ) from None
    dtypes = [
        f"{k}: checkpoint {stored[k][0]}, model {own[k].dtype}"
        for k in sorted(own)
        if (stored[k][0] in FLOATING_DTYPES) != own[k].dtype.is_floating_point
        or (not own[k].dtype.is_floating_point and stored[k][0] != TORCH_DTYPE_NAMES.get(own[k].dtype))
    ]
    if dtypes:
        raise ValueError(f"weights in {directory} have the wrong dtype for {model_type}: {dtypes[:5]}")
    derived = sum(b.numel() * b.element_size() for n, b in meta.named_buffers() if n not in own)
    if derived > max(MAX_DERIVED_BYTES, weights_path.stat().st_size):
        raise ValueError(
            f"{directory / CONFIG_NAME} implies {derived / 2**30:.1f} GiB of derived tables (input sizes "
            f"{[getattr(config, f) for f in config_class.runtime_fields if f.startswith('img_size')]}) for "
            f"{weights_path.stat().st_size / 2**20:.1f} MiB of weights; the config was edited or is corrupt"
        )
    return config


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"cannot read {weights_path}: {e}") from None


def read_checkpoint_config(directory: str | os.PathLike, config_class: type[C]) -> tuple[str, C]:
    """``(model_type, config)`` of a checkpoint directory, without loading its weights."""
    directory = Path(directory)
    header = _read_header(directory)
    return header["model_type"], _config(config_class, header, directory)


def _check_shapes(own: Mapping[str, Any], stored: Mapping[str, Any], kind: str, directory: Path) -> None:
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(stored[k])}, model {tuple(own[k])}"
        for k in sorted(set(own) & set(stored))
        if tuple(stored[k]) != tuple(own[k])
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {directory} do not fit {kind}: missing {missing[:5]}, "
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
    kind = type(model).__name__
    saved = validate_checkpoint(directory, type(model))
    ignore = () if strict else type(model.config).runtime_fields
    diffs = config_differences(saved, model.config, ignore=ignore)
    if diffs:
        raise ValueError(f"checkpoint {directory} does not match this {kind}: " + "; ".join(diffs))
    state = _read_tensors(directory / WEIGHTS_NAME)
    _check_shapes(
        {k: v.shape for k, v in model.state_dict().items()},
        {k: v.shape for k, v in state.items()},
        kind,
        directory,
    )
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
    def from_pretrained(
        cls: type[M],
        directory: str | os.PathLike,
        expect: Any = None,
        cache_dir: str | os.PathLike | None = None,
        allow_download: bool = False,
    ) -> M:
        """Build the model a checkpoint directory describes and load its weights (on CPU).

        Args:
            directory: what ``save_pretrained`` wrote, or the id (``owner/name``) of a Hugging Face
                Hub repository holding those two files, read from the local Hub cache
                (:func:`invcoss.models.hub.hub_snapshot`; needs ``huggingface_hub``). A local path
                wins over a repository id of the same spelling.
            expect: optional config (or, for MAE, a preset name) the checkpoint must match in
                every field that shapes the weights; a mismatch raises ``ValueError``.
            cache_dir: the Hub cache to read instead of the default (``HF_HOME`` / ``HF_HUB_CACHE``).
            allow_download: fetch a repository's files that are not cached (never with
                ``HF_HUB_OFFLINE=1``); by default nothing is downloaded.

        Raises:
            FileNotFoundError: a file of the checkpoint is missing, or not in the Hub cache.
            ValueError: the checkpoint fails :func:`validate_checkpoint` or ``expect``.
        """
        if looks_like_repo_id(directory):
            try:
                directory = hub_snapshot(
                    str(directory), [CONFIG_NAME, WEIGHTS_NAME], cache_dir, allow_download
                )
            except (ImportError, FileNotFoundError) as e:
                raise FileNotFoundError(f"no checkpoint directory {directory}, and {e}") from None
        directory = Path(directory)
        # Everything about the files is checked before the model is allocated.
        saved = validate_checkpoint(directory, cls)
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

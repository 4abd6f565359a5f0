"""``--config FILE``: run ``pretrain``, ``continual`` or ``invert`` again with the settings a run saved.

FILE is what the run wrote (``pretrain.json``, ``continual.json``, the inversion's
``manifest.json``) or the run folder holding it. Its settings become the command's defaults
(click's ``default_map``); an option given on the command line or by its ``INVCOSS_`` environment
variable overrides its value. Settings the command has no option for (``PretrainConfig.mask_ratio``,
``ContinualConfig.warmup_epochs``, ``InversionConfig.alpha_img``, ...) are taken from the file too,
through :func:`saved_fields`, so the replayed configuration equals the saved one field for field.

What is replayed: every field of the saved configuration, the model preset and input size, the
seed and the CPU thread count (``compute.threads``); for ``invert`` also the checkpoint and
statistics files, ``--num-samples``, ``--format``, ``--backend`` and ``--reference``. What is not:
``--out`` (a new folder), ``--device`` (the machine's) and, for ``pretrain`` and ``continual``,
``--data`` (the saved files do not record where the data was).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from click.core import ParameterSource

from invcoss.cli.options import UserError

_FILES = {"pretrain": "pretrain.json", "continual": "continual.json", "invert": "manifest.json"}
_META = "invcoss.replay"


def _pretrain_defaults(saved: dict) -> dict:
    p = saved["pretrain"]
    out = {k: p[k] for k in ("epochs", "batch_size", "lr", "warmup_epochs", "seed") if k in p}
    out["preset"] = saved["model"]["name"]
    if saved.get("modality"):
        out["modality"] = saved["modality"]
    return out


def _continual_defaults(saved: dict) -> dict:
    c = saved["config"]
    out = {k: c[k] for k in ("method", "profile", "preset", "seed") if k in c}
    out["order"] = ",".join(c["order"])
    return out


def _invert_defaults(saved: dict) -> dict:
    c = saved["identity"]["config"]
    sources = saved.get("sources", {})
    out = {
        "modality": c["modality"],
        "profile": c["profile"],
        "seed": c["seed"],
        "generator": c["generator"],
        "batch_size": c["batch_size"],
        "steps": c["steps"],
        "warmup_steps": c["warmup_steps"],
        "num_samples": saved["identity"]["num_samples"],
        "sample_format": saved.get("sample_format"),
    }
    model = sources.get("model", "")
    if model and not model.startswith("packaged "):
        out["checkpoint"] = model
    if sources.get("stats"):
        out["stats_path"] = sources["stats"]
    if sources.get("reference"):
        out["reference"] = sources["reference"]
    if saved.get("backend") not in (None, "default"):
        out["backend"] = saved["backend"]
    return out


_DEFAULTS: dict[str, Callable[[dict], dict]] = {
    "pretrain": _pretrain_defaults,
    "continual": _continual_defaults,
    "invert": _invert_defaults,
}


def read_saved(path: Path, command: str) -> dict:
    """The saved run of ``command`` in ``path`` (its file, or the run folder holding it).

    Raises:
        UserError: no such file, not JSON, or not what ``command`` saves.
    """
    name = _FILES[command]
    file = path / name if path.is_dir() else path
    try:
        saved = json.loads(file.read_text())
    except OSError as e:
        raise UserError(f"--config {path}: cannot read {file} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config {file}: not JSON ({e})") from None
    try:
        _DEFAULTS[command](saved)
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            f"--config {file} is not a configuration {command} saved; give the {name} of a {command} run "
            "or its folder"
        ) from None
    return saved


def config_option(command: str) -> Callable:
    """``--config FILE`` for ``command`` (``pretrain``, ``continual`` or ``invert``)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> dict | None:
        if value is None:
            return None
        saved = read_saved(value, command)
        defaults = dict(_DEFAULTS[command](saved))
        threads = (saved.get("compute") or {}).get("threads")
        if threads is not None:
            defaults["threads"] = threads
        ctx.default_map = {**defaults, **(ctx.default_map or {})}
        ctx.meta[_META] = saved
        return saved

    return click.option(
        "--config",
        "replay",
        type=click.Path(exists=False, path_type=Path),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=callback,
        metavar="FILE",
        help=f"Replay a run: its {_FILES[command]} (or the run folder) gives the defaults; options given "
        "here override them. See docs/cli.md.",
    )


def saved_run() -> dict | None:
    """The saved run ``--config`` read for the current command (None without ``--config``)."""
    return click.get_current_context().meta.get(_META)


def explicit(names: Iterable[str]) -> set[str]:
    """Of the current command's parameters ``names``, those given on the command line or by their
    environment variable (not defaults, not ``--config``)."""
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {n for n in names if ctx.get_parameter_source(n) in given}


def saved_fields(section: dict, given: dict, exclude: Iterable[str] = ()) -> dict:
    """``section`` (a saved configuration's fields) with ``given`` (this run's values) on top.

    Example:
        >>> saved_fields({"epochs": 4, "mask_ratio": 0.5, "name": "x"}, {"epochs": 2}, exclude=["name"])
        {'epochs': 2, 'mask_ratio': 0.5}
    """
    skip = set(exclude)
    return {k: v for k, v in {**section, **given}.items() if k not in skip}

"""What the commands share, declared once: the user-error type, ``--modality``, ``--device``,
``--threads`` and the progress bar.

- :data:`MODALITY` takes every name of the modality registry (:mod:`invcoss.modality`), aliases
  included and in any case, and hands the command the canonical name: ``--modality path`` and
  ``--modality Pathology`` both arrive as ``"pathology"``.
- :func:`device_option` validates ``--device`` once, for every command, with
  :func:`resolve_device`: the command receives a ``torch.device`` (CUDA when available by default),
  and a name torch does not know, or CUDA on a machine without it, is a user error.
- :func:`threads_option` applies ``--threads`` to torch before the command runs; the command runs
  its work inside :func:`invcoss.rng.pinned_compute` and records the count it used.

With the group's ``-v/--verbose`` the resolved device and thread count are logged (INFO, on stderr;
see :mod:`invcoss.cli.output`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

from invcoss.modality import canonical_modality, modality_choices


class UserError(click.ClickException):
    """A mistake in the input: printed as ``Error: <message>``, exit code 2."""

    exit_code = 2


def check_output_file(path, overwrite: bool, option: str = "--out") -> None:
    """Refuse to start long work whose output file cannot or must not be written.

    Raises :class:`UserError` (exit 2) when ``path`` exists and ``overwrite`` is false (the file may
    be the only copy of an earlier result), when it is a folder, or when its folder cannot be
    created or written. The folder is created when missing.

    Example:
        >>> import tempfile, pathlib
        >>> check_output_file(pathlib.Path(tempfile.mkdtemp()) / "new" / "stats.safetensors", False)
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    check_new_files([path], overwrite, option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write to {path.parent} ({e.strerror or e})") from None


def check_new_files(paths, overwrite: bool, option: str = "--out") -> None:
    """Refuse outputs that would replace existing files, unless ``overwrite`` (``--overwrite``).

    Raises :class:`UserError` (exit 2) naming the first existing path of ``paths``, how many more
    exist, the flag that replaces them and ``option``, the output they come from.

    Example:
        >>> import tempfile, pathlib
        >>> check_new_files([pathlib.Path(tempfile.mkdtemp()) / "retention.csv"], False)
    """
    from pathlib import Path

    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of its outputs)" if len(existing) > 1 else ""
        raise UserError(
            f"{option} {existing[0]} exists{more}; pass --overwrite to replace it, or choose another {option}"
        )


def check_output_folder(path, option: str = "--out") -> None:
    """Create the output folder ``path`` when missing and make sure files can be written in it,
    before long work starts; :class:`UserError` (exit 2) naming the option otherwise.

    Example:
        >>> import tempfile, pathlib
        >>> check_output_folder(pathlib.Path(tempfile.mkdtemp()) / "run")
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


class ModalityType(click.Choice):
    """A modality name or alias, converted to the canonical name."""

    name = "modality"

    def __init__(self) -> None:
        super().__init__(modality_choices(), case_sensitive=False)

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return canonical_modality(super().convert(value, param, ctx))


MODALITY = ModalityType()

# The MAE presets of invcoss.models.mae_config.list_presets() (importing it here would import torch before
# --help; tests/cli/test_cli_logs.py checks they agree).
PRESETS = ("vit_base", "vit_nano", "vit_small", "vit_tiny")
PRESET = click.Choice(PRESETS)


def resolve_device(name: str | None, default: str | None = None):
    """``torch.device`` of ``name``: ``default`` when None, else CUDA when available, else the CPU.

    Raises:
        UserError: a name torch does not know, or a CUDA device where torch sees none.

    Example:
        >>> resolve_device("cpu"), resolve_device(None, default="cpu")
        (device(type='cpu'), device(type='cpu'))
    """
    import torch

    name = name if name is not None else default
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device expects cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device expects cpu, cuda or cuda:N, got {name!r}")
    return device


def _verbose(ctx: click.Context, line: str) -> None:
    logging.getLogger(f"invcoss.cli.{ctx.info_name}").info(line)


def device_option(default: str | None = None) -> Callable:
    """``--device``, resolved by :func:`resolve_device` (``default``: None means CUDA if available)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        device = resolve_device(value, default)
        _verbose(ctx, f"device {device}")
        return device

    where = default or "cuda when available, else cpu"
    return click.option(
        "--device", default=None, callback=callback, help=f"cpu, cuda or cuda:N (default: {where})."
    )


def threads_option(default: int | None = None) -> Callable:
    """``--threads N``: torch's intra-op CPU threads, a setting of the run like its seed.

    Results depend on the count (a reduction is split into one chunk per thread, so its float sums
    are grouped differently) and are bit-identical at the same count under any load; the count used
    is recorded in what the command writes. A given value reaches torch before the command runs.
    ``default``: what the command uses without ``--threads``; None means torch's own count (the
    machine's cores, or ``OMP_NUM_THREADS``) for new work, and for ``--resume`` the count the run
    was made with. The command receives the given value, ``default``, or None.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        value = value if value is not None else default
        if value is not None:
            import torch

            torch.set_num_threads(value)
            _verbose(ctx, f"{value} CPU thread(s)")
        return value

    where = f"{default}" if default is not None else "the machine's cores, or the resumed run's count"
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        callback=callback,
        help=f"torch CPU threads, a setting of the run: results differ across counts and are identical "
        f"at one (default: {where}); recorded in the outputs.",
    )


def progress_bar():
    """The progress display of every long command: a rich bar on stderr that vanishes when done.

    It is not drawn at all under ``-q`` or when stderr is not a terminal (a log file, CI): the
    per-step numbers are in the run's ``metrics.jsonl`` and, with ``-v``, in the log. Under torchrun
    only rank 0 shows it (``RANK`` other than 0 in the environment disables it).
    """
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from invcoss.cli.output import show_progress

    # The bar goes to stderr and disappears when done, so stdout carries only the summary line.
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not show_progress() or os.environ.get("RANK", "0") not in ("", "0"),
    )

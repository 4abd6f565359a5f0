"""Where the CLI's output goes: results on stdout (text, or one JSON document with ``--json``),
log records of the ``invcoss`` logger and progress bars on stderr.

- :func:`configure_logging` attaches one stderr handler to the ``invcoss`` logger at the level
  the group's ``-v``/``-q`` ask for (``-q`` ERROR, none WARNING, ``-v`` INFO, ``-vv`` DEBUG). The
  library only logs to ``logging.getLogger("invcoss....")``; a program that imports invcoss
  configures logging its own way and sees nothing printed.
- :func:`json_option` adds ``--json`` to a command; :func:`echo_json` prints one JSON document
  (sorted keys, NaN as ``null``) so that ``invcoss-cli info --json | jq .torch`` works: with
  ``--json`` stdout carries nothing else.
- :func:`show_progress` says whether a progress bar should be drawn: not under ``-q``, and not
  when stderr is not a terminal (a log file, CI), so logs hold no bar frames.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import click

from invcoss.runlog import json_finite

LOGGER = "invcoss"
LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` at every record (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # pragma: no cover - logging must never raise into the caller
            self.handleError(record)


def configure_logging(verbosity: int) -> int:
    """Route the ``invcoss`` logger to stderr at the level of ``verbosity`` (``-v`` count minus
    ``-q`` count, clamped to -1..2); returns the level. Calling it again replaces the handler.

    Example:
        >>> configure_logging(1) == logging.INFO
        True
        >>> configure_logging(0) == logging.WARNING
        True
    """
    level = LEVELS[max(-1, min(2, verbosity))]
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return level


def verbosity() -> int:
    """The group's ``-v`` count minus its ``-q`` count (0 outside a command)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj.get("verbosity", 0) if isinstance(obj, dict) else 0


def show_progress() -> bool:
    """Whether a progress bar is drawn: stderr is a terminal and ``-q`` was not given."""
    isatty = getattr(sys.stderr, "isatty", None)
    return verbosity() >= 0 and bool(isatty and isatty())


def echo_json(payload: object) -> None:
    """Print ``payload`` as one JSON document on stdout (NaN and infinities as ``null``).

    Example:
        >>> echo_json({"b": float("nan"), "a": 1})
        {
          "a": 1,
          "b": null
        }
    """
    click.echo(json.dumps(json_finite(payload), indent=2, sort_keys=True, default=str))


def json_option(f: Callable) -> Callable:
    """``--json``: the result as one JSON document on stdout instead of text (keys in docs/cli.md)."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the result as one JSON document on stdout, nothing else (keys: docs/cli.md).",
    )(f)

"""The commands' side of a ``torchrun`` launch: join the process group, and stop clearly when a rank fails.

:func:`torchrun_session` wraps a command's work. For a single process it yields ``None`` and
changes nothing. Under ``torchrun`` it joins the process group (:func:`invcoss.distributed.init_from_env`)
and yields the rank's :class:`~invcoss.distributed.DistContext`; a malformed launch is a user error
(exit 2), and a rank that dies or stops answering makes the others exit with code 1 and one line
that says so (:class:`RankFailure`) instead of hanging. The group is destroyed on the way out.
torch is imported inside the function so that ``--help`` stays instant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from invcoss.cli.options import UserError


class RankFailure(click.ClickException):
    """Another rank of a torchrun launch failed: printed as ``Error: <message>``, exit code 1."""

    exit_code = 1


@contextlib.contextmanager
def torchrun_session(device=None) -> Iterator:
    """Run the block as one rank of a torchrun launch, or as the only process.

    Args:
        device: the command's ``--device`` (its type picks gloo or NCCL; a CUDA rank computes on
            ``cuda:LOCAL_RANK``).

    Yields:
        ``None`` for a single process, else the rank's :class:`~invcoss.distributed.DistContext`.

    Raises:
        UserError: torchrun's environment is malformed or ``INVCOSS_DIST_TIMEOUT`` is not a
            positive number (exit 2).
        RankFailure: the group did not form, or another rank failed during the block (exit 1).
    """
    from invcoss import distributed

    try:
        ctx = distributed.init_from_env(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    except distributed.DistributedError as e:
        raise RankFailure(str(e)) from None
    try:
        with distributed.failures_explained("the run"):
            yield ctx
    except BaseException as e:
        # End the group on any way out (its threads would abort the interpreter at exit), without
        # letting a second error from a broken group hide the first.
        with contextlib.suppress(Exception):
            distributed.destroy(ctx)
        if isinstance(e, distributed.DistributedError):
            raise RankFailure(str(e)) from None
        raise
    distributed.destroy(ctx)

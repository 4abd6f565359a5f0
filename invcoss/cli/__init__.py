"""``invcoss-cli``: a thin click layer over the library.

Each command lives in its own module of this package and is registered on :data:`main` below.
torch is imported lazily inside the commands so that ``--help`` is instant. A user error exits
with code 2 and a one-line message, never a traceback.

Every option can also be set by an environment variable ``INVCOSS_<COMMAND>_<OPTION>`` (click's
``auto_envvar_prefix``; ``--help`` names each one), e.g. ``INVCOSS_PRETRAIN_EPOCHS=2``; an option
given on the command line wins. ``-v``/``-q`` set the level of the ``invcoss`` logger, whose
records go to stderr (:mod:`invcoss.cli.output`).
"""

from __future__ import annotations

import click

from invcoss import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "INVCOSS"})
@click.version_option(__version__, prog_name="invcoss-cli")
@click.option(
    "-v", "--verbose", count=True, help="Log more to stderr: -v the settings and every epoch, -vv every step."
)
@click.option("-q", "--quiet", count=True, help="Log only errors and draw no progress bar.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """InvCoSS: invert frozen medical foundation models into synthetic replay data."""
    from invcoss.cli.output import configure_logging

    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbose - quiet
    configure_logging(verbose - quiet)


def _show_envvars(command: click.Command) -> None:
    """Name each option's environment variable in ``--help``."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            param.show_envvar = True
    for sub in getattr(command, "commands", {}).values():
        _show_envvars(sub)


def _register() -> None:
    from invcoss.cli.audit import audit
    from invcoss.cli.bench import bench
    from invcoss.cli.continual import continual, evaluate, experiment, storage
    from invcoss.cli.data import phantoms, preprocess, pretrain, stats
    from invcoss.cli.info import info
    from invcoss.cli.invert import invert
    from invcoss.cli.plot import plot

    main.add_command(info)
    main.add_command(phantoms)
    main.add_command(preprocess)
    main.add_command(pretrain)
    main.add_command(stats)
    main.add_command(bench)
    main.add_command(continual)
    main.add_command(evaluate)
    main.add_command(storage)
    main.add_command(experiment)
    main.add_command(invert)
    main.add_command(audit)
    main.add_command(plot)
    _show_envvars(main)


_register()

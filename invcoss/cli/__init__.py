"""``invcoss-cli``: a thin click layer over the library.

Each command lives in its own module of this package and is registered on :data:`main` below.
torch is imported lazily inside the commands so that ``--help`` is instant. A user error exits
with code 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import click

from invcoss import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invcoss-cli")
@click.option("-v", "--verbose", is_flag=True, help="More output.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """InvCoSS: invert frozen medical foundation models into synthetic replay data."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def _register() -> None:
    from invcoss.cli.audit import audit
    from invcoss.cli.bench import bench
    from invcoss.cli.continual import continual, evaluate, experiment, storage
    from invcoss.cli.data import phantoms, preprocess, pretrain, stats
    from invcoss.cli.info import info
    from invcoss.cli.invert import invert

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


_register()

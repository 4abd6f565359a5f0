"""``invcoss-cli plot RUN_DIR``: the loss curves of a run (and a continual run's retention) as PNG."""

from __future__ import annotations

from pathlib import Path

import click

from invcoss.cli.options import UserError, check_new_files, check_output_folder

_RETENTION = ("eval/retention.json", "retention.json")


@click.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: RUN/plots."
)
@click.option("--overwrite", is_flag=True, help="Replace pictures of the same names in --out.")
def plot(run: Path, out: Path | None, overwrite: bool) -> None:
    """Draw the loss curves of RUN's metrics.jsonl, and the retention plot of a continual run.

    RUN is the output folder of pretrain, continual, invert or experiment forgetting. Writes
    loss.png (training steps) and inversion.png (inversion steps); a continual run gets one
    picture per stage, loss_stage<k>_<modality>.png and inversion_stage<k>_<modality>.png, and
    retention.png when `invcoss-cli evaluate` has scored it (RUN/eval/retention.json). Pictures
    already in --out are kept (exit 2) unless --overwrite.
    """
    from invcoss.continual.eval import RetentionTable
    from invcoss.runlog import METRICS_NAME, read_metrics
    from invcoss.runplot import loss_curves, plot_losses

    if not run.is_dir():
        raise UserError(f"RUN {run} is not a folder")
    try:
        records = read_metrics(run)
    except FileNotFoundError:
        raise UserError(
            f"{run} has no {METRICS_NAME}; give the output folder of pretrain, continual, invert or "
            "experiment forgetting"
        ) from None
    curves = loss_curves(records)
    if not curves:
        raise UserError(f"{run / METRICS_NAME} has no step with a loss yet")
    out = out or run / "plots"
    retention = next((run / r for r in _RETENTION if (run / r).is_file()), None)
    names = [f"{p}.png" for p in curves] + (["retention.png"] if retention else [])
    check_new_files([out / n for n in names], overwrite)
    check_output_folder(out)
    paths = plot_losses(records, out, title=run.name)
    if retention is not None:
        try:
            png = RetentionTable.read(retention).plot(out / "retention.png")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {retention}: {e}") from None
        if png is not None:
            paths.append(png)
    elif (run / "continual.json").is_file():
        click.echo(
            f"no retention plot: {run} has not been scored; `invcoss-cli evaluate --checkpoints {run} ...` "
            "writes RUN/eval/retention.json",
            err=True,
        )
    steps = sum(1 for r in records if r.get("event") == "step")
    click.echo(
        f"plotted {steps} steps of {run} into {len(paths)} pictures: {', '.join(p.name for p in paths)} in {out}"
    )

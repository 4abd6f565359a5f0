"""``invcoss-cli bench``: the benchmark table for one device, without pytest."""

from __future__ import annotations

from pathlib import Path

import click

from invcoss.cli.options import check_new_files, check_output_file, device_option, threads_option
from invcoss.cli.output import echo_json, json_option, show_progress


@click.command()
@device_option(default="cpu")
@click.option("--quick", is_flag=True, help="Skip the paper-size cases (CPU).")
@click.option(
    "--family",
    "families",
    multiple=True,
    help="Only these op families or ops (tv; stats: stat_matching, welford; repulsive: repulsive_direct, "
    "repulsive_pool; inversion); default: all of them.",
)
@click.option("--reps", default=5, show_default=True, help="Timed repetitions per row.")
@click.option(
    "--steps",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed inversion steps per backend (after one untimed step).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Also write the rows as JSON and Markdown to OUT.json / OUT.md.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.json / OUT.md.")
@json_option
@threads_option()
def bench(
    device,
    quick: bool,
    families: tuple[str, ...],
    reps: int,
    steps: int,
    out: Path | None,
    overwrite: bool,
    as_json: bool,
    threads: int | None,
) -> None:
    """Time every op for every provider (eager, torch.compile, kernels) and print the ratios.

    Then the inversion step (family ``inversion``): steps/s and samples/h of the whole loop on the
    reference ops, on the fused ops and with the device's default step (compiled, bf16 on CUDA), at
    the reduced size on CPU and the paper's on CUDA, as ``benchmarks/inversion_step.py`` measures it
    (which adds the CPU's compiled row). Every family and op comes from the table of
    :mod:`invcoss.benchmark.specs`. The CPU thread count is part of the table's title and of the JSON
    (``compute``); deterministic algorithms are left as they are, since the table times the usual path.
    An existing OUT.json or OUT.md stops the command before any timing (exit 2) unless --overwrite.
    With --json the rows are printed as the JSON of OUT.json (plus ``device``) instead of the table.
    """

    import torch
    from rich.console import Console

    from invcoss import benchmark as bm
    from invcoss.data.atomic import atomic_write_bytes, atomic_write_json
    from invcoss.rng import compute_record

    dev = device
    cases = bm.cases_for(dev, quick)
    known = set(bm.FAMILIES) | set(bm.OPS)
    unknown = set(families) - known
    if unknown:
        raise click.UsageError(
            f"--family expects some of {', '.join(sorted(known))}, got {', '.join(sorted(unknown))}"
        )
    if families:
        cases = [c for c in cases if c.family in families or c.op in families]
    if out is not None:
        targets = [out.with_suffix(".json"), out.with_suffix(".md")]
        check_new_files(targets, overwrite)
        for target in targets:
            check_output_file(target, True)
    with_inversion = not families or bm.INVERSION.name in families
    # The spinner goes to stderr, and only to a terminal, so stdout holds the table or the JSON alone.
    console = Console(stderr=True, quiet=not show_progress())
    rows, inversion_rows = [], []
    with console.status("benchmarking") as status:
        if cases:
            rows = bm.run_suite(
                dev, cases=cases, reps=reps, progress=lambda s: status.update(f"benchmarking {s}")
            )
        if with_inversion:
            backends = bm.INVERSION.variants(dev, compiled=False)  # CPU compiles take minutes
            for name in bm.INVERSION.profiles_for(dev):
                inversion_rows += bm.time_inversion(
                    bm.INVERSION_PROFILES[name],
                    dev,
                    backends,
                    steps=steps,
                    progress=lambda s: status.update(f"benchmarking the inversion step: {s}"),
                )
    compute = compute_record()
    md = (
        bm.to_markdown(rows, f"{device}, {compute['threads']} CPU threads, torch {torch.__version__}")
        if rows
        else ""
    )
    if inversion_rows:
        md += ("\n" if md else "") + bm.inversion_markdown(inversion_rows, "inversion step")
    payload = {"rows": bm.rows_to_dicts(rows), "inversion": inversion_rows, "compute": compute}
    if out is not None:
        atomic_write_json(out.with_suffix(".json"), payload)
        atomic_write_bytes(out.with_suffix(".md"), md.encode())
    if as_json:
        echo_json(payload | {"device": str(device)})
        return
    click.echo(md)
    best = max(
        (r for r in rows if r.provider not in ("eager", "compile")),
        key=lambda r: r.ratio_eager or 0,
        default=None,
    )
    summary = f"{len(rows)} op rows and {len(inversion_rows)} inversion-step rows on {device}"
    if best is not None:
        summary += (
            f"; best speed-up {best.ratio_eager:.1f}x vs eager ({best.case} {best.mode}, {best.provider})"
        )
    click.echo(summary)

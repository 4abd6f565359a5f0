"""``invcoss-cli invert``: a frozen model and its feature statistics → synthetic samples (Stage 1).

A thin layer over :class:`invcoss.inversion.Inverter`. Without ``--checkpoint`` it inverts the
model packaged with invcoss for the modality (:mod:`invcoss.assets`). Everything that can be wrong
with the input (an unknown modality, a missing checkpoint, statistics of another model or
modality, statistics collected with other weights unless ``--allow-other-weights``, a truncated or
inconsistent checkpoint, a wrongly typed ``--set`` value, an occupied output folder, a missing
reference) is found before anything is written and exits with code 2 and a one-line message.
"""

from __future__ import annotations

from pathlib import Path

import click

from invcoss.cli.options import MODALITY, UserError, device_option, progress_bar, threads_option
from invcoss.cli.replay import config_option, saved_fields, saved_run
from invcoss.cli.runlog import StepRate, metrics_log, tensorboard_option
from invcoss.modality import get_modality

LOSSES = ["task", "norm", "img", "rep"]


def _load(modality: str, checkpoint: Path | None, stats_path: Path | None, allow_other_weights: bool = False):
    """``(model, stats, sources)``; a UserError for anything missing or mismatched.

    The statistics must have been collected with this checkpoint's weights (their recorded weights
    hash); ``allow_other_weights`` accepts another model's of the same architecture, with a warning.
    """
    import warnings

    from invcoss.assets import STATS_NAME, default_model_dir
    from invcoss.feature_stats import load_feature_stats
    from invcoss.models import MAE
    from invcoss.models.weights import weights_hash

    if checkpoint is None:
        try:
            checkpoint = default_model_dir(modality)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        source = f"packaged {modality} model ({checkpoint})"
    else:
        if not checkpoint.is_dir():
            raise UserError(f"checkpoint {checkpoint} does not exist or is not a folder")
        source = str(checkpoint)
    try:
        model = MAE.from_pretrained(checkpoint).float()
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load checkpoint {checkpoint}: {e}") from None
    if stats_path is None:
        stats_path = checkpoint / STATS_NAME
        if not stats_path.is_file():
            raise UserError(
                f"no feature statistics: {checkpoint} has no {STATS_NAME}; give --stats FILE "
                "(`invcoss-cli stats` makes one)"
            )
    elif not stats_path.is_file():
        raise UserError(f"statistics file {stats_path} does not exist")
    own = weights_hash(model)  # about a second for vit_base: computed once
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = load_feature_stats(
                stats_path, model, modality, expect_weights=own, allow_other_weights=allow_other_weights
            )
    except ValueError as e:
        raise UserError(str(e)) from None
    for w in caught:
        click.echo(f"Warning: {w.message}", err=True)
    sources = {
        "model": source,
        "stats": str(stats_path),
        "model_weights_hash": own,
        "stats_weights_hash": stats.weights_hash,
    }
    return model, stats, sources


def _recorded_threads(out: Path) -> int | None:
    """The thread count of the inversion run in ``out`` (None when there is none, or it has none)."""
    import json

    from invcoss.inversion.files import MANIFEST

    try:
        return int(json.loads((out / MANIFEST).read_text())["compute"]["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse_settings(settings: tuple[str, ...]) -> dict:
    """``("alpha_rep=1.0", "generator_channels=16,8,8,4")`` → ``{"alpha_rep": 1.0, ...}``.

    A value is read as JSON when it parses (numbers, ``null``, ``true``), a comma list as a tuple
    of such values, anything else as a string.
    """
    import json

    def value(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    out = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        parts = text.split(",")
        out[name.strip()] = tuple(value(p.strip()) for p in parts) if len(parts) > 1 else value(text.strip())
    return out


@click.command()
@config_option("invert")
@click.option("--modality", type=MODALITY, required=True, help="What to synthesise.")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="A model folder (pretrain output). Default: the model packaged for --modality.",
)
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Feature statistics of the model. Default: stats.safetensors in the checkpoint folder.",
)
@click.option(
    "--allow-other-weights",
    is_flag=True,
    help="Accept statistics collected with other weights of the same architecture (e.g. the model "
    "before fine-tuning), with a warning. Default: they must be this checkpoint's.",
)
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Default: two batches.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (new or empty, or the run to --resume). Default: ./inversion-MODALITY.",
)
@click.option("--profile", type=click.Choice(["quick", "paper"]), default="quick", show_default=True)
@device_option()
@click.option(
    "--backend", default=None, help="invcoss.ops backend: torch, triton, cpu, cuda (default: fastest)."
)
@threads_option()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out after its last finished batch.")
@click.option(
    "--generator",
    type=click.Choice(["invunet", "bottomup", "pixels"]),
    default="invunet",
    show_default=True,
    help="InvUNet (the paper's), the bottom-up baseline, or pixels (no generator).",
)
@click.option(
    "--without",
    "disabled",
    type=click.Choice(LOSSES),
    multiple=True,
    help="Switch a loss term off (repeatable).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override any InversionConfig field, e.g. --set alpha_rep=1.0 --set generator_channels=16,8,8,4.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the profile's.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Steps per batch (profile's by default)."
)
@click.option("--warmup-steps", type=click.IntRange(min=1), default=None, help="Steps for a fresh generator.")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="Real scans or a cache of the modality: adds real-data columns and the Frechet distance.",
)
@click.option(
    "--compare-rep", is_flag=True, help="Also invert with L_rep toggled and report both diversities."
)
@click.option(
    "--format",
    "sample_format",
    type=click.Choice(["nifti", "dicom", "npy", "png"]),
    default=None,
    help="How samples are written. 3D: nifti (default; CT in Hounsfield units, opens in a viewer), "
    "dicom (a synthetic series per sample; needs pydicom) or npy (model input). 2D: npy (default, with an 8-bit PNG copy) or png (8-bit only).",
)
@tensorboard_option
def invert(
    modality: str,
    checkpoint: Path | None,
    stats_path: Path | None,
    allow_other_weights: bool,
    num_samples: int | None,
    out: Path | None,
    profile: str,
    device: str | None,
    backend: str | None,
    threads: int | None,
    seed: int,
    resume: bool,
    generator: str,
    disabled: tuple[str, ...],
    settings: tuple[str, ...],
    batch_size: int | None,
    steps: int | None,
    warmup_steps: int | None,
    reference: Path | None,
    compare_rep: bool,
    sample_format: str | None,
    tensorboard: bool,
) -> None:
    """Invert a frozen model into synthetic samples that match its feature statistics (Eq. 6).

    The CPU thread count is recorded in the manifest; --resume continues at the recorded count and
    refuses another --threads. Every optimisation step and every written batch is logged to
    OUT/metrics.jsonl (docs/cli.md; under torchrun, rank 0's).

    Under torchrun (torchrun --nproc-per-node N -m invcoss.cli invert ...) the ranks share the run:
    each inverts its share of the batches into --out and rank 0 writes the manifest and the report
    (docs/inversion.md, "Several ranks"); --resume needs the same number of ranks.
    """
    import warnings

    from invcoss import distributed
    from invcoss.cli.torchrun import torchrun_session
    from invcoss.configs import check_field_types
    from invcoss.feature_stats import DataSummaryWarning
    from invcoss.inversion import Inverter, NonFiniteLossError
    from invcoss.inversion.config import InversionConfig
    from invcoss.inversion.files import check_sample_format
    from invcoss.inversion.report import format_report, reference_batches
    from invcoss.inversion.run import RunFolderError
    from invcoss.inversion.shards import shard_batches
    from invcoss.ops import available_backends
    from invcoss.rng import pinned_compute

    try:
        check_sample_format(sample_format, get_modality(modality).ndim)
    except ValueError as e:
        raise UserError(f"--format: {e}") from None
    if backend is not None and backend not in available_backends():
        raise UserError(
            f"backend {backend!r} is not available here; available: {', '.join(available_backends())}"
        )
    # Under torchrun every rank inverts its share of the batches (invcoss.inversion.shards).
    with torchrun_session(device) as ctx:
        dev = ctx.device if ctx is not None else device
        model, stats, sources = _load(modality, checkpoint, stats_path, allow_other_weights)
        overrides = {"seed": seed, "generator": generator}
        for name, value in (("batch_size", batch_size), ("steps", steps), ("warmup_steps", warmup_steps)):
            if value is not None:
                overrides[name] = value
        if disabled:
            overrides["losses"] = tuple(t for t in LOSSES if t not in disabled)
        overrides |= _parse_settings(settings)
        saved = saved_run()
        if saved is not None:
            base = InversionConfig.from_dict(saved["identity"]["config"]).to_dict()
            overrides = saved_fields(base, overrides, exclude=["modality", "profile"])
        try:
            check_field_types(InversionConfig, overrides, where="--set")
            config = InversionConfig.from_profile(profile, modality, **overrides)
            with warnings.catch_warnings(record=True) as caught:  # statistics without their data's summary
                warnings.simplefilter("always", DataSummaryWarning)
                inverter = Inverter(model, stats, config, device=dev, backend=backend)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None
        if distributed.is_main():
            for w in caught:
                click.echo(f"Warning: {w.message}", err=True)
        real = None
        if reference is not None:
            try:  # only rank 0 reports, so only it reads the reference; a bad one stops every rank
                real = distributed.on_main(
                    lambda: reference_batches(inverter, reference, limit=256), share=False
                )
            except ValueError as e:
                raise UserError(str(e)) from None
            sources["reference"] = str(reference)
        num_samples = num_samples or 2 * config.batch_size
        out = out or Path(f"inversion-{modality}")
        if resume and threads is None:
            threads = _recorded_threads(out)
        sizes = inverter.batch_sizes(num_samples)
        # The bar counts this rank's batches (all of them for one process); the log counts the
        # steps of the whole run (batch b starts at step starts[b]).
        group = 1 if config.generator == "pixels" else config.generator_every
        mine = shard_batches(len(sizes), group, distributed.world_size())[distributed.rank()]
        offsets = {b: sum(config.steps_for(i) for i in mine[:k]) for k, b in enumerate(mine)}
        starts = [sum(config.steps_for(i) for i in range(b)) for b in range(len(sizes))]
        log = metrics_log(out, resume=resume, tensorboard=tensorboard)
        rate = StepRate()
        lrs = {"lr": config.lr_pixels if config.generator == "pixels" else config.lr_generator}
        if config.generator != "pixels":
            lrs["lr_latent"] = config.lr_latent
        with progress_bar() as bar, pinned_compute(threads), log:
            task = bar.add_task("invert", total=sum(config.steps_for(b) for b in mine), info="")

            def on_step(s) -> None:
                losses = " ".join(f"{k} {v:.4g}" for k, v in s.losses.items())
                info = f"batch {s.batch + 1}/{s.num_batches} step {s.step}/{s.steps} {losses}"
                bar.update(task, completed=offsets[s.batch] + s.step, info=info)
                steps_per_s = rate(restart=s.step == 1)
                log.write(
                    "step", step=starts[s.batch] + s.step, phase="invert", batch=s.batch + 1,
                    batches=s.num_batches, losses=dict(s.losses), steps_per_s=steps_per_s,
                    samples_per_s=steps_per_s and steps_per_s * sizes[s.batch], **lrs,
                )  # fmt: skip

            def on_batch(b) -> None:
                log.write(
                    "batch", step=starts[b.index] + config.steps_for(b.index), phase="invert",
                    batch=b.index + 1, batches=len(sizes), samples=int(b.images.shape[0]), seconds=b.seconds,
                    losses=dict(b.final), fresh_generator=b.fresh_generator,
                )  # fmt: skip

            try:
                result = inverter.run(
                    num_samples,
                    out,
                    resume=resume,
                    on_step=on_step,
                    on_batch=on_batch,
                    sources=sources,
                    reference=real,
                    compare_rep=compare_rep,
                    sample_format=sample_format,
                )
            except RunFolderError as e:
                raise UserError(str(e)) from None
            except NonFiniteLossError as e:
                raise click.ClickException(str(e)) from None
    if ctx is not None and not ctx.is_main:
        return  # rank 0 reports for the run
    for line in format_report(result.quality):
        click.echo(line)
    kind = "volumes" if config.ndim == 3 else "images"
    q = result.quality["stat_loss"]
    done = f"{result.batches_run} of {len(sizes)} batches run" if resume else f"{len(sizes)} batches"
    ranks = f" on {ctx.world_size} ranks" if ctx is not None else ""
    made = sum(sizes[len(sizes) - result.batches_run :])  # the samples this call optimised
    speed = f", {3600 * made / result.seconds:.0f} samples/h" if made and result.seconds > 0 else ""
    if inverter.compile_seconds:
        speed += f", {inverter.compile_seconds:.0f} s of it compiling"
    click.echo(
        f"wrote {len(result.files)} synthetic {modality} {kind} to {out} ({done}{ranks}, {result.seconds:.0f} s"
        f"{speed}); stat-matching loss {q['synthetic']:.4g} vs {q['noise']:.4g} for noise"
    )

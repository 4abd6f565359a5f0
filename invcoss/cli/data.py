"""``invcoss-cli phantoms | preprocess | pretrain | stats``: from scans to a model and its statistics.

Each command is a thin layer over the library (:mod:`invcoss.data`, :mod:`invcoss.pretrain`,
:mod:`invcoss.feature_stats`) with a progress bar and a one-line summary. A user error (missing folder,
unreadable file under ``--strict``, mismatched cache) exits with code 2 and a message, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import click

from invcoss.cli.options import (
    MODALITY,
    PRESET,
    UserError,
    check_output_file,
    check_output_folder,
    device_option,
    progress_bar,
    threads_option,
)
from invcoss.cli.replay import config_option, saved_fields, saved_run
from invcoss.cli.runlog import log_train_step, metrics_log, tensorboard_option
from invcoss.modality import get_modality

# The defaults of invcoss.data.ReadLimits (importing it here would import torch before --help;
# tests/data/test_data_robust.py checks they agree).
LIMIT_DEFAULTS = {"max_voxels": 2**29, "max_pixels": 100_000_000, "min_spacing": 0.01, "max_spacing": 50.0}
_LIMIT_HELP = {
    "max_voxels": "Skip a volume (or one frame) with more voxels, also after resampling; checked from the header.",
    "max_pixels": "Skip a 2D image with more pixels; checked from the header.",
    "min_spacing": "Skip a volume with a voxel spacing below this (mm).",
    "max_spacing": "Skip a volume with a voxel spacing above this (mm).",
}


def limit_options():
    """``--max-voxels``, ``--max-pixels``, ``--min-spacing``, ``--max-spacing``: the fields of ReadLimits."""

    def decorate(f):
        for name in reversed(list(LIMIT_DEFAULTS)):
            default = LIMIT_DEFAULTS[name]
            kind = (
                click.IntRange(min=1) if isinstance(default, int) else click.FloatRange(min=0, min_open=True)
            )
            f = click.option(
                "--" + name.replace("_", "-"),
                type=kind,
                default=default,
                show_default=True,
                help=_LIMIT_HELP[name],
            )(f)
        return f

    return decorate


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Dims(click.ParamType):
    """``64x160x160`` (or ``64,160,160``) → a tuple of numbers of one type."""

    name = "dims"

    def __init__(self, cast: type, example: str) -> None:
        self.cast, self.example = cast, example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.cast(v) for v in str(value).lower().replace(",", "x").split("x"))
        except ValueError:
            self.fail(f"expected something like {self.example}, got {value!r}", param, ctx)


@click.command()
@click.option("--modality", type=MODALITY, required=True, help="Kind of phantom.")
@click.option("--count", type=click.IntRange(min=1), default=8, show_default=True, help="Number of files.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Base seed; file i depends on (seed, i)."
)
@click.option(
    "--size",
    type=Dims(int, "64x160x160 or 256x256"),
    default=None,
    help="DxHxW for ct/mri, HxW for xray/pathology.",
)
@click.option(
    "--spacing", type=Dims(float, "2.5x1.6x1.6"), default=None, help="Voxel spacing in mm (ct/mri)."
)
@click.option("--overwrite", is_flag=True, help="Replace files of the phantoms' names that hold other bytes.")
@threads_option()
def phantoms(
    modality: str,
    count: int,
    out: Path,
    seed: int,
    size: tuple[int, ...] | None,
    spacing: tuple[float, ...] | None,
    overwrite: bool,
    threads: int | None,
) -> None:
    """Write deterministic procedural phantoms (NIfTI for ct/mri, PNG for xray/pathology).

    A file of a phantom's name that already holds its bytes is kept (re-runs are free); one with
    other bytes (another --seed, --size or --spacing, or a file of yours) stops the run with exit
    2 unless --overwrite is given.
    """
    check_output_folder(out)
    from invcoss.data import PhantomExistsError, write_phantoms
    from invcoss.rng import pinned_compute

    with progress_bar() as bar, pinned_compute(threads):
        task = bar.add_task(f"phantoms {modality}", total=count, info="")
        try:
            paths = write_phantoms(
                out,
                modality,
                count,
                seed=seed,
                size=size,
                spacing=spacing,
                on_written=lambda p: bar.update(task, advance=1, info=p.name),
                overwrite=overwrite,
            )
        except PhantomExistsError as e:
            raise UserError(
                f"{e.path} exists and is not the phantom of that name; pass --overwrite to replace it, "
                "or choose another --out"
            ) from None
        except ValueError as e:
            raise UserError(str(e)) from None
    total = sum(p.stat().st_size for p in paths)
    click.echo(f"wrote {len(paths)} {modality} phantoms ({human_bytes(total)}) to {out}")


@click.command()
@click.option("--modality", type=MODALITY, required=True)
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="Folder of scans (searched recursively)."
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder.")
@click.option("--profile", type=click.Choice(["paper", "quick"]), default="paper", show_default=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Stop at the first file that cannot be used (exit 2) instead of skipping it.",
)
@click.option(
    "--frames",
    type=click.Choice(["first", "all"]),
    default="first",
    show_default=True,
    help="Of a 4D series: the first volume only, or every volume as a sample source (warned either way).",
)
@click.option(
    "--series",
    default=None,
    metavar="UID",
    help="Of the DICOM files, read only the series with this SeriesInstanceUID (default: every series "
    "is its own volume).",
)
@click.option(
    "--hash-names",
    is_flag=True,
    help="Record source files by a SHA-256 of their relative path (manifest, array names, log), not by name.",
)
@limit_options()
@threads_option()
def preprocess(
    modality: str,
    data: Path,
    out: Path,
    profile: str,
    strict: bool,
    frames: str,
    series: str | None,
    hash_names: bool,
    max_voxels: int,
    max_pixels: int,
    min_spacing: float,
    max_spacing: float,
    threads: int | None,
) -> None:
    """Turn a folder of scans into a cache of preprocessed sub-volumes (re-runs skip finished files).

    NIfTI for ct/mri, PNG/JPEG/TIFF for xray/pathology, and DICOM for all (with the invcoss[dicom]
    extra): DICOM files are grouped into series by SeriesInstanceUID, each series one volume
    (xray: each image one picture); see docs/data.md.

    A file that cannot be used (unreadable, over a limit, no usable sample for the modality) is
    named, counted and skipped; --strict stops at the first instead (exit 2). A run that gives no
    sample at all exits 2 with the reason.
    """
    if not min_spacing < max_spacing:
        raise UserError(f"--min-spacing ({min_spacing}) must be below --max-spacing ({max_spacing})")
    check_output_folder(out)
    from invcoss.data import NoSamplesError, ReadError, ReadLimits
    from invcoss.data import preprocess as run_preprocess
    from invcoss.rng import pinned_compute

    limits = ReadLimits(max_voxels, max_pixels, min_spacing, max_spacing)
    with progress_bar() as bar, pinned_compute(threads):
        task = bar.add_task(f"preprocess {modality}", total=None, info="")

        def on_file(done: int, total: int, rel: str, status: str) -> None:
            bar.update(task, completed=done, total=total, info=f"{status} {rel}")

        try:
            report = run_preprocess(
                data, out, modality, profile, strict=strict, on_file=on_file, limits=limits, frames=frames,
                series=series, hash_names=hash_names,
            )  # fmt: skip
        except ReadError as e:
            raise UserError(f"cannot use {e.path}: {e.reason} (--strict)") from None
        except NoSamplesError as e:
            _print_files(e.report)
            raise UserError(str(e)) from None
        except ValueError as e:
            raise UserError(str(e)) from None
    _print_files(report)
    skipped = f"{len(report.skipped)} skipped"
    if report.skipped:
        skipped += ": " + ", ".join(f"{n} {kind}" for kind, n in report.skipped_by_kind().items())
    click.echo(
        f"preprocessed {report.processed} files ({report.reused} already done, {skipped}) "
        f"-> {report.samples} samples, {human_bytes(report.cache_bytes)} in {out}"
    )


def _print_files(report) -> None:
    for rel, message in report.warnings:
        click.echo(f"warning: {rel}: {message}", err=True)
    for rel, reason in report.skipped:
        click.echo(f"skipped {rel}: {reason}", err=True)


def open_data(path: Path, modality: str | None, model, strict: bool = False):
    """A cache or a raw folder as a Dataset at the model's input size."""
    from invcoss.data import config_for_input, open_dataset, read_manifest

    if not path.exists():
        raise UserError(f"data {path} does not exist")
    if (path / "manifest.json").is_file():
        cached = read_manifest(path)["modality"]
        if modality is not None and modality != cached:
            raise UserError(f"cache {path} holds {cached} data, but --modality {modality} was given")
        modality = cached
        config = None
    else:
        if modality is None:
            raise UserError(
                f"{path} is not a preprocessed cache: give --modality to read it as a folder of scans"
            )
        ndim = get_modality(modality).ndim
        config = config_for_input(modality, model.config.img_size(ndim), channels=model.config.in_chans(ndim))
    ds = open_dataset(path, modality, config=config, strict=strict)
    ndim = len(ds.sample_shape) - 1
    expected = (model.config.in_chans(ndim), *model.config.img_size(ndim))
    if tuple(ds.sample_shape) != expected:
        raise UserError(
            f"{path} holds samples of shape {tuple(ds.sample_shape)}, but {model.config.name} takes {expected}; "
            "preprocess with the profile of the model (e.g. --profile quick for vit_nano)"
        )
    return ds


def _cache_input_size(data: Path) -> tuple[int, ...] | None:
    """The sample size (without channels) of the preprocessed cache ``data``; None for a raw folder."""
    from invcoss.data import read_manifest

    if not (data / "manifest.json").is_file():
        return None
    try:
        return tuple(read_manifest(data)["sample_shape"][1:])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--data {data}: cannot read its manifest ({e})") from None


@click.command()
@config_option("pretrain")
@click.option("--modality", type=MODALITY, default=None, help="Required when --data is a raw folder.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="A cache or a folder of scans.")
@click.option(
    "--preset",
    type=PRESET,
    default="vit_nano",
    show_default=True,
    help="Model preset (invcoss.models); its input size is the cache's sample size.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint folder."
)
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh over a model or run already in --out (its config.json, model.safetensors, "
    "training_state.safetensors, pretrain.json).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Samples per step, over all ranks under torchrun (each rank computes its part).",
)
@click.option("--lr", type=float, default=1.5e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup-epochs", type=float, default=None, help="Default: 40/300 of --epochs, as the paper.")
@click.option("--seed", type=int, default=0, show_default=True)
@tensorboard_option
@device_option()
@threads_option()
def pretrain(
    modality: str | None,
    data: Path,
    preset: str,
    epochs: int,
    out: Path,
    resume: bool,
    overwrite: bool,
    batch_size: int,
    lr: float,
    warmup_epochs: float | None,
    seed: int,
    tensorboard: bool,
    device,
    threads: int | None,
) -> None:
    """MAE pre-training (AdamW, warm-up then cosine), checkpointing every epoch.

    The model is the --preset at the input size of the data: a preprocessed cache's sample size
    (so ``preprocess`` with its defaults feeds ``pretrain`` with its defaults), the preset's own for
    a raw folder. Every step is logged to OUT/metrics.jsonl (docs/cli.md).

    The CPU thread count is recorded in pretrain.json; --resume continues at the recorded count and
    refuses another --threads. Under ``torchrun -m invcoss.cli pretrain`` the ranks train one model
    with DistributedDataParallel on the same global batches (--batch-size), rank 0 writes the
    checkpoint, and --resume may use another number of ranks. A folder that already holds a model or a run is refused (exit 2)
    unless --resume continues its training state or --overwrite replaces it.
    """
    check_output_folder(out)
    import torch

    from invcoss.configs import config_from_dict
    from invcoss.models import MAE, MAEConfig, create_model
    from invcoss.pretrain import PretrainConfig
    from invcoss.pretrain import pretrain as run_pretrain

    saved = saved_run()
    given = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
        "seed": seed,
    }
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on --seed too
            if saved is not None and saved["model"]["name"] == preset:
                model = MAE(config_from_dict(MAEConfig, saved["model"]))
            else:
                size = _cache_input_size(data)
                ndim = len(size) if size else 0
                model = create_model(preset, **({f"img_size_{ndim}d": size} if size else {}))
        config = PretrainConfig(**saved_fields(saved["pretrain"], given) if saved else given)
    except (ValueError, TypeError) as e:
        raise UserError(f"{e} (--preset {preset}, --data {data})") from None
    try:
        ds = open_data(data, modality, model)
    except ValueError as e:
        raise UserError(str(e)) from None
    from invcoss.cli.torchrun import torchrun_session

    log = metrics_log(out, resume=resume, tensorboard=tensorboard)
    # Under torchrun: DistributedDataParallel over the ranks, rank 0 writes the files, the log and prints.
    with torchrun_session(device) as ctx, progress_bar() as bar, log:
        task = bar.add_task("pretrain", total=None, info="")
        epoch_losses: dict[str, list[float]] = {}

        def on_step(s) -> None:
            loss = s.losses["mae"]
            info = f"epoch {s.epoch}/{s.epochs} loss {loss:.4f} lr {s.lr:.2e} {s.samples_per_s:.1f} samples/s"
            bar.update(task, completed=s.done, total=s.total, info=info)
            log_train_step(log, s, epoch_losses)

        dev = ctx.device if ctx is not None else device
        try:
            result = run_pretrain(
                model, ds, out, config, resume=resume, device=dev, on_step=on_step, threads=threads,
                overwrite=overwrite,
            )  # fmt: skip
        except ValueError as e:
            raise UserError(str(e)) from None
    if ctx is not None and not ctx.is_main:
        return
    if result.epochs_run == 0:
        click.echo(
            f"nothing to do: {out} already holds {config.epochs} epochs (loss {result.losses[-1]:.4f})"
        )
        return
    size = "x".join(map(str, model.config.img_size(len(ds.sample_shape) - 1)))
    click.echo(
        f"trained {preset} on {result.samples} {ds.modality} samples for {result.epochs_run} epochs"
        f"{f' on {ctx.world_size} ranks' if ctx is not None else ''} "
        f"in {result.seconds:.0f} s: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; checkpoint {out} "
        f"(input {size})"
    )


@click.command()
@click.option(
    "--checkpoint", type=click.Path(path_type=Path), required=True, help="A pretrain output folder."
)
@click.option("--data", type=click.Path(path_type=Path), required=True, help="A cache or a folder of scans.")
@click.option("--modality", type=MODALITY, default=None, help="Required when --data is a raw folder.")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .safetensors."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@device_option()
@threads_option()
def stats(
    checkpoint: Path,
    data: Path,
    modality: str | None,
    out: Path,
    batch_size: int,
    overwrite: bool,
    device,
    threads: int | None,
) -> None:
    """Collect per-block feature statistics of a checkpoint over its data (Appendix B.2).

    An existing --out is kept unless --overwrite is given; its folder is checked before the pass.
    The CPU thread count of the pass is recorded in the file's metadata (``compute``).
    """
    check_output_file(out, overwrite)

    from invcoss.cli.torchrun import torchrun_session
    from invcoss.feature_stats import collect_feature_stats
    from invcoss.models import MAE
    from invcoss.rng import pinned_compute

    try:
        model = MAE.from_pretrained(checkpoint)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load checkpoint {checkpoint}: {e}") from None
    try:
        ds = open_data(data, modality, model)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Under torchrun each rank reads its shard of the data and rank 0 writes the merged statistics.
    with torchrun_session(device) as ctx:
        dev = ctx.device if ctx is not None else device
        model.to(dev)
        with progress_bar() as bar, pinned_compute(threads):
            task = bar.add_task("stats", total=None, info="")
            try:
                result = collect_feature_stats(
                    model,
                    ds,
                    batch_size=batch_size,
                    out=out,
                    on_batch=lambda done, total: bar.update(
                        task, completed=done, total=total, info=f"{done} samples"
                    ),
                )
            except ValueError as e:
                raise UserError(str(e)) from None
        if ctx is not None and not ctx.is_main:
            return
    size = out.stat().st_size
    ratio = ds.source_bytes / size if size else float("inf")
    ranks = f" on {ctx.world_size} ranks" if ctx is not None else ""
    click.echo(
        f"statistics of {result.num_layers} blocks over {result.count} {result.modality} samples{ranks}: "
        f"{human_bytes(size)} for {human_bytes(ds.source_bytes)} of data ({ratio:.1f}x smaller) -> {out}"
    )

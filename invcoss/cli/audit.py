"""``invcoss-cli audit``: a privacy audit of synthetic samples against the real training data.

A thin layer over :mod:`invcoss.audit`: the nearest-training-sample distances of every synthetic
sample in pixels and in the model's features against those of held-out real data (or, without
``--heldout``, of training samples to other source files), the memorisation score, the closest pairs
side by side, and how close the stored statistics' mean comes to one training sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from invcoss.cli.options import MODALITY, UserError, check_new_files, device_option, threads_option


def _samples(ds, limit: int):
    """Up to ``limit`` evenly spaced samples of ``ds`` as one tensor, and their source ids."""
    import numpy as np
    import torch

    index = np.unique(np.linspace(0, len(ds) - 1, min(limit, len(ds))).round().astype(int))
    samples = getattr(ds, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], dict):
        names = [samples[int(i)]["source"] for i in index]
    elif hasattr(ds, "index"):
        names = [ds.index[int(i)][0] for i in index]
    else:
        names = [int(i) for i in index]
    ids = {n: k for k, n in enumerate(dict.fromkeys(names))}
    return torch.stack([ds[int(i)].float() for i in index]), [ids[n] for n in names]


@click.command()
@click.argument("synthetic", type=click.Path(path_type=Path))
@click.argument("real", type=click.Path(path_type=Path))
@click.option(
    "--heldout",
    type=click.Path(path_type=Path),
    default=None,
    help="Real samples NOT used in training (a cache or folder). Default: leave-one-source-out.",
)
@click.option("--modality", type=MODALITY, default=None, help="Needed when no input is a cache or a run.")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="The frozen model. Default: the model packaged for the modality.",
)
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Statistics file to audit. Default: the checkpoint's, when it has one.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=5.0,
    show_default=True,
    help="Reference percentile of the memorisation threshold.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=2),
    default=1024,
    show_default=True,
    help="At most this many samples of each set (evenly spaced).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for audit.json and closest_pairs.png.",
)
@click.option("--overwrite", is_flag=True, help="Replace audit.json and closest_pairs.png in --out.")
@device_option()
@threads_option()
def audit(synthetic, real, heldout, modality, checkpoint, stats_path, percentile, max_samples, out,
          overwrite, device, threads):  # fmt: skip
    """Audit SYNTHETIC samples (an `invert` run folder, a cache or a folder) against the REAL training data."""
    if out is not None:
        check_new_files([out / "audit.json", out / "closest_pairs.png"], overwrite)
    run_manifest = synthetic / "manifest.json"
    run = None
    if run_manifest.is_file():
        manifest = json.loads(run_manifest.read_text())
        if "batches" in manifest:
            run = manifest
            modality = modality or manifest.get("modality")

    from invcoss.assets import STATS_NAME, default_model_dir
    from invcoss.audit import audit_summary, format_audit, memorisation_audit, save_closest_pairs, stats_audit
    from invcoss.cli.data import open_data
    from invcoss.feature_stats import load_feature_stats
    from invcoss.inversion.files import read_samples, sample_paths
    from invcoss.modality import INPUT_SPACES
    from invcoss.models import MAE
    from invcoss.rng import pinned_compute

    if modality is None and (real / "manifest.json").is_file():
        from invcoss.data import read_manifest

        modality = read_manifest(real)["modality"]
    if checkpoint is None:
        if modality is None:
            raise UserError("give --modality or --checkpoint (no input names the modality)")
        try:
            checkpoint = default_model_dir(modality)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    try:
        model = MAE.from_pretrained(checkpoint).float().to(device)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load checkpoint {checkpoint}: {e}") from None
    train_ds = open_data(real, modality, model)
    modality = train_ds.modality
    with pinned_compute(threads):
        train, groups = _samples(train_ds, max_samples)
        if run is not None:
            paths = sample_paths(synthetic, run)[:max_samples]
            syn = next(read_samples(paths, len(paths)))
        else:
            syn, _ = _samples(open_data(synthetic, modality, model), max_samples)
        held = _samples(open_data(heldout, modality, model), max_samples)[0] if heldout is not None else None
        try:
            spaces = memorisation_audit(model, syn, train, held, groups, percentile, device)
        except ValueError as e:
            raise UserError(str(e)) from None
        reference = "held-out" if held is not None else "leave-one-source-out training"
        summary = audit_summary(spaces, percentile, reference)
        stats_report = None
        stats_path = stats_path or (checkpoint / STATS_NAME if (checkpoint / STATS_NAME).is_file() else None)
        if stats_path is not None:
            try:
                stats = load_feature_stats(stats_path, model, modality, allow_other_weights=True)
            except ValueError as e:
                raise UserError(str(e)) from None
            stats_report = stats_audit(model, stats, train, held, percentile=percentile, device=device)
            stats_report["path"] = str(stats_path)
    for line in format_audit(summary, stats_report):
        click.echo(line)
    if out is not None:
        from invcoss.data.atomic import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "audit.json", {"memorisation": summary, "statistics": stats_report})
        save_closest_pairs(out / "closest_pairs.png", spaces["pixels"], syn, train, INPUT_SPACES[modality])
    click.echo(
        f"audited {summary['synthetic']} synthetic against {train.shape[0]} training samples: memorisation "
        f"{100 * summary['pixels']['score']:.1f}% (pixels), {100 * summary['features']['score']:.1f}% (features)"
        + (f" -> {out}" if out is not None else "")
    )

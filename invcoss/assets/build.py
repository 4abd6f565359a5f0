"""Rebuild the packaged default models: ``python -m invcoss.assets.build`` (what ``make assets`` runs).

For each modality, with fixed seeds, the same steps as the commands a user runs::

    invcoss-cli phantoms   --modality M --count N --out WORK/M/scans --seed 0
    invcoss-cli preprocess --modality M --data WORK/M/scans --out WORK/M/cache --profile quick
    invcoss-cli pretrain   --data WORK/M/cache --preset vit_nano --epochs E --batch-size 8 --lr 1e-3 --seed 0
    invcoss-cli stats      --checkpoint ... --data WORK/M/cache --out stats.safetensors

called through the library functions behind them, because the model is ``vit_nano`` at width 64
(``embed_dim=64``), which the pretrain command has no option for. The narrower width keeps each
checkpoint under 2 MB. The trained weights are rounded to float16 for storage, and the statistics
are collected with the rounded weights, so they describe exactly the model that is loaded.
The build runs at one CPU thread by default (``--threads``), recorded in ``asset.json`` as
``compute``: at one count the build is bit-identical, at another the weights differ in the last bits.

The package's assets folder holds the build's own models and is replaced on every build; another
``--out`` that already holds a model of a modality to build (``config.json``,
``model.safetensors``, ``stats.safetensors`` or ``asset.json`` in ``OUT/M``) is refused (exit 2)
unless ``--overwrite`` is given. In ``--work`` the build replaces only the files its steps write
(the checkpoint starts afresh over its own files, phantoms of other bytes are refused).

``--data-summary-only`` leaves the models and the statistics' tensors as they are and adds the
description of the data to each ``stats.safetensors`` (the ``data`` metadata field: voxel spacing
and value range, :class:`invcoss.data.summary.DataSummary`) for files written before it was
recorded: the phantoms and cache are rebuilt from the same seeds, the statistics are collected
again with the stored model as a check that these are the same data (the largest difference from the
stored tensors is printed), and only the metadata is rewritten; ``asset.json`` records it.

Usage::

    python -m invcoss.assets.build                      # all four modalities into invcoss/assets
    python -m invcoss.assets.build --modality ct --epochs 2 --out /tmp/assets   # a quick try
    python -m invcoss.assets.build --threads 2          # another thread count (other bits)
    python -m invcoss.assets.build --data-summary-only  # add the data's spacing and value range only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from invcoss.assets import ASSETS_DIR, STATS_NAME
from invcoss.data import open_dataset, preprocess, write_phantoms
from invcoss.feature_stats import collect_feature_stats, load_feature_stats, save_feature_stats
from invcoss.models import MAE, create_model
from invcoss.pretrain import PretrainConfig, pretrain
from invcoss.rng import compute_record, pinned_compute

# Phantom files per modality: about 150-200 training samples each at the quick profile's sizes.
RECIPES = {
    "ct": {"count": 12},  # 64x160x160 at 2.5x1.6x1.6 mm → 13 windows of 16x96x96 each
    "mri": {"count": 32},  # 48x128x128 → 5 windows each
    "xray": {"count": 192},
    "pathology": {"count": 192},
}
EMBED_DIM = 64
EPOCHS = 30
BATCH_SIZE = 8
LR = 1e-3
SEED = 0


def build_one(modality: str, out: Path, work: Path, epochs: int = EPOCHS, log=print) -> dict:
    """Train and store the packaged model of ``modality`` in ``out/<modality>``; returns its record."""

    t0 = time.perf_counter()
    recipe = RECIPES[modality]
    scans, cache, ckpt = work / modality / "scans", work / modality / "cache", work / modality / "checkpoint"
    write_phantoms(scans, modality, recipe["count"], seed=SEED)
    report = preprocess(scans, cache, modality, "quick")
    data = open_dataset(cache, modality)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = create_model("vit_nano", name="vit_nano_w64", embed_dim=EMBED_DIM)
    config = PretrainConfig(epochs=epochs, batch_size=BATCH_SIZE, lr=LR, seed=SEED)
    log(f"{modality}: {report.samples} samples from {recipe['count']} phantoms; training {epochs} epochs")
    # Always from the start, over the checkpoint files of an earlier build in the same --work only.
    result = pretrain(model, data, ckpt, config, modality=modality, device="cpu", overwrite=True)
    target = out / modality
    target.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(target)  # float16 on disk; from_pretrained loads float32
    stored = MAE.from_pretrained(target).eval()
    stats = collect_feature_stats(stored, data, modality=modality, batch_size=16, out=target / STATS_NAME)
    record = {
        "modality": modality,
        "model": {"preset": "vit_nano", "overrides": {"embed_dim": EMBED_DIM}, "name": stored.config.name},
        "weights_dtype": "float16",
        "data": {
            "phantoms": recipe["count"],
            "phantom_seed": SEED,
            "profile": "quick",
            "samples": report.samples,
            "sample_shape": list(data.sample_shape),
        },
        "pretrain": {
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "seed": SEED,
            "loss_first_epoch": result.losses[0],
            "loss_last_epoch": result.losses[-1],
            "seconds": round(result.seconds, 1),
        },
        "stats": {
            "count": stats.count,
            "blocks": stats.num_layers,
            "tokens_x_width": list(stats.mean[0].shape),
        },
        "torch": torch.__version__,
        "compute": compute_record(),
        "command": f"python -m invcoss.assets.build --modality {modality} --epochs {epochs} "
        f"--threads {torch.get_num_threads()}",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (target / "asset.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"{modality}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.0f} s; "
        + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(target.iterdir()))
    )
    return record


def add_data_summary(modality: str, out: Path, work: Path, log=print) -> dict:
    """Add the data summary to the stored statistics of ``out/<modality>`` (see the module
    docstring); the statistics' tensors and the model stay as they are. Returns the summary as a dict."""
    recipe = RECIPES[modality]
    scans, cache = work / modality / "scans", work / modality / "cache"
    write_phantoms(scans, modality, recipe["count"], seed=SEED)
    preprocess(scans, cache, modality, "quick")
    data = open_dataset(cache, modality)
    target = out / modality
    stored = MAE.from_pretrained(target).eval()
    old = load_feature_stats(target / STATS_NAME, stored, modality=modality)
    again = collect_feature_stats(stored, data, modality=modality, batch_size=16)
    if again.count != old.count:
        raise ValueError(
            f"{modality}: the rebuilt data give {again.count} samples, the stored statistics {old.count}"
        )
    diff = max(
        float((a.double() - b.double()).abs().max())
        for a, b in zip(again.mean + again.var, old.mean + old.var)
    )
    save_feature_stats(dataclasses.replace(old, data=again.data), target / STATS_NAME)
    summary = json.loads(again.data.to_json())
    record_path = target / "asset.json"
    record = json.loads(record_path.read_text())
    record["stats"]["data"] = summary
    record["stats"]["data_added_by"] = "python -m invcoss.assets.build --data-summary-only"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    spacing = again.data.spacing.median if again.data.spacing else None
    log(
        f"{modality}: data spacing {spacing}, values {again.data.value_range}; statistics collected again "
        f"differ from the stored ones by at most {diff:.3g}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the packaged default models (fixed seeds).")
    parser.add_argument("--modality", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="default: the package's assets folder")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--work", type=Path, default=None, help="keep phantoms, caches and checkpoints here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, recorded (default: 1)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace models already in an --out other than the package's"
    )
    parser.add_argument(
        "--data-summary-only",
        action="store_true",
        help="keep the models and statistics; add the data's spacing and value range to the statistics files",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    modalities = list(RECIPES) if args.modality == "all" else [args.modality]
    if not args.overwrite and not args.data_summary_only and args.out.resolve() != ASSETS_DIR.resolve():
        names = ("config.json", "model.safetensors", STATS_NAME, "asset.json")
        found = [args.out / m / n for m in modalities for n in names if (args.out / m / n).exists()]
        if found:
            parser.error(f"{found[0]} exists; pass --overwrite to replace it, or choose another --out")
    work = args.work or Path(tempfile.mkdtemp(prefix="invcoss-assets-"))
    try:
        with pinned_compute(args.threads):
            for m in modalities:
                if args.data_summary_only:
                    add_data_summary(m, args.out, work)
                else:
                    build_one(m, args.out, work, args.epochs)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(p.stat().st_size for m in modalities for p in (args.out / m).iterdir())
    what = "added the data summary to" if args.data_summary_only else "built"
    print(f"{what} {len(modalities)} packaged model(s) in {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

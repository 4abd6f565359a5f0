"""The MRI generator's range: s·tanh fitted to the statistics' data against the former 4·tanh.

Usage::

    python benchmarks/mri_range.py [--seeds 0,1,2] [--samples 8] [--threads 2] [--out FILE.json]

Inverts the packaged MRI model with its statistics (quick profile) once per seed and range: the
default, whose generator spans [-s, s] with s the largest magnitude in the data the statistics
describe (3.42 z-scores for the packaged statistics), and the former fixed 4·tanh. The real
reference is the packaged model's own training data, rebuilt from the same phantoms (32 volumes,
seed 0, quick preprocessing). Per run: the final stat-matching loss (summed over blocks, mean over
batches), the median distance of the batch means from the target means in target std
(:func:`invcoss.inversion.report.mean_distance`), the total variation distance between the
synthetic and the real intensity histograms (8 equal bins over the fitted range), and the fraction
of values beyond the real data's largest magnitude. Prints one Markdown table: mean +- sd over
seeds per range and the paired difference (fitted - 4·tanh) with its t statistic; ``--out`` keeps
every value as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from invcoss.assets import load_default
from invcoss.data import open_dataset, preprocess, write_phantoms
from invcoss.inversion import InversionConfig, Inverter
from invcoss.inversion.report import intensity_histogram, mean_distance

METRICS = {
    "stat_loss": "stat-matching loss",
    "distance": "median distance (target std)",
    "hist_tv": "histogram TV distance to real",
    "beyond_data": "fraction beyond the data's largest magnitude",
}


def real_windows(work: Path) -> torch.Tensor:
    """The packaged MRI model's training windows: 32 phantoms of seed 0, quick preprocessing."""
    scans, cache = work / "scans", work / "cache"
    write_phantoms(scans, "mri", 32, seed=0)
    preprocess(scans, cache, "mri", "quick")
    data = open_dataset(cache, "mri")
    return torch.stack([data[i] for i in range(len(data))])


def histogram_distance(space, synthetic: torch.Tensor, real: torch.Tensor) -> float:
    p = intensity_histogram(space, [synthetic])
    q = intensity_histogram(space, [real])
    return 0.5 * sum(abs(p[k] - q[k]) for k in p)


def one_run(model, stats, seed: int, samples: int, fitted: bool, real: torch.Tensor) -> dict[str, float]:
    config = InversionConfig.from_profile("quick", "mri", seed=seed)
    inv = Inverter(model, stats, config, device="cpu")
    reference_space = inv.space  # the fitted one: both runs' histograms use its bins
    if not fitted:
        inv.space = config.space  # the modality's own range, 4·tanh
    t0 = time.perf_counter()
    result = inv.generate(samples)
    x = result.images
    return {
        "stat_loss": sum(b.stat_loss for b in result.batches) / len(result.batches),
        "distance": sum(mean_distance(inv, b.images) for b in result.batches) / len(result.batches),
        "hist_tv": histogram_distance(reference_space, x, real),
        "beyond_data": float((x.abs() > real.abs().max()).float().mean()),
        "seconds": time.perf_counter() - t0,
    }


def summary(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    model, stats = load_default("mri")
    with tempfile.TemporaryDirectory() as work:
        real = real_windows(Path(work))
    runs: dict[str, list[dict]] = {"fitted": [], "4tanh": []}
    for seed in seeds:
        for name in runs:
            runs[name].append(one_run(model, stats, seed, args.samples, name == "fitted", real))
            print(f"seed {seed} {name}: {json.dumps(runs[name][-1])}", flush=True)
    largest = float(real.abs().max())
    print(f"\nMRI range, {len(seeds)} seeds, {args.samples} samples each, {args.threads} threads")
    print(f"(real data: {real.shape[0]} windows, largest magnitude {largest:.3g})\n")
    print("| metric | s·tanh (fitted) | 4·tanh | paired difference | t |")
    print("|---|---:|---:|---:|---:|")
    for key, label in METRICS.items():
        a = [r[key] for r in runs["fitted"]]
        b = [r[key] for r in runs["4tanh"]]
        d = [x - y for x, y in zip(a, b)]
        (ma, sa), (mb, sb), (md, sd) = summary(a), summary(b), summary(d)
        t = md / (sd / math.sqrt(len(d))) if sd > 0 else float("nan")
        print(f"| {label} | {ma:.4g} +- {sa:.2g} | {mb:.4g} +- {sb:.2g} | {md:+.3g} +- {sd:.2g} | {t:.2f} |")
    if args.out:
        args.out.write_text(
            json.dumps({"seeds": seeds, "runs": runs, "real_largest_magnitude": largest}, indent=2)
        )


if __name__ == "__main__":
    main()

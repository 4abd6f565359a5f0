"""Held-out loss of the forgetting experiment's first stage against its epoch budget.

Usage::

    python benchmarks/stage1_curve.py [--epochs 8,16,32,48,64,96] [--out DIR] [--threads 1]

Trains the first stage of the ``quick`` forgetting experiment (X-ray phantoms: the experiment's
training files, seed 0) once per budget, each with its own warm-up and cosine decay as
``ContinualConfig.first_stage_epochs`` gives it, and scores the held-out X-ray phantoms (seed 1)
after every epoch with the experiment's evaluation (:func:`invcoss.continual.eval.reconstruction_loss`,
2 masks per sample). Prints one Markdown table (held-out loss at the end of each budget, and along
the longest run) and writes it with every per-epoch value to ``OUT/stage1_curve.json``, and the
curves to ``OUT/stage1_curve.png`` (docs/stage1_curve.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invcoss.continual.eval import reconstruction_loss
from invcoss.continual.experiment import ForgettingExperiment
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.replay import AuditedDataset
from invcoss.continual.train import train_stage
from invcoss.data import get_config, open_dataset, preprocess, write_phantoms
from invcoss.models import create_model, preset_config
from invcoss.pretrain import STATE_NAME


def _data(out: Path, exp: ForgettingExperiment, modality: str, n_train: int, n_test: int):
    model = preset_config(exp.base.preset, **exp.base.model_overrides())
    config = get_config(modality, "quick", size=model.img_size(2), channels=model.in_chans(2))
    sets = {}
    for split, count, seed in (("train", n_train, exp.seed), ("test", n_test, exp.seed + 1)):
        src, cache = out / "phantoms" / split, out / "cache" / split
        if not cache.exists():
            write_phantoms(src, modality, count, seed=seed)
            preprocess(src, cache, modality, config=config)
        sets[split] = open_dataset(cache, modality)
    return sets


def plot(curves: dict[int, list[float]], path: Path, every: int = 4) -> Path:
    """The held-out loss after every ``every``-th epoch of each budget's run, one line per budget."""
    longest = max(curves)
    epochs = list(range(every, longest + 1, every))
    series = {
        f"{b} epochs": [c[e - 1] if e <= len(c) else None for e in epochs] for b, c in sorted(curves.items())
    }
    labels = [str(e) if e % (4 * every) == 0 else "" for e in epochs]
    panel = Panel("first stage (X-ray): held-out loss after each epoch", labels, series)
    return line_plot(path, [panel], "x: epoch; one line per first-stage budget", panel_size=(900, 420))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", default="8,16,32,48,64,96", help="first-stage budgets, comma-separated")
    p.add_argument("--out", type=Path, default=Path("stage1-curve"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exp = ForgettingExperiment.from_size("quick")
    modality = exp.base.order[0]
    n_train, n_test = next((a, b) for m, a, b in exp.files if m == modality)
    sets = _data(args.out, exp, modality, n_train, n_test)
    budgets = [int(e) for e in args.epochs.split(",")]
    curves: dict[int, list[float]] = {}
    train_curves: dict[int, list[float]] = {}
    for budget in budgets:
        config = exp.base.replace(method="seq", first_stage_epochs=budget)
        torch.manual_seed(config.seed)
        model = create_model(config.preset, **config.model_overrides())
        held_out: list[float] = []

        def score(step, model=model, held_out=held_out, batch_size=config.stats_batch_size) -> None:
            if step.step == step.steps:
                held_out.append(
                    reconstruction_loss(
                        model, sets["test"], repeats=exp.eval_repeats, seed=exp.seed,
                        batch_size=batch_size,
                    )
                )  # fmt: skip

        folder = args.out / f"run-{budget}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_NAME).unlink(missing_ok=True)
        t0 = time.perf_counter()
        history, _ = train_stage(
            model, None, AuditedDataset(sets["train"], modality), {}, config, folder, 0,
            torch.device("cpu"), on_step=score,
        )  # fmt: skip
        curves[budget] = held_out
        train_curves[budget] = [h["mae"] for h in history]
        print(
            f"{budget:3d} epochs ({history[0]['steps'] * budget} steps, {time.perf_counter() - t0:.0f} s): "
            f"held-out {held_out[-1]:.4f}, training {train_curves[budget][-1]:.4f}",
            flush=True,
        )
    longest = max(budgets)
    lines = [
        "| first-stage epochs | steps | held-out loss at its end | training loss, last epoch |",
        "|---:|---:|---:|---:|",
    ]
    steps = -(-n_train // exp.base.batch_size)
    for b in budgets:
        lines.append(f"| {b} | {b * steps} | {curves[b][-1]:.4f} | {train_curves[b][-1]:.4f} |")
    lines += ["", f"Along the {longest}-epoch run:", "", "| epoch | held-out loss |", "|---:|---:|"]
    lines += [f"| {e} | {curves[longest][e - 1]:.4f} |" for e in range(4, longest + 1, 4)]
    table = "\n".join(lines)
    print(table)
    plot(curves, args.out / "stage1_curve.png")
    (args.out / "stage1_curve.json").write_text(
        json.dumps(
            {
                "modality": modality,
                "train_files": n_train,
                "test_files": n_test,
                "threads": args.threads,
                "held_out": {str(b): c for b, c in curves.items()},
                "training": {str(b): c for b, c in train_curves.items()},
                "table": table,
            },
            indent=1,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()

"""``invcoss-cli continual | evaluate | storage | experiment forgetting``: Stage 2 and its evidence.

Thin layers over :mod:`invcoss.continual`, :mod:`invcoss.continual.eval` and
:mod:`invcoss.continual.experiment`, with progress bars on stderr and a one-line summary on stdout. A user
error (unknown modality, missing folder, an existing run without ``--resume``, data of the wrong
size) exits with code 2 and a message, no traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path

import click

from invcoss.cli.data import Dims, human_bytes, open_data
from invcoss.cli.options import (
    PRESET,
    UserError,
    check_new_files,
    check_output_folder,
    device_option,
    progress_bar,
    threads_option,
)
from invcoss.cli.output import echo_json, json_option
from invcoss.cli.replay import config_option, saved_fields, saved_run
from invcoss.cli.runlog import StepRate, log_continual_event, metrics_log, tensorboard_option
from invcoss.modality import canonical_modality, get_modality

_METHODS = click.Choice(["seq", "er", "invcoss"])
_PROFILES = click.Choice(["quick", "paper"])


class ModalityMap(click.ParamType):
    """``ct=DIR,mri=DIR`` → ``{"ct": Path, "mri": Path}`` (``path`` means pathology)."""

    name = "modality=PATH,..."

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        out: dict[str, Path] = {}
        for item in str(value).split(","):
            if not item.strip():
                continue
            key, sep, path = item.partition("=")
            if not sep or not path.strip():
                self.fail(f"expected modality=PATH pairs separated by commas, got {item!r}", param, ctx)
            try:
                modality = canonical_modality(key.strip())
            except ValueError as e:
                self.fail(str(e), param, ctx)
            if modality in out:
                self.fail(f"{modality} is given twice", param, ctx)
            out[modality] = Path(path.strip())
        if not out:
            self.fail("no modality=PATH pair given", param, ctx)
        return out


def _signed(value: float | None) -> str:
    """``+0.1234``, or ``n/a`` for a missing value (no patch of a region, no probe)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:+.4f}"


def _order(value: str) -> tuple[str, ...]:
    try:
        return tuple(canonical_modality(m.strip()) for m in value.split(",") if m.strip())
    except ValueError as e:
        raise UserError(f"--order: {e}") from None


def _model_stub(config):
    """An object with the ``config`` of the run's model, for opening data at its input size."""
    from invcoss.models import preset_config

    return types.SimpleNamespace(config=preset_config(config.preset, **config.model_overrides()))


_THREADS = threads_option()
_EXPERIMENT_THREADS = threads_option(default=1)


_INVERSION_STEPS = click.option(
    "--inversion-steps", type=click.IntRange(min=1), default=None,
    help="invcoss: steps per inversion batch (default: the inversion profile's; 100 in experiment forgetting).",
)  # fmt: skip
_INVERSION_WARMUP = click.option(
    "--inversion-warmup-steps", type=click.IntRange(min=1), default=None,
    help="invcoss: steps of a fresh generator's first batch (default: the inversion profile's; 200 in experiment forgetting).",
)  # fmt: skip

_FIRST_STAGE_EPOCHS = click.option(
    "--first-stage-epochs", type=click.IntRange(min=1), default=None,
    help="Epochs of the first stage (default: --epochs; 96 in experiment forgetting).",
)  # fmt: skip


_FLAT_STD = click.option(
    "--buffer-mae-flat-std", type=click.FloatRange(min=0), default=None,
    help="Leave buffer patches with a raw pixel std below this out of the buffer MAE term (0: keep all).",
)  # fmt: skip


_MAE_TARGET = click.option(
    "--buffer-mae-target", type=click.Choice(["pixels", "teacher", "auto"]), default=None,
    help="What the buffer MAE term reconstructs: the buffer's pixels, the previous model's reconstruction, "
    "or auto (teacher for a synthetic buffer, pixels for a real one; the quick profile's).",
)  # fmt: skip


@click.command()
@config_option("continual")
@click.option("--order", required=True, help="Modalities in stage order, e.g. ct,mri,xray.")
@click.option("--method", type=_METHODS, default="invcoss", show_default=True, help="Replay method.")
@click.option(
    "--data", type=ModalityMap(), required=True, help="ct=DIR,mri=DIR,...: a cache or scan folder each."
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--profile", type=_PROFILES, default="quick", show_default=True, help="Settings profile.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--preset", type=PRESET, default=None, help="MAE preset (default: the profile's).")
@click.option(
    "--img-size-2d", type=Dims(int, "112x112"), default=None, help="2D model input (default: the preset's)."
)
@click.option(
    "--img-size-3d", type=Dims(int, "16x96x96"), default=None, help="3D model input (default: the preset's)."
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per stage.")
@_FIRST_STAGE_EPOCHS
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per step (default: the profile's), over all ranks under torchrun.",
)
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option(
    "--buffer-fraction", type=float, default=None, help="Buffer per earlier stage (0.01, 0.05, 0.10)."
)
@click.option("--distill-weight", type=float, default=None, help="Feature distillation weight (1).")
@click.option("--buffer-mae-weight", type=float, default=None, help="MAE weight on buffer batches (0: off).")
@_FLAT_STD
@_MAE_TARGET
@click.option("--mixup-alpha", type=float, default=None, help="Buffer mixup Beta(a, a) (0: off).")
@click.option("--interleave", type=click.Choice(["shuffle", "alternate"]), default=None)
@click.option(
    "--buffer-every", type=click.IntRange(min=1), default=None, help="Current batches per buffer batch."
)
@_INVERSION_STEPS
@_INVERSION_WARMUP
@click.option(
    "--inversion-batch-size", type=click.IntRange(min=1), default=None, help="Default: the profile's."
)
@click.option("--seed", type=int, default=0, show_default=True)
@tensorboard_option
@device_option()
@_THREADS
def continual(order, method, data, out, profile, resume, tensorboard, device, threads, **overrides) -> None:
    """Continual pre-training over modalities with seq, er or invcoss replay (Algorithm 1).

    The CPU thread count is a setting of the run, recorded in continual.json; --resume continues at
    the recorded count and refuses another --threads. Under ``torchrun -m invcoss.cli continual``
    the ranks train with DistributedDataParallel, each computing its part of every current and
    buffer batch (--batch-size is the global batch); rank 0 writes the run folder, and --resume
    may use another number of ranks. Every training and inversion step is logged to
    OUT/metrics.jsonl (docs/cli.md).
    """
    check_output_folder(out)
    from invcoss.continual import run_continual
    from invcoss.continual.config import ContinualConfig
    from invcoss.continual.eval import storage_report
    from invcoss.continual.replay import DataAccessError
    from invcoss.inversion import NonFiniteLossError

    values = {k: v for k, v in overrides.items() if v is not None}
    values |= {"method": method, "order": _order(order)}
    saved = saved_run()
    if saved is not None:
        values = saved_fields(
            ContinualConfig.from_dict(saved["config"]).to_dict(), values, exclude=["profile"]
        )
    try:
        config = ContinualConfig.from_profile(profile, **values)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    stray = sorted(set(data) - set(config.order))
    if stray:
        raise UserError(f"--data names {', '.join(stray)}, which --order {','.join(config.order)} does not")
    stub = _model_stub(config)
    sources = {m: (lambda p=p, m=m: open_data(p, m, stub)) for m, p in data.items()}
    from invcoss.cli.torchrun import torchrun_session

    log = metrics_log(out, resume=resume, tensorboard=tensorboard)
    epoch_losses: dict[str, list[float]] = {}
    rate = StepRate()
    # Under torchrun: DistributedDataParallel over the ranks, rank 0 writes the files, the log and prints.
    with torchrun_session(device) as ctx, progress_bar() as bar, log:
        tasks: dict[tuple, int] = {}

        def on_event(e) -> None:
            log_continual_event(log, e, epoch_losses, rate)
            i = e.info
            if e.kind == "train":
                key = ("train", e.stage)
                if key not in tasks:
                    tasks[key] = bar.add_task(f"stage {e.stage + 1} {e.modality}", total=None, info="")
                s = e.step
                losses = " ".join(f"{k} {v:.4f}" for k, v in s.losses.items())
                bar.update(
                    tasks[key], completed=s.done, total=s.total,
                    info=f"epoch {s.epoch}/{s.epochs} {losses} {s.samples_per_s:.1f} samples/s",
                )  # fmt: skip
            elif e.kind == "invert":
                key = ("invert", e.stage, i["source"], i["batch"])
                if key not in tasks:
                    desc = f"invert {i['source']} batch {i['batch'] + 1}/{i['batches']}"
                    tasks[key] = bar.add_task(desc, total=i["steps"], info="")
                loss = i["loss"]
                bar.update(
                    tasks[key], completed=i["step"], info=f"loss {loss:.4f}" if loss is not None else ""
                )
            elif e.kind == "stage_end":
                for key in [k for k in tasks if k[1] == e.stage]:
                    bar.remove_task(tasks.pop(key))

        try:
            dev = ctx.device if ctx is not None else device
            result = run_continual(
                sources, out, config, resume=resume, device=dev, on_event=on_event, threads=threads
            )
        except ValueError as e:
            raise UserError(str(e)) from None
        except (NonFiniteLossError, FloatingPointError, DataAccessError) as e:
            raise click.ClickException(str(e)) from None
    if ctx is not None and not ctx.is_main:
        return
    storage = storage_report(out)
    kept = sum(r.replay_bytes for r in storage)
    ran = sum(1 for s in result.stages if s.epochs_run)
    last = {s.modality: s.history[-1]["mae"] for s in result.stages if s.history}
    losses = ", ".join(f"{m} {v:.4f}" for m, v in last.items())
    what = {"er": "real buffer", "invcoss": "statistics"}.get(method)
    kept_text = f"{human_bytes(kept)} of {what} + the" if what else "no data, only the"
    click.echo(
        f"{method}: {len(result.stages)} stages {' -> '.join(config.order)} ({ran} trained now) in "
        f"{result.seconds:.0f} s; last-epoch MAE loss {losses}; kept {kept_text} "
        f"{human_bytes(storage[-1].checkpoint_bytes)} checkpoint -> {out}"
    )


@click.command()
@click.option(
    "--checkpoints",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="A continual run folder.",
)
@click.option("--data", type=ModalityMap(), required=True, help="Held-out data: ct=DIR,mri=DIR,...")
@click.option(
    "--labels", type=ModalityMap(), default=None, help="Labelled CSVs for the probe: xray=labels.csv,..."
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: RUN/eval."
)
@click.option("--mask-repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the fixed masks.")
@click.option(
    "--overwrite", is_flag=True, help="Replace retention.csv/json/png already in the output folder."
)
@json_option
@device_option()
@_THREADS
def evaluate(
    checkpoints, data, labels, out, mask_repeats, batch_size, seed, overwrite, as_json, device, threads
) -> None:
    """Held-out loss (overall, background / structured patches, raw pixels), forgetting and probe of every stage (Fig. 6b).

    Writes retention.csv, retention.json and retention.png into --out (default RUN/eval); files
    of those names already there are kept, with exit 2 before any evaluation, unless --overwrite.
    """
    from invcoss.continual import read_run
    from invcoss.continual.eval import evaluate_run
    from invcoss.continual.probe import read_labelled_csv
    from invcoss.rng import pinned_compute

    try:
        config = read_run(checkpoints)
    except ValueError as e:
        raise UserError(str(e)) from None
    stray = sorted((set(data) | set(labels or {})) - set(config.order))
    if stray:
        raise UserError(f"{', '.join(stray)} not in the run's order {','.join(config.order)}")
    out = out or checkpoints / "eval"
    check_new_files([out / f"retention.{ext}" for ext in ("csv", "json", "png")], overwrite)
    check_output_folder(out)
    stub = _model_stub(config)
    try:
        held_out = {m: open_data(p, m, stub) for m, p in data.items()}
        labelled = {}
        for m, p in (labels or {}).items():
            ndim = get_modality(m).ndim
            labelled[m] = read_labelled_csv(
                p, m, stub.config.img_size(ndim), channels=stub.config.in_chans(ndim), seed=seed
            )
    except ValueError as e:
        raise UserError(str(e)) from None
    with progress_bar() as bar, pinned_compute(threads):
        task = bar.add_task("evaluate", total=None, info="")
        try:
            table = evaluate_run(
                checkpoints, held_out, labelled, repeats=mask_repeats, seed=seed, batch_size=batch_size,
                device=device,
                on_progress=lambda done, total, what: bar.update(task, completed=done, total=total, info=what),
            )  # fmt: skip
        except ValueError as e:
            raise UserError(str(e)) from None
    if not table.rows:
        raise UserError(f"no finished stage of {checkpoints} has seen {', '.join(held_out)} yet")
    paths = table.write(out)
    if as_json:
        fields = (
            "forgetting",
            "forgetting_background",
            "forgetting_structured",
            "raw_forgetting",
            "probe_forgetting",
        )
        echo_json({
            "run": str(checkpoints), "method": config.method, "order": list(config.order),
            "rows": [dataclasses.asdict(r) for r in table.rows],
            "mean_forgetting": {f: table.mean_forgetting(f) for f in fields},
            "files": {k: str(v) for k, v in paths.items()},
        })  # fmt: skip
        return
    for r in table.rows:
        probe = f" probe {r.probe_accuracy:.3f}" if r.probe_accuracy is not None else ""
        click.echo(
            f"stage {r.stage} {r.stage_modality:>9}: {r.modality:>9} loss {r.loss:.4f} forgetting {r.forgetting:+.4f} "
            f"(background {_signed(r.forgetting_background)} in {r.background_patches} patches, "
            f"structured {_signed(r.forgetting_structured)}; raw pixels {_signed(r.raw_forgetting)}){probe}"
        )
    stages = max(r.stage for r in table.rows)
    forgetting = table.mean_forgetting()
    mean = f"mean forgetting {forgetting:+.4f}" if forgetting is not None else "no earlier modality to forget"
    if forgetting is not None:
        parts = [
            f"{name} {_signed(table.mean_forgetting(field))}"
            for name, field in (("structured", "forgetting_structured"), ("raw", "raw_forgetting"))
        ]
        probe = table.mean_forgetting("probe_forgetting")
        parts += [f"probe {probe:+.3f}"] if probe is not None else []
        mean += f" ({', '.join(parts)})"
    click.echo(
        f"evaluated {stages} checkpoints of {config.method} on {len(held_out)} modalities: {mean}; "
        f"wrote {paths['csv']} and {paths.get('png', paths['json'])}"
    )


@click.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@json_option
def storage(run: Path, as_json: bool) -> None:
    """Bytes a run keeps between stages: real buffer (er), statistics (invcoss), checkpoint (Fig. 6a)."""
    from invcoss.continual.eval import storage_report

    try:
        rows = storage_report(run)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not rows:
        raise UserError(f"{run} has no finished stage")
    if as_json:
        stages = [dataclasses.asdict(r) | {"kept_after": r.kept_after} for r in rows]
        echo_json({
            "run": str(run), "method": rows[0].method, "stages": stages,
            "replay_bytes": sum(r.replay_bytes for r in rows), "checkpoint_bytes": rows[-1].checkpoint_bytes,
        })  # fmt: skip
        return
    for r in rows:
        source = f" (files {human_bytes(r.source_bytes)})" if r.source_bytes else ""
        kept = (
            f"{r.kept_after} {human_bytes(r.replay_bytes)} = {r.replay_bytes / r.data_bytes:.2%} of its data"
            if r.replay_bytes
            else "nothing of its data"
        )
        click.echo(
            f"stage {r.stage} {r.modality:>9}: {kept} {human_bytes(r.data_bytes)}{source}, "
            f"checkpoint {human_bytes(r.checkpoint_bytes)}"
        )
    total = sum(r.replay_bytes for r in rows)
    checkpoint = human_bytes(rows[-1].checkpoint_bytes)
    what = f"{human_bytes(total)} of {rows[0].kept_after} + " if total else "no data, only "
    click.echo(f"{rows[0].method} keeps {what}the {checkpoint} checkpoint after {len(rows)} stages")


@click.group()
def experiment() -> None:
    """Benchmark-style experiments on phantom data."""


@experiment.command()
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("forgetting"), show_default=True
)
@click.option("--size", type=click.Choice(["quick", "tiny"]), default="quick", show_default=True)
@click.option("--methods", default="seq,er,invcoss", show_default=True, help="Methods to compare.")
@click.option("--resume", is_flag=True, help="Continue the runs in --out.")
@click.option(
    "--seeds", type=click.IntRange(min=1), default=1, show_default=True,
    help="Full repeats with their own phantom, model and inversion seeds, in --out/seed-<k>, "
    "reported as mean +- sd with paired differences (1: one run in --out itself).",
)  # fmt: skip
@click.option(
    "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
    help="With --seeds: repeats run at once, each in its own process at --threads (same numbers).",
)  # fmt: skip
@device_option()
@click.option("--distill-weight", type=float, default=None, help="Feature distillation weight (1).")
@click.option("--buffer-mae-weight", type=float, default=None, help="MAE weight on buffer batches (0: off).")
@_FLAT_STD
@_MAE_TARGET
@_FIRST_STAGE_EPOCHS
@_INVERSION_STEPS
@_INVERSION_WARMUP
@tensorboard_option
@_EXPERIMENT_THREADS
def forgetting(
    out: Path,
    size: str,
    methods: str,
    resume: bool,
    seeds: int,
    jobs: int,
    device,
    distill_weight: float | None,
    buffer_mae_weight: float | None,
    buffer_mae_flat_std: float | None,
    buffer_mae_target: str | None,
    first_stage_epochs: int | None,
    inversion_steps: int | None,
    inversion_warmup_steps: int | None,
    tensorboard: bool,
    threads: int,
) -> None:
    """seq vs er vs invcoss on phantom X-ray, CT and MRI: forgetting and storage table.

    Every training and inversion step of every method (and repeat) is logged to
    OUT/metrics.jsonl, with ``method`` (and ``seed``) in each line (docs/cli.md).

    Runs at one CPU thread unless --threads says otherwise, so the table does not depend on the
    machine; the count is recorded in experiment.json.
    With ``--seeds K`` > 1, K full repeats in ``--out/seed-<k>`` and their summary
    (``seeds.md``, ``seeds.csv``, ``seeds_paired.csv``, ``seeds.json``, ``seeds.png``).
    Without --resume a folder that already holds the experiment's runs or tables
    (forgetting.csv/md, experiment.json, retention.png; with --seeds the seeds.* files) is
    refused (exit 2); --resume continues them and rewrites the tables.
    """
    if not resume:
        names = ("forgetting.csv", "forgetting.md", "experiment.json", "retention.png")
        if seeds > 1:
            names = ("seeds.csv", "seeds_paired.csv", "seeds.md", "seeds.json", "seeds.png")
        found = [out / n for n in names if (out / n).exists()]
        if found:
            raise UserError(
                f"{found[0]} exists; pass --resume to continue the experiment in {out}, or choose another --out"
            )
    check_output_folder(out)
    from invcoss.continual.experiment import ForgettingExperiment, run_forgetting_experiment
    from invcoss.continual.seeds import run_seeds

    overrides = {
        "inversion_steps": inversion_steps,
        "inversion_warmup_steps": inversion_warmup_steps,
        "distill_weight": distill_weight,
        "buffer_mae_weight": buffer_mae_weight,
        "buffer_mae_flat_std": buffer_mae_flat_std,
        "buffer_mae_target": buffer_mae_target,
        "first_stage_epochs": first_stage_epochs,
    }
    try:
        exp = ForgettingExperiment.from_size(size, **{k: v for k, v in overrides.items() if v is not None})
        exp = dataclasses.replace(exp, methods=tuple(m.strip() for m in methods.split(",") if m.strip()))
    except ValueError as e:
        raise UserError(str(e)) from None
    log = metrics_log(out, resume=resume, tensorboard=tensorboard)
    epoch_losses: dict[tuple, dict[str, list[float]]] = {}
    rates: dict[tuple, StepRate] = {}
    with progress_bar() as bar, log:
        tasks: dict[str, int] = {}

        def on_event(e, seed: int | None = None) -> None:
            if e.phase == "continual":
                key = (seed, e.method)
                where = {"method": e.method} | ({"seed": seed} if seed is not None else {})
                log_continual_event(
                    log, e.info["event"], epoch_losses.setdefault(key, {}), rates.setdefault(key, StepRate()),
                    **where,
                )  # fmt: skip
            if e.phase == "seed":
                if "seeds" not in tasks:
                    tasks["seeds"] = bar.add_task("seeds", total=e.info["seeds"], info="")
                kept = " (finished earlier)" if e.info["kept"] else ""
                bar.update(tasks["seeds"], completed=e.info["seed"], info=f"seed {e.info['seed']}{kept}")
                return
            if e.phase == "data":
                key = "data"
                info = f"{e.info['split']} {e.info['modality']}"
            elif e.phase == "evaluate":
                key, info = f"evaluate {e.method}", e.info["what"]
            else:
                ev = e.info["event"]
                if ev.kind not in ("train", "invert"):
                    return
                key = f"{e.method} {'invert' if ev.kind == 'invert' else 'train'}"
                i = ev.info
                if ev.kind == "train":
                    mae = ev.step.losses.get("mae", float("nan"))
                    info = f"stage {ev.stage + 1} {ev.modality} epoch {ev.step.epoch}/{ev.step.epochs} mae {mae:.4f}"
                else:
                    info = f"stage {ev.stage + 1}: {i['source']} batch {i['batch'] + 1}/{i['batches']} step {i['step']}/{i['steps']}"
            if key not in tasks:
                tasks[key] = bar.add_task(key, total=None, info="")
            bar.update(tasks[key], advance=1, info=info)

        try:
            if seeds > 1:
                result = run_seeds(
                    out, exp, seeds, resume=resume, device=device, on_event=lambda k, e: on_event(e, k),
                    threads=threads, jobs=jobs,
                )  # fmt: skip
            else:
                result = run_forgetting_experiment(
                    out, exp, resume=resume, device=device, on_event=on_event, threads=threads
                )
        except ValueError as e:
            raise UserError(str(e)) from None
    if seeds > 1:
        click.echo(result.markdown(), nl=False)
        means = {r["method"]: r for r in result.summary.table if r["modality"] == "mean"}
        parts = ", ".join(
            f"{m} {r['forgetting_mean']:+.4f} +- {r['forgetting_sd']:.4f}" for m, r in means.items()
        )
        click.echo(
            f"mean forgetting over {', '.join(exp.base.order[:-1])}, {seeds} seeds: {parts}; "
            f"{seeds} repeats in {result.seconds:.0f} s -> {out / 'seeds.md'}"
        )
        return
    click.echo(result.markdown(), nl=False)
    for name, field in (
        ("background patches", "forgetting_background"), ("structured patches", "forgetting_structured"),
        ("raw pixels", "raw_forgetting"), ("probe accuracy drop", "probe_forgetting"),
    ):  # fmt: skip
        values = ", ".join(f"{m} {_signed(v)}" for m, v in result.mean_forgetting(field).items())
        click.echo(f"mean forgetting, {name}: {values}")
    mean = result.mean_forgetting()
    parts = ", ".join(f"{m} {v:+.4f}" for m, v in mean.items())
    click.echo(
        f"mean forgetting over {', '.join(exp.base.order[:-1])}: {parts}; {len(exp.methods)} run{'s' if len(exp.methods) > 1 else ''} in "
        f"{result.seconds:.0f} s -> {out / 'forgetting.md'}"
    )

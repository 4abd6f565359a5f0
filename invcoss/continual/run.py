"""Continual pre-training across modalities with replay (Stage 2 of Algorithm 1, Eq. 4, Sec. 3.2).

:func:`run_continual` trains one MAE through ``config.order``, one stage per modality. Stage ``T``
starts from the model of stage ``T-1`` and trains on single-modality batches: the current data
with the MAE loss, and the buffer with feature distillation against the frozen stage ``T-1`` model
(plus an optional MAE term and mixup, :mod:`invcoss.continual.replay`). The buffer depends on the
method (:mod:`invcoss.continual.config`): nothing (``seq``), real samples kept from earlier stages
(``er``), or samples inverted at the start of the stage from the stage ``T-1`` model and each
earlier stage's stored statistics (``invcoss``, :class:`invcoss.inversion.Inverter`).

Every stage ends by saving the checkpoint (encoder *and* decoder: the next inversion's L_task needs
the decoder) and collecting the feature statistics of its data (Appendix B.2). ``er`` also keeps its
random buffer fraction of the stage's samples. The real data of a stage is opened when the stage
starts and read only through an :class:`~invcoss.continual.replay.AuditedDataset` that is sealed
when the stage ends: a later read raises, and the number of reads is recorded per stage.

The run folder's layout: :mod:`invcoss.continual.layout`.

Resuming (``resume=True``) skips finished stages without opening their data, continues a stage from
its last finished epoch (model, AdamW moments and RNG state), and reuses synthetic samples already
written. Each file is written atomically. Nothing else is replaced: without ``resume`` a folder
holding a run is refused, and a folder holding stage folders of the order but no ``continual.json``
is refused either way.

A run is a function of its settings: the configuration and the CPU thread count (``threads``,
recorded as ``compute`` in ``continual.json`` and every ``stage.json``). At one thread count two runs
give bit-identical checkpoints, losses and synthetic samples, in one process or two and under any
load; at another count they differ (reductions in conv3d, conv_transpose3d and group_norm are summed
in another order, by about 1e-6, and the inversion amplifies it), so resuming at another count is
refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from invcoss import distributed
from invcoss.continual.config import ContinualConfig, buffer_count
from invcoss.continual.layout import (
    BUFFER_NAME,
    REPLAY_DIR,
    RUN_FORMAT,
    RUN_NAME,
    STAGE_NAME,
    STATS_NAME,
    StageSummary,
    read_run,
    stage_dir,
    stage_done,
)
from invcoss.continual.replay import AuditedDataset, load_samples, save_samples
from invcoss.continual.train import train_stage
from invcoss.data.atomic import atomic_write_json
from invcoss.feature_stats import collect_feature_stats, load_feature_stats
from invcoss.inversion.run import Inverter
from invcoss.inversion.shards import generate_shared
from invcoss.models import MAE, create_model
from invcoss.models.checkpoint import checkpoint_weights_hash
from invcoss.pretrain import STATE_NAME
from invcoss.rng import derive_seed, keeps_global_rng, pinned_compute, resolve_threads
from invcoss.training import TrainStep

__all__ = ["ContinualEvent", "ContinualResult", "run_continual"]


@dataclass(frozen=True)
class ContinualEvent:
    """Progress of a run, for displays and audits.

    ``kind``: ``stage_start``, ``stage_skip`` (finished earlier), ``invert`` (one inversion step),
    ``train`` (one training step), ``stats`` (one statistics batch) or ``stage_end``. ``stage`` is
    0-based. A ``train`` event carries its :class:`~invcoss.training.TrainStep` as ``step`` (and
    the same fields in ``info``).
    """

    kind: str
    stage: int
    modality: str
    info: dict = field(default_factory=dict)
    step: TrainStep | None = None


@dataclass
class ContinualResult:
    """What :func:`run_continual` did; ``stages`` holds every stage, finished earlier or now."""

    out: Path
    config: ContinualConfig
    stages: list[StageSummary]
    seconds: float


def _open_source(source, modality: str):
    """A Dataset / ``(N, C, *S)`` tensor as is, or the result of calling a factory."""
    from torch.utils.data import Dataset

    if isinstance(source, Dataset | torch.Tensor):
        return source
    if callable(source):
        return source()
    raise TypeError(
        f"data for {modality} must be a Dataset, a (N, C, *S) tensor or a callable returning one, "
        f"got {type(source).__name__}"
    )


def _check_shape(ds: AuditedDataset, model: nn.Module, modality: str) -> tuple[int, ...]:
    shape = getattr(ds.data, "sample_shape", None)
    shape = tuple(shape) if shape is not None else tuple(ds[0].shape)
    ndim = len(shape) - 1
    cfg = model.config
    expected = (cfg.in_chans(ndim), *cfg.img_size(ndim)) if ndim in (2, 3) else None
    if shape != expected:
        raise ValueError(
            f"the {modality} data gives samples of shape {shape}, but model {cfg.name} takes "
            f"{expected}; preprocess at the model's input size"
        )
    if len(ds) == 0:
        raise ValueError(f"the {modality} data is empty")
    return shape


def _recorded_threads(out: Path) -> int | None:
    """The thread count ``RUN/continual.json`` records (None for a new folder or an older run)."""
    try:
        return int(json.loads((out / RUN_NAME).read_text())["compute"]["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_folder(out: Path, config: ContinualConfig) -> None:
    """Refuse a folder that holds stage folders of this order but no run header (``continual.json``).

    Without the header the stage folders are no run this one can continue or may replace (another
    tool's, or a copy): resuming would take their checkpoints as its own, a new run would write
    over them.
    """
    if (out / RUN_NAME).exists():
        return
    found = [stage_dir(out, t, m) for t, m in enumerate(config.order) if stage_dir(out, t, m).exists()]
    if found:
        raise ValueError(
            f"{found[0]} exists, but {out} has no {RUN_NAME}: it holds no continual run to resume and "
            "is not replaced; use a new folder"
        )


def _run_header(out: Path, config: ContinualConfig, resume: bool, compute: dict) -> None:
    path = out / RUN_NAME
    if path.exists():
        if not resume:
            raise ValueError(
                f"{out} already holds a continual run; pass resume=True (--resume) or use a new folder"
            )
        saved = read_run(out)
        diff = [
            f"{k}: run {getattr(saved, k)!r}, now {getattr(config, k)!r}"
            for k in config.to_dict()
            if getattr(saved, k) != getattr(config, k)
        ]
        if diff:
            raise ValueError(f"cannot resume {out}: the configuration differs ({'; '.join(diff)})")
    stages = [stage_dir(out, t, m).name for t, m in enumerate(config.order)]
    header = {"format": RUN_FORMAT, "config": config.to_dict(), "stages": stages, "compute": compute}
    # Every rank has checked the folder before rank 0 writes the header (a rank that looked after it
    # would take the new header for an earlier run).
    distributed.barrier()
    if distributed.is_main():
        atomic_write_json(path, header)


@keeps_global_rng
def run_continual(
    data: Mapping[str, object],
    out: str | Path,
    config: ContinualConfig,
    resume: bool = False,
    device: torch.device | str | None = None,
    on_event: Callable[[ContinualEvent], None] | None = None,
    backend: str | None = None,
    threads: int | None = None,
) -> ContinualResult:
    """Train an MAE through the stages of ``config.order`` with the replay of ``config.method``.

    Args:
        data: per modality of the order, its stage's data: a Dataset of ``(C, *S)`` samples at the
            model's input size, a ``(N, C, *S)`` tensor, or a callable returning either (called
            when the stage starts, so finished stages never open their data). Modalities of
            finished stages may be left out when resuming.
        out: the run folder (see the module docstring).
        config: :class:`~invcoss.continual.config.ContinualConfig`.
        resume: continue the run in ``out``; without it an existing run is an error.
        device: default: CUDA when available, else CPU.
        on_event: receives every :class:`ContinualEvent`.
        backend: :mod:`invcoss.ops` backend of the inversion losses.
        threads: torch's CPU threads for the run (:func:`invcoss.rng.pinned_compute`, which also
            turns deterministic algorithms on); None: the current count for a new run, the recorded
            one when resuming. Recorded as ``compute`` in ``continual.json`` and every ``stage.json``.

    Returns:
        :class:`ContinualResult`.

    Raises:
        ValueError: missing data for a stage to run, data of the wrong size, an existing run
            without ``resume`` or with another configuration, stage folders without a run header
            (never replaced, even with ``resume``), or ``threads`` other than the count
            the resumed run was made with (its numbers would depend on two counts).
        DataAccessError: a sealed stage's data was read (a bug; never expected).

    Example:
        >>> import tempfile
        >>> cfg = ContinualConfig.from_profile("quick", method="er", order=("xray", "pathology"),
        ...     img_size_2d=32, epochs=1, batch_size=4, stats_batch_size=4)
        >>> data = {"xray": torch.rand(8, 3, 32, 32), "pathology": torch.rand(8, 3, 32, 32)}
        >>> r = run_continual(data, tempfile.mkdtemp(), cfg, device="cpu")
        >>> [(s.modality, s.buffer, s.kept) for s in r.stages]
        [('xray', {}, 1), ('pathology', {'xray': 1}, 1)]
    """

    out = Path(out)
    threads = resolve_threads(threads, _recorded_threads(out) if resume else None, f"the run in {out}")
    with pinned_compute(threads) as compute:
        return _run_stages(data, out, config, resume, device, on_event, backend, compute)


def _run_stages(
    data: Mapping[str, object],
    out: Path,
    config: ContinualConfig,
    resume: bool,
    device: torch.device | str | None,
    on_event: Callable[[ContinualEvent], None] | None,
    backend: str | None,
    compute: dict,
) -> ContinualResult:
    t_start = time.perf_counter()
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    _check_folder(out, config)
    todo = [(t, m) for t, m in enumerate(config.order) if not (resume and stage_done(stage_dir(out, t, m)))]
    missing = [m for _, m in todo if m not in data]
    if missing:
        raise ValueError(
            f"no data given for stage(s) {', '.join(missing)} of the order {','.join(config.order)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    _run_header(out, config, resume, compute)

    def emit(kind: str, stage: int, modality: str, **info) -> None:
        if on_event is not None:
            on_event(ContinualEvent(kind, stage, modality, info))

    stages: list[StageSummary] = []
    for t, modality in enumerate(config.order):
        folder = stage_dir(out, t, modality)
        if resume and stage_done(folder):
            emit("stage_skip", t, modality)
            stages.append(StageSummary.read(folder))
            continue
        emit("stage_start", t, modality)
        if t == 0:
            torch.manual_seed(config.seed)
            model = create_model(config.preset, **config.model_overrides())
        else:
            model = MAE.from_pretrained(stage_dir(out, t - 1, config.order[t - 1]))
        model.to(dev)
        ds = AuditedDataset(_open_source(data[modality], modality), modality)
        shape = _check_shape(ds, model, modality)
        folder.mkdir(parents=True, exist_ok=True)
        times: dict[str, float] = {}

        teacher, buffers = None, {}
        if t > 0 and config.method != "seq":
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            t0 = time.perf_counter()
            buffers = _load_buffers(out, t, config, teacher, dev, emit, backend)
            times["replay"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        history, epochs_run = train_stage(
            model, teacher, ds, buffers, config, folder, t, dev,
            on_step=lambda step, t=t, m=modality: on_event and on_event(
                ContinualEvent("train", t, m, dataclasses.asdict(step), step)
            ),
        )  # fmt: skip
        times["train"] = time.perf_counter() - t0
        if distributed.is_main():
            model.save_pretrained(folder)
        t0 = time.perf_counter()
        collect_feature_stats(
            model,
            ds,
            modality=modality,
            batch_size=config.stats_batch_size,
            device=dev,
            out=folder / STATS_NAME,
            on_batch=lambda done, total, t=t, m=modality: emit("stats", t, m, done=done, total=total),
        )
        times["stats"] = time.perf_counter() - t0
        kept = 0
        if config.method == "er":
            n = buffer_count(len(ds), config.buffer_fraction)
            kept = _keep_real_buffer(ds, folder, config, t, modality) if distributed.is_main() else n
        reads = sum(distributed.all_gather_object(ds.reads))  # every rank read its own shard
        ds.seal()
        summary = {
            "stage": t,
            "modality": modality,
            "method": config.method,
            "samples": len(ds),
            "source_bytes": ds.source_bytes,
            # Uncompressed, as the buffer is kept: what storing all of it would take (Fig. 6a).
            "sample_bytes": len(ds) * math.prod(shape) * 4,
            "history": history,
            "buffer": {m: int(b.shape[0]) for m, b in buffers.items()},
            "kept": kept,
            "reads": reads,
            "seconds": times,
            "compute": compute,
            "done": True,
        }
        if distributed.is_main():
            atomic_write_json(folder / STAGE_NAME, summary)
            (folder / STATE_NAME).unlink(missing_ok=True)
        distributed.barrier()  # the stage's files exist for every rank before the next stage reads them
        stages.append(StageSummary.read(folder, epochs_run))
        emit("stage_end", t, modality, summary=summary)
        del ds, teacher, buffers
    return ContinualResult(out=out, config=config, stages=stages, seconds=time.perf_counter() - t_start)


def _keep_real_buffer(
    ds: AuditedDataset, folder: Path, config: ContinualConfig, t: int, modality: str
) -> int:
    """``er``: a random ``buffer_fraction`` of the stage's samples, saved before the data is sealed."""

    n = buffer_count(len(ds), config.buffer_fraction)
    g = torch.Generator().manual_seed(derive_seed(config.seed, "buffer", t))
    indices = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    samples = torch.stack([ds[i] for i in indices])
    save_samples(
        folder / BUFFER_NAME,
        samples,
        {"modality": modality, "stage": t, "indices": indices, "source_samples": len(ds), "kind": "real"},
    )
    return n


def _load_buffers(
    out: Path, t: int, config: ContinualConfig, teacher: nn.Module, device: torch.device, emit, backend
) -> dict[str, torch.Tensor]:
    """The buffer of stage ``t``: per earlier modality, real (``er``) or synthetic (``invcoss``) samples."""
    buffers = {}
    for s, modality in enumerate(config.order[:t]):
        earlier = stage_dir(out, s, modality)
        if config.method == "er":
            buffers[modality] = load_samples(earlier / BUFFER_NAME)[0]
        else:
            buffers[modality] = _synthetic_buffer(out, t, s, modality, config, teacher, device, emit, backend)
    return buffers


def _batch_quality(inverter: Inverter, result) -> list[dict]:
    """Per inverted batch: its size, stat-matching loss (and noise's) and median distance from the
    target mean in target std (:func:`invcoss.inversion.report.mean_distance`)."""
    from invcoss.inversion.report import mean_distance

    return [
        {
            "samples": int(b.images.shape[0]),
            "stat_loss": b.stat_loss,
            "noise_stat_loss": b.noise_stat_loss,
            "distance": mean_distance(inverter, b.images),
        }
        for b in result.batches
    ]


def _synthetic_buffer(
    out: Path, t: int, s: int, modality: str, config: ContinualConfig, teacher, device, emit, backend
) -> torch.Tensor:
    """``invcoss``: invert the frozen stage ``t-1`` model with stage ``s``'s statistics (Algorithm 1, lines 3-8)."""

    path = stage_dir(out, t, config.order[t]) / REPLAY_DIR / f"{modality}.safetensors"
    if path.exists():
        return load_samples(path)[0]
    # Stage s's statistics were collected with stage s's model; the teacher is stage t-1's, its
    # descendant (Algorithm 1): bind them to the stage s checkpoint of this run, not to the teacher.
    earlier = stage_dir(out, s, modality)
    stats = load_feature_stats(
        earlier / STATS_NAME, teacher, modality, expect_weights=checkpoint_weights_hash(earlier)
    )
    n = buffer_count(stats.count, config.buffer_fraction)
    inv_config = config.inversion_config(modality, seed=derive_seed(config.seed, f"invert{t}", s))
    inverter = Inverter(teacher, stats, inv_config, device=device, backend=backend)

    def on_step(info) -> None:
        emit(
            "invert", t, config.order[t], source=modality, batch=info.batch, batches=info.num_batches,
            step=info.step, steps=info.steps, loss=info.losses.get("total"),
        )  # fmt: skip

    # Under torch.distributed each rank inverts its share of the batches, exchanging features with
    # the others after every round (so no rank waits long in one collective); all hold the whole
    # buffer at the end and rank 0 saves it.
    result = generate_shared(inverter, n, on_step=on_step)
    teacher.eval()  # the Inverter froze it already; keep the teacher's mode explicit
    if not distributed.is_main():
        return result.images
    save_samples(
        path,
        result.images,
        {
            "modality": modality,
            "stage": s,
            "kind": "synthetic",
            "source_samples": stats.count,
            "inversion": inv_config.to_dict(),
            "quality": _batch_quality(inverter, result),
        },
    )
    return result.images

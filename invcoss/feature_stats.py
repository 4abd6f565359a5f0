"""Per-layer feature statistics of a trained model over its dataset (Appendix B.2, Eq. 9).

:func:`collect_feature_stats` makes one eval-mode, no-grad pass over a dataset with
``model.block_features(x)`` and folds every encoder block's ``(B, L, D)`` output into an
:class:`invcoss.ops.RunningStats` of feature shape ``(L, D)``: the mean and (biased) variance over
the batch dimension of the whole dataset, per token and channel, accumulated in float64. These
are the targets of the stat-matching loss (Eq. 3) when the model is inverted, and all that is
kept of the data.

The file is safetensors: tensors ``block.<i>.mean`` and ``block.<i>.var`` (``(L, D)`` each) and
string metadata ``format``, ``preset``, ``config_hash``, ``config`` (JSON), ``modality``,
``input_size`` (JSON), ``count``, ``sources``, ``dtype``, ``num_layers``, ``weights_hash`` and ``compute``
(JSON: the CPU thread count and determinism of the pass, which the model's features depend on in their
last bits, and ``ranks``, the number of torch.distributed processes, when more than one). ``sources``
(the number of source files, i.e. scans, behind the samples) is absent from files written before it
was recorded and when the data do not say (a bare tensor); such files still load.
``data`` (JSON, :class:`invcoss.data.summary.DataSummary`) describes the data themselves: the voxel
spacing of the preprocessed samples (per-axis median, minimum and maximum; 3D) and the range and
percentiles of their values. Inversion writes volumes with that spacing and fits the MRI generator's
output range to those values; a file without it (written before it was recorded) still loads, and
inversion then falls back to the phantoms' spacing and 4*tanh with a warning.

Minimum cohort: the per-token means of a handful of scans come close to the scans themselves (the mean
of one scan *is* that scan's features). Collecting from fewer than :data:`MIN_COHORT_SOURCES` source
files (or samples, when the sources are unknown) warns with :class:`SmallCohortWarning`; see
``docs/audit.md`` for the measurement behind the number.

Two checks bind a statistics file to a model (:func:`load_feature_stats`):

* the architecture: the config hash covers every field of the model's configuration that changes
  the block features (not its name, not the loss normalisation), plus the block count and shapes;
* the weights: ``weights_hash`` is :func:`invcoss.models.checkpoint.weights_hash` of the model the
  statistics were collected with. By default they must be that model's; ``expect_weights`` names
  another hash to require (the continual run checks the statistics of stage ``s`` against the
  stage ``s`` checkpoint while it inverts the stage ``T-1`` model with them, as Algorithm 1 does),
  and ``allow_other_weights=True`` accepts any weights of the architecture with a warning (a
  fine-tuned model inverted with its parent's statistics, knowingly). A file without the hash
  (written before it was recorded) is refused in the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from invcoss import distributed
from invcoss.data.atomic import atomic_write_safetensors
from invcoss.data.summary import DataSummary, IntensityHistogram, data_spacings, spacing_summary
from invcoss.models.weights import weights_hash
from invcoss.ops import RunningStats, check_reference_stats
from invcoss.rng import compute_record

STATS_FORMAT = "invcoss-feature-stats/1"
MIN_COHORT_SOURCES = 20
"""Fewest source files (scans) to collect statistics from without a :class:`SmallCohortWarning`.

For members of a cohort of N independent samples, the distance to the cohort mean is on average
``sqrt((N - 1) / (N + 1))`` of a non-member's; at N = 20 that is 0.95, at N = 5 0.82 and at N = 2
0.58, so a stored mean of a few scans tells its members apart (measured in ``docs/audit.md``)."""


class SmallCohortWarning(UserWarning):
    """Statistics collected from fewer than :data:`MIN_COHORT_SOURCES` source files."""


def source_count(data) -> int | None:
    """The number of source files behind ``data``: a cache's distinct sources, a folder dataset's
    files; None for anything else (a tensor, a loader of tensors)."""
    samples = getattr(data, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], dict) and "source" in samples[0]:
        return len({s["source"] for s in samples})
    files = getattr(data, "files", None)
    if isinstance(files, list):
        return len(files)
    inner = getattr(data, "dataset", None)
    return source_count(inner) if inner is not None and inner is not data else None


# pos_embed_order is a property of the weights (public MAE weights use another table), left out so
# that every hash recorded before the field existed stays valid; the weights hash separates models.
_NOT_HASHED = ("name", "norm_pix_loss", "pos_embed_order")


def config_hash(config) -> str:
    """A short hash of the fields of a model config that change its block features.

    Example:
        >>> from invcoss.models import preset_config
        >>> config_hash(preset_config("vit_nano")) == config_hash(preset_config("vit_nano", name="other"))
        True
        >>> config_hash(preset_config("vit_nano")) == config_hash(preset_config("vit_nano", img_size_2d=64))
        False
    """
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FeatureStats:
    """Per-block feature statistics and what they were collected with.

    Attributes:
        mean, var: one ``(L, D)`` tensor per encoder block (biased variance).
        preset: the model's preset name (``config.name``).
        config_hash: :func:`config_hash` of the model's config.
        modality: ``ct``, ``mri``, ``xray`` or ``pathology``.
        input_size: spatial size of one sample, e.g. ``(16, 96, 96)``.
        count: number of samples folded in.
        sources: number of source files (scans) behind them; None when unknown.
        dtype: the dtype of the tensors as stored (``"float32"`` or ``"float64"``).
        weights_hash: :func:`~invcoss.models.checkpoint.weights_hash` of the model they were
            collected with (None for a file written before it was recorded).
        config: the model's config as a dict (informative).
        compute: the compute settings of the pass (:func:`invcoss.rng.compute_record`: CPU
            threads, deterministic algorithms); empty when unknown.
        data: the spacing and intensity range of the data (:class:`~invcoss.data.summary.DataSummary`);
            None for a file written before it was recorded.
    """

    mean: list[Tensor]
    var: list[Tensor]
    preset: str
    config_hash: str
    modality: str
    input_size: tuple[int, ...]
    count: int
    dtype: str
    weights_hash: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    compute: dict = dataclasses.field(default_factory=dict)
    sources: int | None = None
    data: DataSummary | None = None

    @property
    def num_layers(self) -> int:
        return len(self.mean)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (the file adds a small header)."""
        return sum(t.numel() * t.element_size() for t in self.mean + self.var)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FeatureStats:
        """A copy with every tensor moved / cast (e.g. to the inversion's device)."""
        return dataclasses.replace(
            self, mean=[t.to(device, dtype) for t in self.mean], var=[t.to(device, dtype) for t in self.var]
        )


class DataSummaryWarning(UserWarning):
    """Statistics that record no description of their data: outputs fall back to nominal values."""


def stats_data(stats, modality: str) -> DataSummary | None:
    """The :class:`~invcoss.data.summary.DataSummary` of ``stats`` (a :class:`FeatureStats` or
    plain ``(mean, var)`` pairs, which say nothing of their data: None).

    Warns:
        DataSummaryWarning: a :class:`FeatureStats` of a 3D modality without one (a file written
            before it was recorded), naming what falls back to the nominal values.
    """
    if not isinstance(stats, FeatureStats):
        return None
    if stats.data is None and len(stats.input_size) == 3:
        what = "the phantoms' nominal voxel spacing"
        if modality == "mri":
            what += " and a range of 4*tanh (+-4 z-scores)"
        warnings.warn(
            f"the {modality} feature statistics record no spacing or value range of their data (a file "
            f"written before they were recorded): synthetic volumes get {what}; collect the statistics "
            "again (`invcoss-cli stats`) to record them, or give the spacing (--set spacing=D,H,W)",
            DataSummaryWarning,
            stacklevel=3,
        )
    return stats.data


def _batches(data, batch_size: int, num_workers: int) -> tuple[Iterable, int | None]:
    """Batches of ``data``: a Dataset or a sample tensor is wrapped in an in-order DataLoader (of this
    rank's contiguous shard under torch.distributed); anything else is iterated as batches."""
    from torch.utils.data import DataLoader, Dataset, Subset

    if isinstance(data, Dataset | Tensor):
        if distributed.is_initialized():
            data = Subset(
                data, distributed.shard_indices(len(data), distributed.rank(), distributed.world_size())
            )
        # A private generator: a DataLoader draws its workers' base seed from the global one otherwise.
        loader = DataLoader(
            data, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=torch.Generator()
        )
        return loader, len(data)  # type: ignore[arg-type]
    if isinstance(data, DataLoader):
        return data, len(data.dataset) if hasattr(data.dataset, "__len__") else None  # type: ignore[arg-type]
    return data, None


def _model_ndim(model: nn.Module, first: Tensor) -> int:
    if first.ndim not in (4, 5):
        raise ValueError(
            f"collect_feature_stats expects batches of shape (B, C, H, W) or (B, C, D, H, W), "
            f"got {tuple(first.shape)}"
        )
    ndim = first.ndim - 2
    cfg = model.config
    expected = (cfg.in_chans(ndim), *cfg.img_size(ndim))
    if tuple(first.shape[1:]) != expected:
        raise ValueError(
            f"the data gives samples of shape {tuple(first.shape[1:])}, but model {cfg.name} expects "
            f"{expected}; preprocess the data at the model's input size"
        )
    return ndim


def collect_feature_stats(
    model: nn.Module,
    data,
    modality: str | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    out: str | os.PathLike | None = None,
    store_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int, int | None], None] | None = None,
    sources: int | None = None,
    spacing: list[tuple[float, float, float]] | None = None,
) -> FeatureStats:
    """One eval-mode pass over ``data`` folding every block output into running statistics (Eq. 9).

    Args:
        model: an :class:`invcoss.models.MAE` (anything with ``config`` and ``block_features``).
        data: a Dataset of ``(C, *S)`` samples or a tensor ``(N, C, *S)`` (batched by
            ``batch_size``), a DataLoader, or any other iterable of ``(B, C, *S)`` batches.
        modality: recorded in the metadata; default ``data.modality`` when the dataset has one.
        batch_size, num_workers: for wrapping a Dataset.
        device: where to run (default: the model's device).
        out: if given, the statistics are also saved there (:func:`save_feature_stats`).
        store_dtype: dtype of the returned / saved tensors (accumulation is always float64).
        on_batch: called as ``on_batch(samples_done, total_or_None)`` after each batch (this rank's
            samples under torch.distributed).
        sources: the number of source files (scans) behind ``data``, recorded in the file; default
            :func:`source_count` of ``data``.
        spacing: the voxel spacing ``(D, H, W)`` in mm of every sample (3D), recorded in the file
            as their median and spread; default :func:`invcoss.data.summary.data_spacings` of
            ``data`` (a cache's manifest or a folder's headers; none for tensors). The range and
            percentiles of the values are always recorded (``stats.data.intensity``).

    Under torch.distributed (:mod:`invcoss.distributed`, e.g. ``torchrun -m invcoss.cli stats``) every
    rank calls this with the same arguments: a Dataset or tensor is split into contiguous shards
    (:func:`~invcoss.distributed.shard_indices`: no sample read twice, none dropped, uneven shards
    allowed; a DataLoader or other iterable is taken as this rank's part as it is), each rank folds
    its shard in, and the per-block states are merged with :meth:`RunningStats.all_reduce` (an exact
    Chan merge in float64, in rank order), so every rank returns the statistics of all the data,
    equal to one process's within float64 rounding. Only rank 0 writes ``out`` (and warns).

    Warns:
        SmallCohortWarning: fewer than :data:`MIN_COHORT_SOURCES` sources (or samples, when the
            sources are unknown).

    Returns:
        :class:`FeatureStats` with one ``(L, D)`` mean and variance per encoder block.

    Raises:
        ValueError: no modality known, empty data, or samples of a size the model does not take.

    Example:
        >>> from invcoss.models import create_model
        >>> model = create_model("vit_nano", img_size_2d=32)
        >>> stats = collect_feature_stats(model, torch.rand(6, 3, 32, 32).split(4), modality="xray")
        >>> stats.count, stats.num_layers, tuple(stats.mean[0].shape)
        (6, 4, (5, 96))
    """

    modality = modality or getattr(data, "modality", None)
    if not modality:
        raise ValueError("collect_feature_stats needs the modality (argument or data.modality)")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    batches, total = _batches(data, batch_size, num_workers)
    was_training = model.training
    model.eval()
    running: list[RunningStats] = []
    values = IntensityHistogram()
    ndim = None
    done = 0
    try:
        with torch.no_grad():
            for x in batches:
                x = x[0] if isinstance(x, list | tuple) else x
                if ndim is None:
                    ndim = _model_ndim(model, x)
                values.update(x)
                x = x.to(device=device, dtype=param.dtype, non_blocking=True)
                feats = model.block_features(x)  # per block (B, L, D)
                if not running:
                    running = [RunningStats(f.shape[1:], device=device) for f in feats]
                for rs, f in zip(running, feats):
                    rs.update(f)
                done += x.shape[0]
                if on_batch is not None:
                    on_batch(done, total)
    finally:
        model.train(was_training)
    if distributed.is_initialized():
        running, ndim = _merge_ranks(running, ndim, device)
        values.all_reduce()  # every rank's shard of the values, so the summary is the whole data's
    if not running:
        raise ValueError("collect_feature_stats got no data (empty dataset)")
    if sources is None:
        sources = source_count(data)
    cohort = sources if sources is not None else running[0].count
    if cohort < MIN_COHORT_SOURCES and distributed.is_main():
        what = "source files" if sources is not None else "samples"
        warnings.warn(
            f"feature statistics collected from {cohort} {what}, fewer than {MIN_COHORT_SOURCES}: the "
            "per-token means of a few scans come close to the scans themselves (see docs/audit.md); "
            "do not share them as if they were anonymous",
            SmallCohortWarning,
            stacklevel=2,
        )
    if spacing is None and ndim == 3:
        spacing = data_spacings(data)
    summary = DataSummary(spacing_summary(spacing) if ndim == 3 and spacing else None, values.summary())
    cfg = model.config
    stats = FeatureStats(
        mean=[rs.mean.to("cpu", store_dtype) for rs in running],
        var=[rs.var.to("cpu", store_dtype) for rs in running],
        preset=cfg.name,
        config_hash=config_hash(cfg),
        modality=modality,
        input_size=tuple(cfg.img_size(ndim)),
        count=running[0].count,
        dtype=str(store_dtype).removeprefix("torch."),
        weights_hash=weights_hash(model),
        config=json.loads(json.dumps(dataclasses.asdict(cfg))),
        # Under torch.distributed the ranks' shards are merged: their number is a setting of the pass.
        compute={
            **compute_record(),
            **({"ranks": distributed.world_size()} if distributed.is_initialized() else {}),
        },
        sources=sources,
        data=summary,
    )
    if out is not None and distributed.is_main():
        save_feature_stats(stats, out)
    if out is not None:
        distributed.barrier()  # the file exists on return, on every rank
    return stats


def _merge_ranks(running: list[RunningStats], ndim: int | None, device: torch.device):
    """Every rank's states merged in rank order; a rank with an empty shard takes the shapes of the others."""
    seen = [
        s for s in distributed.all_gather_object((ndim, [tuple(rs.feature_shape) for rs in running])) if s[0]
    ]
    if not seen:
        return running, ndim
    ndim, shapes = seen[0]
    if not running:
        running = [RunningStats(shape, device=device) for shape in shapes]
    for rs in running:
        rs.all_reduce()
    return running, ndim


def save_feature_stats(stats: FeatureStats, path: str | os.PathLike) -> Path:
    """Write ``stats`` as a safetensors file with metadata (atomically; the same bytes for the same
    statistics); returns the path."""
    tensors = {}
    for i, (m, v) in enumerate(zip(stats.mean, stats.var)):
        tensors[f"block.{i}.mean"] = m.detach().contiguous().cpu()
        tensors[f"block.{i}.var"] = v.detach().contiguous().cpu()
    metadata = {
        "format": STATS_FORMAT,
        "preset": stats.preset,
        "config_hash": stats.config_hash,
        "config": json.dumps(stats.config, sort_keys=True),
        "modality": stats.modality,
        "input_size": json.dumps(list(stats.input_size)),
        "count": str(stats.count),
        "dtype": stats.dtype,
        "num_layers": str(stats.num_layers),
    }
    if stats.sources is not None:
        metadata["sources"] = str(stats.sources)
    if stats.compute:
        metadata["compute"] = json.dumps(stats.compute, sort_keys=True)
    if stats.weights_hash is not None:
        metadata["weights_hash"] = stats.weights_hash
    if stats.data is not None:
        metadata["data"] = stats.data.to_json()
    return atomic_write_safetensors(path, tensors, metadata)


def load_feature_stats(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    modality: str | None = None,
    *,
    expect_weights: str | None = None,
    allow_other_weights: bool = False,
) -> FeatureStats:
    """Read a statistics file; with ``model`` (and ``modality``) check it belongs to them.

    Args:
        path: what :func:`save_feature_stats` wrote.
        model: the model the statistics must fit: its architecture, and its weights unless
            ``expect_weights`` names others.
        modality: the modality the statistics must be of.
        expect_weights: the weights hash the statistics must record (default: ``model``'s).
        allow_other_weights: accept statistics of other weights (or of unknown weights) of the same
            architecture, with a ``UserWarning`` naming both hashes.

    Raises:
        ValueError: not a statistics file, a non-finite mean or a negative or non-finite variance
            (the message names the block; checked here, once, not at every loss evaluation), or the
            metadata does not match the model (config hash, number of blocks, token count or width,
            weights hash) or the modality; the message says both sides.

    Example:
        >>> import tempfile, pathlib
        >>> from invcoss.models import create_model
        >>> model = create_model("vit_nano", img_size_2d=32)
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.safetensors"
        >>> _ = collect_feature_stats(model, [torch.rand(2, 3, 32, 32)], modality="xray", out=p)
        >>> load_feature_stats(p, model).count
        2
        >>> try:
        ...     load_feature_stats(p, create_model("vit_nano"))  # 112x112 input: other token count
        ... except ValueError as e:
        ...     print("input (32, 32)" in str(e) and "input (112, 112)" in str(e))
        True
        >>> other = create_model("vit_nano", img_size_2d=32)  # same architecture, other weights
        >>> try:
        ...     load_feature_stats(p, other)
        ... except ValueError as e:
        ...     print("collected with weights" in str(e))
        True
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise ValueError(
                    f"{path} is not an invcoss feature statistics file (format {meta.get('format')!r})"
                )
            n = int(meta["num_layers"])
            mean = [f.get_tensor(f"block.{i}.mean") for i in range(n)]
            var = [f.get_tensor(f"block.{i}.var") for i in range(n)]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read feature statistics {path}: {e}") from e
    except Exception as e:
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"cannot read feature statistics {path}: {type(e).__name__}: {e}") from e
    try:
        data = DataSummary.from_json(meta["data"]) if "data" in meta else None
    except ValueError as e:
        raise ValueError(f"feature statistics {path}: {e}") from None
    stats = FeatureStats(
        mean=mean,
        var=var,
        preset=meta["preset"],
        config_hash=meta["config_hash"],
        modality=meta["modality"],
        input_size=tuple(json.loads(meta["input_size"])),
        count=int(meta["count"]),
        dtype=meta["dtype"],
        weights_hash=meta.get("weights_hash"),
        config=json.loads(meta["config"]),
        compute=json.loads(meta.get("compute", "{}")),
        sources=int(meta["sources"]) if "sources" in meta else None,
        data=data,
    )
    for i, (m, v) in enumerate(zip(mean, var)):
        check_reference_stats(m, v, layer=f"feature statistics {path}, block {i}")
    if modality is not None and modality != stats.modality:
        raise ValueError(f"feature statistics {path} are for {stats.modality}, not {modality}")
    if model is not None:
        _check_against_model(path, stats, model)
    if model is not None or expect_weights is not None:
        want = expect_weights if expect_weights is not None else weights_hash(model)  # type: ignore[arg-type]
        _check_weights(path, stats, want, allow_other_weights)
    return stats


def _check_weights(path: Path, stats: FeatureStats, want: str, allow_other_weights: bool) -> None:
    if stats.weights_hash == want:
        return
    got = (
        "unknown weights (the file records no weights hash)"
        if stats.weights_hash is None
        else (f"weights {stats.weights_hash[:16]}")
    )
    text = f"feature statistics {path} were collected with {got}, but the model's weights are {want[:16]}"
    if allow_other_weights:
        warnings.warn(f"{text}; using them anyway (allow_other_weights)", UserWarning, stacklevel=3)
        return
    raise ValueError(
        f"{text}; collect statistics with this model (`invcoss-cli stats`), or pass --allow-other-weights "
        "(allow_other_weights=True) to invert it with another model's statistics knowingly"
    )


def _check_against_model(path: Path, stats: FeatureStats, model: nn.Module) -> None:
    cfg = model.config
    ndim = len(stats.input_size)
    want_hash = config_hash(cfg)
    if stats.config_hash != want_hash:
        raise ValueError(
            f"feature statistics {path} were collected with {stats.preset} (config {stats.config_hash}, "
            f"input {stats.input_size}) but the model is {cfg.name} (config {want_hash}, input "
            f"{tuple(cfg.img_size(ndim))}); collect statistics with this model's architecture"
        )
    shapes = {tuple(t.shape) for t in stats.mean + stats.var}
    if stats.num_layers != cfg.depth or len(shapes) != 1 or next(iter(shapes))[-1] != cfg.embed_dim:
        raise ValueError(
            f"feature statistics {path} hold {stats.num_layers} blocks of shape {sorted(shapes)}, but model "
            f"{cfg.name} has {cfg.depth} blocks of width {cfg.embed_dim}"
        )

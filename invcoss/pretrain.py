"""MAE pre-training on one modality (Eq. 7): AdamW, linear warm-up then cosine decay, resumable.

Paper settings (Implementation details, Appendix C): AdamW, 300 epochs, learning rate warmed up to
1.5e-4 over 40 epochs then cosine-decayed, batch 512, mask ratio 0.75. :class:`PretrainConfig`
holds them as defaults; the warm-up defaults to the same fraction of the run (40/300) so short
runs keep the shape of the schedule. The learning rate is set every step from the fractional
epoch, as MAE does. On CUDA the forward pass runs under bf16 autocast.

Output folder ``OUT`` after every epoch:

- ``config.json`` + ``model.safetensors``: the model (``MAE.from_pretrained(OUT)``);
- ``training_state.safetensors``: model, AdamW moments, RNG state, epoch and losses in one file,
  so a resumed run continues from exactly the last finished epoch;
- ``pretrain.json``: the resolved configuration, the data, the compute settings (``compute``:
  CPU threads, deterministic algorithms; :func:`invcoss.rng.compute_record`) and the loss of every
  epoch.

Each file is written atomically; an interrupted run leaves the last finished epoch's files.

Nothing in ``OUT`` is replaced without being asked: a folder that already holds any of these four
files is refused, unless ``resume`` continues the training state it holds (its own run: a finished
run's ``model.safetensors`` is replaced only by a resumed run given more epochs) or ``overwrite``
starts afresh over them. Other files in ``OUT`` (e.g. a ``stats.safetensors`` put beside the model)
are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from invcoss import distributed
from invcoss.data.atomic import atomic_write_json, atomic_write_safetensors
from invcoss.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from invcoss.models.weights import read_safetensors_header
from invcoss.rng import derive_seed, keeps_global_rng, pinned_compute, resolve_threads
from invcoss.training import (
    CURRENT,
    Step,
    TrainingSchedule,
    TrainStep,
    global_batches,
    parallel_loss,
    sample_mask_noise,
    train_epoch,
)

STATE_NAME = "training_state.safetensors"
SUMMARY_NAME = "pretrain.json"


@dataclass(frozen=True)
class PretrainConfig(TrainingSchedule):
    """Hyper-parameters of :func:`pretrain`: the shared :class:`~invcoss.training.TrainingSchedule`
    (epochs, batch size, AdamW, warm-up, mask ratio, amp, workers; paper values by default) and
    the seed.

    Attributes:
        seed: seeds the shuffling and the masks: epoch ``e`` shuffles with ``seed + e``, and a sample's
            mask in epoch ``e`` comes from ``(seed, e, its index)`` alone
            (:func:`~invcoss.training.sample_mask_noise`), whatever batch or rank it lands in.
    """

    seed: int = 0


def learning_rate(epoch: float, config: TrainingSchedule) -> float:
    """Learning rate at fractional ``epoch``: linear warm-up to ``lr``, then half-cosine to ``min_lr``.

    Example:
        >>> cfg = PretrainConfig(epochs=300, lr=1.5e-4)
        >>> learning_rate(20, cfg), learning_rate(40, cfg), learning_rate(300, cfg)
        (7.5e-05, 0.00015, 0.0)
    """
    warm = config.warmup
    if epoch < warm:
        return config.lr * epoch / warm
    span = max(config.epochs - warm, 1e-12)
    progress = min(1.0, (epoch - warm) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class PretrainResult:
    """What :func:`pretrain` did: ``losses`` holds the mean loss of every epoch since the start."""

    out: Path
    epochs_run: int
    losses: list[float]
    samples: int
    seconds: float


def make_optimizer(model: nn.Module, config: TrainingSchedule) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with the MAE weight-decay split.

    No weight decay on biases, norms, tokens and position tables (1-D or ``*token`` parameters).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def save_state(out: Path, model, opt, epoch: int, losses: list[float], meta: dict) -> None:
    """Write ``out/STATE_NAME`` atomically: model, AdamW moments, RNG states, epoch, losses, meta.

    A crash while writing leaves the previous file whole, so a resumed run loses at most one epoch.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().contiguous().cpu()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().contiguous().cpu()
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {"epoch": str(epoch), "losses": json.dumps(losses), "meta": json.dumps(meta, sort_keys=True)}
    atomic_write_safetensors(out / STATE_NAME, tensors, metadata)


def load_state(out: Path, model, opt, device: torch.device) -> tuple[int, list[float], dict]:
    """Restore what :func:`save_state` wrote into ``model`` and ``opt``; ``(epoch, losses, meta)``.

    Raises:
        ValueError: naming the file, when it is truncated or corrupt, or holds the state of a model
            with other parameters (checked before anything is loaded).
    """
    from safetensors import safe_open

    path = out / STATE_NAME
    stored, metadata = read_safetensors_header(path)
    shapes = {k.removeprefix("model."): shape for k, (_, shape) in stored.items() if k.startswith("model.")}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != own or not {"epoch", "losses", "meta"} <= set(metadata) or "rng.cpu" not in stored:
        differ = sorted(k for k in set(shapes) | set(own) if shapes.get(k) != own.get(k))
        raise ValueError(
            f"{path} is not a training state of this model (parameters that differ: {differ[:5]}"
            f"{', metadata or RNG state missing' if not differ else ''}); resume with the same model or "
            "use a new folder"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        state = {k[len("model.") :]: f.get_tensor(k) for k in keys if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if f"opt.{i}.exp_avg" in keys:
                opt.state[p] = {
                    "step": f.get_tensor(f"opt.{i}.step").reshape(()),
                    "exp_avg": f.get_tensor(f"opt.{i}.exp_avg").to(device),
                    "exp_avg_sq": f.get_tensor(f"opt.{i}.exp_avg_sq").to(device),
                }
        torch.set_rng_state(f.get_tensor("rng.cpu"))
        if "rng.cuda" in keys and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("rng.cuda"))
    return int(meta["epoch"]), json.loads(meta["losses"]), json.loads(meta["meta"])


@keeps_global_rng
def pretrain(
    model: nn.Module,
    data,
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    modality: str | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    on_step: Callable[[TrainStep], None] | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> PretrainResult:
    """Train ``model`` with its masked-reconstruction loss on ``data``, saving to ``out`` every epoch.

    Args:
        model: an :class:`invcoss.models.MAE` (``forward(x, mask_ratio) -> (loss, pred, mask)``,
            ``save_pretrained``).
        data: a Dataset of channel-first samples at the model's input size (e.g. from
            :func:`invcoss.data.open_dataset`).
        out: checkpoint folder (see the module docstring).
        config: :class:`PretrainConfig` (default: the paper's).
        modality: recorded in ``pretrain.json`` (default ``data.modality``).
        resume: continue from ``out/training_state.safetensors`` (a fresh start when ``out`` holds
            none of the run's files); without it an existing training state in ``out`` is an error,
            so nothing is overwritten by accident.
        device: default: CUDA when available, else CPU.
        on_step: called after every step with its :class:`~invcoss.training.TrainStep`
            (``losses["mae"]`` is the step's loss).
        threads: torch's CPU threads (:func:`invcoss.rng.pinned_compute`); None: the current
            count, or when resuming the count the run was made with. Recorded as ``compute`` in
            ``pretrain.json``.
        overwrite: start afresh even when ``out`` holds a model or a run (its ``config.json``,
            ``model.safetensors``, ``training_state.safetensors`` or ``pretrain.json``), replacing
            them; ``resume`` with a training state still continues it.

    Returns:
        :class:`PretrainResult`.

    Raises:
        ValueError: empty data, the run's files in ``out`` without a training state to ``resume``
            and without ``overwrite``, a state from another
            model or configuration, or ``threads`` other than the resumed run's.

    Example:
        >>> import tempfile
        >>> from invcoss.models import create_model
        >>> model = create_model("vit_nano", img_size_2d=32)
        >>> r = pretrain(model, torch.rand(8, 3, 32, 32), tempfile.mkdtemp(), PretrainConfig(epochs=2, batch_size=4))
        >>> r.epochs_run, len(r.losses)
        (2, 2)
    """
    out = Path(out)
    threads = resolve_threads(threads, _recorded_threads(out) if resume else None, f"the run in {out}")
    with pinned_compute(threads) as compute:
        return _pretrain(
            model,
            data,
            out,
            config or PretrainConfig(),
            modality,
            resume,
            device,
            on_step,
            compute,
            overwrite,
        )


def _recorded_threads(out: Path) -> int | None:
    """The thread count ``OUT/pretrain.json`` records (None for a new folder or an older run)."""
    try:
        return int(json.loads((out / SUMMARY_NAME).read_text())["compute"]["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pretrain(
    model: nn.Module,
    data,
    out: Path,
    config: PretrainConfig,
    modality: str | None,
    resume: bool,
    device: torch.device | str | None,
    on_step: Callable[[TrainStep], None] | None,
    compute: dict,
    overwrite: bool,
) -> PretrainResult:
    from torch.utils.data import DataLoader

    if len(data) == 0:
        raise ValueError("pretrain got an empty dataset")
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model.to(device)
    opt = make_optimizer(model, config)
    run_meta = {
        "model": dataclasses.asdict(model.config),
        "pretrain": dataclasses.asdict(config),
        "modality": modality or getattr(data, "modality", None),
        "samples": len(data),
        "compute": compute,
    }
    if distributed.is_initialized():
        run_meta["ranks"] = distributed.world_size()  # informative: a resume may use another count
    start_epoch, losses = 0, []
    owned = [out / n for n in (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME, SUMMARY_NAME) if (out / n).exists()]
    resumable = resume and (out / STATE_NAME).exists()
    if owned and not resumable and not overwrite:
        held = "a training run" if (out / STATE_NAME).exists() else "a model or the rest of a run"
        hint = "pass resume=True (--resume) to continue it, " if held == "a training run" else ""
        raise ValueError(
            f"{out} already holds {held} ({owned[0].name}); {hint}overwrite=True (--overwrite) to "
            "replace it, or use a new folder"
        )
    if resumable:
        start_epoch, losses, saved = load_state(out, model, opt, device)
        mismatch = [
            k
            for k in ("model", "modality")
            if json.dumps(saved[k], sort_keys=True) != json.dumps(run_meta[k], sort_keys=True)
        ]
        if mismatch:
            raise ValueError(f"cannot resume {out}: its {' and '.join(mismatch)} differ from this run's")
    else:
        torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)

    use_amp = config.amp and device.type == "cuda"
    run = distributed.data_parallel(model, device)

    def masked_loss(
        model: nn.Module, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _, _ = model(x, mask_ratio=config.mask_ratio, noise=noise)
        return loss, {"mae": float(loss.detach())}

    def steps(batches: list[list[int]], mask_seed: int):
        parts = [[b[j] for j in distributed.batch_part(len(b))] for b in batches]
        loader = iter(
            DataLoader(
                data,
                batch_sampler=[p for p in parts if p],
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
            )
        )
        for batch, part in zip(batches, parts):
            args = None
            if part:
                x = next(loader)
                x = x[0] if isinstance(x, list | tuple) else x
                noise = sample_mask_noise(mask_seed, part, model.config.num_patches(x.ndim - 2), device)
                args = (x, noise)
            compute = functools.partial(parallel_loss, run, masked_loss, args, len(part), len(batch))
            yield Step(CURRENT, len(batch), compute)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed + epoch))
        # MAE drops the ragged last batch; a tiny dataset keeps it rather than lose most samples.
        batches = global_batches(order.tolist(), config.batch_size, len(data) >= 2 * config.batch_size)
        means = train_epoch(
            model, opt, steps(batches, derive_seed(config.seed, "mask", epoch)), epoch=epoch,
            epochs=config.epochs, num_steps=len(batches), lr_at=lambda e: learning_rate(e, config),
            on_step=on_step, where="pretrain",
        )  # fmt: skip
        losses.append(means.get("mae", 0.0))
        if distributed.is_main():
            model.save_pretrained(out)
            save_state(out, model, opt, epoch + 1, losses, run_meta)
            atomic_write_json(out / SUMMARY_NAME, run_meta | {"epochs_done": epoch + 1, "losses": losses})
    distributed.barrier()  # the checkpoint is complete on return, on every rank
    return PretrainResult(
        out=out,
        epochs_run=config.epochs - start_epoch,
        losses=losses,
        samples=len(data),
        seconds=time.perf_counter() - t_start,
    )

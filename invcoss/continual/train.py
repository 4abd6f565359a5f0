"""The training loop of one continual stage (Eq. 4): MAE on current batches, distillation on buffer batches.

:func:`train_stage` reuses the pieces of :mod:`invcoss.pretrain` (AdamW without decay on biases,
norms and tokens; linear warm-up then cosine decay set every step; the resumable training state
with AdamW moments and RNG state) and replaces its epoch with the schedule of
:func:`invcoss.continual.replay.epoch_schedule`: a current batch gets the masked-reconstruction
loss (Eq. 7); a buffer batch, mixed up within itself, gets
:func:`invcoss.continual.replay.replay_loss` against the frozen previous model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from invcoss import distributed
from invcoss.continual.config import ContinualConfig
from invcoss.continual.replay import CURRENT, buffer_mixup, epoch_schedule, replay_loss
from invcoss.pretrain import (
    STATE_NAME,
    learning_rate,
    load_state,
    make_optimizer,
    save_state,
)
from invcoss.rng import derive_seed, keeps_global_rng
from invcoss.training import Step, TrainStep, parallel_loss, sample_mask_noise, train_epoch

__all__ = ["train_stage"]


@keeps_global_rng
def train_stage(
    model: nn.Module,
    teacher: nn.Module | None,
    data,
    buffers: Mapping[str, torch.Tensor],
    config: ContinualConfig,
    folder: str | Path,
    stage: int,
    device: torch.device,
    on_step: Callable[[TrainStep], None] | None = None,
) -> tuple[list[dict], int]:
    """Train ``model`` for the epochs of one stage (:meth:`ContinualConfig.stage_epochs`), saving the training state in ``folder`` every epoch.

    A training state already in ``folder`` is resumed from (model, AdamW moments, RNG state, history);
    otherwise the global generator is seeded from ``(config.seed, stage)``, so a stage does not
    depend on what ran before it in the process.

    Args:
        model: the MAE being trained (from the previous stage's checkpoint).
        teacher: the frozen previous MAE in eval mode, or None when there is no buffer.
        data: the current stage's Dataset of ``(C, *S)`` samples.
        buffers: per earlier modality, its ``(N, C, *S)`` buffer (empty for ``seq`` and stage 1).
        config: the run's configuration.
        folder: the stage folder.
        stage: 0-based stage index.
        device: where to train.
        on_step: receives the :class:`~invcoss.training.TrainStep` of every step.

    Returns:
        ``(history, epochs trained by this call)``; ``history`` holds one dict per epoch with the
        mean ``mae`` of the current batches and, with a buffer, the mean ``distill`` and
        ``buffer_mae`` of the buffer batches.

    Raises:
        FloatingPointError: a loss became NaN or infinite.
    """
    from torch.utils.data import DataLoader

    folder = Path(folder)
    if buffers and teacher is None:
        raise ValueError("train_stage got a buffer but no teacher to distil from")
    modality = config.order[stage]
    stage_seed = derive_seed(config.seed, "stage", stage)
    # The first stage may have its own budget; its warm-up and decay then span its own epochs.
    epochs = config.stage_epochs(stage)
    schedule_config = dataclasses.replace(config.schedule(), epochs=epochs)
    opt = make_optimizer(model, schedule_config)
    meta = {"model": dataclasses.asdict(model.config), "stage": stage, "modality": modality}
    history: list[dict] = []
    start = 0
    if (folder / STATE_NAME).exists():
        start, _, saved = load_state(folder, model, opt, device)
        history = saved["history"]
    else:
        torch.manual_seed(stage_seed)
    sizes = {m: int(b.shape[0]) for m, b in buffers.items()}
    use_amp = config.amp and device.type == "cuda"
    run = distributed.data_parallel(model, device)

    def current_loss(
        model: nn.Module, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(x.to(device, non_blocking=True), mask_ratio=config.mask_ratio, noise=noise)[0]
        return loss, {"mae": float(loss.detach())}

    def buffer_loss(
        model: nn.Module, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, replay = replay_loss(
                model, teacher, x.to(device, non_blocking=True), config.mask_ratio, config.distill_weight,
                config.buffer_mae_weight, config.buffer_mae_flat_std, config.mae_target(), noise,
            )  # fmt: skip
        parts = {"distill": replay["distill"]}
        if "mae" in replay:
            parts["buffer_mae"] = replay["mae"]
        if "flat" in replay:
            parts["buffer_flat"] = replay["flat"]
        return loss, parts

    for epoch in range(start, epochs):
        g = torch.Generator().manual_seed(derive_seed(stage_seed, "epoch", epoch))
        schedule = epoch_schedule(
            len(data), sizes, config.batch_size, config.interleave, config.buffer_every, g
        )
        mask_seed = derive_seed(stage_seed, "mask", epoch)
        # Every rank walks the whole schedule and computes its contiguous part of each batch.
        parts = [distributed.batch_part(len(b.indices)) for b in schedule]
        current = iter(
            DataLoader(
                data,
                batch_sampler=[
                    [b.indices[j] for j in part]
                    for b, part in zip(schedule, parts)
                    if b.source == CURRENT and part
                ],
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
            )
        )

        def steps(schedule=schedule, parts=parts, current=current, g=g, mask_seed=mask_seed):
            for i, (batch, part) in enumerate(zip(schedule, parts)):
                n = len(batch.indices)
                if batch.source == CURRENT:
                    fn, x = current_loss, (next(current) if part else None)
                    # a current sample's mask: (epoch, its index), as in pretrain
                    keys, seed = [batch.indices[j] for j in part], mask_seed
                else:
                    # The mixup pairs samples of the whole batch: every rank mixes all of it (the
                    # same draws from g) and keeps its part; masks by position in the batch.
                    mixed = buffer_mixup(buffers[batch.source][list(batch.indices)], config.mixup_alpha, g)
                    fn, x = buffer_loss, (mixed[part.start : part.stop] if part else None)
                    keys, seed = list(part), derive_seed(mask_seed, batch.source, i)
                args = None
                if x is not None:
                    noise = sample_mask_noise(seed, keys, model.config.num_patches(x.ndim - 2), device)
                    args = (x, noise)
                compute = functools.partial(parallel_loss, run, fn, args, len(part), n)
                yield Step(batch.source, n, compute)

        means = train_epoch(
            model, opt, steps(), epoch=epoch, epochs=epochs, num_steps=len(schedule),
            lr_at=lambda e: learning_rate(e, schedule_config), on_step=on_step,
            where=f"stage {stage + 1} ({modality})",
        )  # fmt: skip
        history.append({"epoch": epoch + 1, "steps": len(schedule)} | means)
        if distributed.is_main():
            save_state(
                folder, model, opt, epoch + 1, [h["mae"] for h in history], meta | {"history": history}
            )
    return history, epochs - start

"""The replay side of a continual stage: batch schedule, mixup, feature distillation, data audit.

- :func:`epoch_schedule` lays out one epoch of single-modality batches: the current data's batches
  and the buffer's, interleaved as :class:`~invcoss.continual.config.ContinualConfig` says.
- :func:`buffer_mixup` is MedCoSS's intra-modal mixup of buffer samples.
- :func:`feature_distillation_loss` and :func:`replay_loss` are the regulariser of Eq. 4 on a
  buffer batch: the MSE between the current and the frozen previous encoder's token features on the
  same visible tokens, plus an optional MAE term.
- :class:`AuditedDataset` counts every read of a stage's real data and refuses reads once the
  stage is sealed, so a run can show that earlier stages' data was never touched after their stage.
- :func:`save_samples` / :func:`load_samples`: a buffer of samples as one safetensors file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from invcoss.data.atomic import atomic_write_safetensors
from invcoss.models.weights import read_safetensors_header
from invcoss.training import CURRENT

__all__ = [
    "CURRENT",
    "MAE_TARGETS",
    "AuditedDataset",
    "DataAccessError",
    "ScheduledBatch",
    "buffer_mixup",
    "epoch_schedule",
    "feature_distillation_loss",
    "flat_patches",
    "load_samples",
    "replay_loss",
    "save_samples",
]


@dataclass(frozen=True)
class ScheduledBatch:
    """One batch of an epoch: ``source`` is ``"current"`` or an earlier modality (its buffer)."""

    source: str
    indices: tuple[int, ...]


def _chunks(order: Tensor, size: int, drop_last: bool) -> list[tuple[int, ...]]:
    ids = order.tolist()
    out = [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


def epoch_schedule(
    num_current: int,
    buffer_sizes: Mapping[str, int],
    batch_size: int,
    interleave: str = "shuffle",
    buffer_every: int = 1,
    generator: torch.Generator | None = None,
    drop_last: bool | None = None,
) -> list[ScheduledBatch]:
    """The batches of one epoch, in order.

    Current samples are shuffled into batches of ``batch_size``; the ragged last batch is dropped
    when the data holds at least two batches (as :func:`invcoss.pretrain.pretrain`), unless
    ``drop_last`` says otherwise. Buffer batches hold ``min(batch_size, buffer size)`` samples of one
    modality.

    Args:
        num_current: samples of the current stage.
        buffer_sizes: samples in the buffer of each earlier modality (empty for ``seq``/stage 1).
        batch_size: samples per batch.
        interleave: ``"shuffle"``: every buffer sample once, buffer batches at random positions;
            ``"alternate"``: one buffer batch after every ``buffer_every`` current batches, the
            modalities in turn, each cycling through a fresh permutation of its buffer.
        buffer_every: see ``interleave``.
        generator: the epoch's random generator.
        drop_last: override the ragged-batch rule of the current data.

    Returns:
        A list of :class:`ScheduledBatch`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = epoch_schedule(8, {"ct": 3}, 4, "alternate", buffer_every=1, generator=g)
        >>> [(b.source, len(b.indices)) for b in s]
        [('current', 4), ('ct', 3), ('current', 4), ('ct', 3)]
    """
    if num_current < 1 or batch_size < 1 or buffer_every < 1:
        raise ValueError(
            f"epoch_schedule needs num_current, batch_size and buffer_every >= 1, "
            f"got {num_current}, {batch_size}, {buffer_every}"
        )
    if interleave not in ("shuffle", "alternate"):
        raise ValueError(f"interleave must be 'shuffle' or 'alternate', got {interleave!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if drop_last is None:
        drop_last = num_current >= 2 * batch_size
    current = [
        ScheduledBatch(CURRENT, b)
        for b in _chunks(torch.randperm(num_current, generator=g), batch_size, drop_last)
    ]
    sizes = {m: n for m, n in buffer_sizes.items() if n > 0}
    if not sizes:
        return current
    if interleave == "shuffle":
        batches = list(current)
        for m, n in sizes.items():
            batches += [
                ScheduledBatch(m, b) for b in _chunks(torch.randperm(n, generator=g), batch_size, False)
            ]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    pools = {m: [] for m in sizes}
    modalities = list(sizes)
    out: list[ScheduledBatch] = []
    turn = 0
    for k, batch in enumerate(current):
        out.append(batch)
        if (k + 1) % buffer_every:
            continue
        m = modalities[turn % len(modalities)]
        turn += 1
        take = min(batch_size, sizes[m])
        while len(pools[m]) < take:
            pools[m] += torch.randperm(sizes[m], generator=g).tolist()
        out.append(ScheduledBatch(m, tuple(pools[m][:take])))
        pools[m] = pools[m][take:]
    return out


def buffer_mixup(x: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """Intra-modal mixup: ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)`` per sample.

    ``x: (B, C, *S)``; ``alpha <= 0`` or a batch of one returns ``x`` unchanged.

    Example:
        >>> x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> y = buffer_mixup(x, 1.0, torch.Generator().manual_seed(0))
        >>> bool(((y >= 0) & (y <= 1)).all()), tuple(y.shape)
        (True, (2, 1, 2, 2))
    """
    if alpha <= 0 or x.shape[0] < 2:
        return x
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    # torch's Beta sampler takes no generator: draw lam with numpy from a seed of ours, so the epoch
    # stays reproducible from its own generator and the global RNG is left alone.
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=x.shape[0]))
    perm = torch.randperm(x.shape[0], generator=g)
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def feature_distillation_loss(
    model: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    mask_ratio: float = 0.75,
    noise: Tensor | None = None,
    return_teacher: bool = False,
) -> tuple[Tensor, ...]:
    """MSE between the current and the frozen previous encoder's features on the same visible tokens.

    Both encoders see the same masked input: one ``noise`` decides the mask of both (MedCoSS's
    feature distillation, the regulariser of Eq. 4). The teacher runs without gradients; put it in
    eval mode.

    Args:
        model: the MAE being trained.
        teacher: the frozen MAE of the previous stage.
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` buffer batch.
        mask_ratio: fraction of patches hidden.
        noise: ``(B, L)`` mask scores (drawn from the global generator when None).
        return_teacher: also return the teacher's latent (last), for a term on its decoder.

    Returns:
        ``(loss, latent (B, 1 + K, D), mask (B, L), ids_restore (B, L))``: the 0-dim fp32 loss and
        the current encoder's outputs, for an MAE term on the same pass (and the teacher's latent
        with ``return_teacher``).

    Example:
        >>> import copy
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> t = copy.deepcopy(m).eval()
        >>> feature_distillation_loss(m, t, torch.rand(2, 3, 32, 32))[0].item()
        0.0
    """
    if x.ndim not in (4, 5):
        raise ValueError(
            f"feature_distillation_loss expects x of shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}"
        )
    if noise is None:
        noise = torch.rand(x.shape[0], model.config.num_patches(x.ndim - 2), device=x.device)
    latent, mask, ids_restore = model.forward_encoder(x, mask_ratio, noise)
    with torch.no_grad():
        target = teacher.forward_encoder(x, mask_ratio, noise)[0]
    loss = F.mse_loss(latent.float(), target.float())
    return (loss, latent, mask, ids_restore) + ((target,) if return_teacher else ())


def replay_loss(
    model: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    mask_ratio: float,
    distill_weight: float = 1.0,
    mae_weight: float = 0.0,
    mae_flat_std: float = 0.0,
    mae_target: str = "pixels",
    noise: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one buffer batch: ``distill_weight * distillation + mae_weight * MAE`` (one encoder pass).

    ``mae_target`` decides what the MAE term asks the decoder for on the masked patches:
    ``"pixels"`` (Eq. 7 on the buffer sample, the paper's "task-oriented self-supervision") or
    ``"teacher"``: the frozen previous model's own reconstruction of the same masked input, so the
    term keeps the previous encoder-decoder's behaviour on the buffer instead of fitting the
    buffer's pixels (with synthetic samples, their blur and artefacts). Both are squared errors
    per masked patch in the same (normalised) target space.

    ``mae_flat_std > 0`` leaves the near-flat patches out of the MAE term: a masked patch whose raw
    pixels have a standard deviation below ``mae_flat_std`` (model units) is not scored (see
    :func:`flat_patches`). Under the per-patch normalised target such a patch asks the decoder for
    its amplified low-amplitude texture; synthetic background is smooth where real background is
    white noise, so scoring it teaches structure that real background does not have. The
    distillation term still sees every patch.

    ``noise``: ``(B, L)`` mask scores of both encoders (:func:`feature_distillation_loss`; drawn from
    the global generator when None).

    Returns:
        ``(total, {"distill": ..., "mae": ...})`` (``mae`` only when ``mae_weight > 0``; with
        ``mae_flat_std > 0`` also ``"flat"``, the fraction of patches left out).
    """
    if mae_target not in MAE_TARGETS:
        raise ValueError(f"mae_target must be one of {', '.join(MAE_TARGETS)}, got {mae_target!r}")
    distill, latent, mask, ids_restore, teacher_latent = feature_distillation_loss(
        model, teacher, x, mask_ratio, noise, return_teacher=True
    )
    total = distill_weight * distill
    parts = {"distill": float(distill.detach())}
    if mae_weight > 0:
        ndim = x.ndim - 2
        pred = model.forward_decoder(latent, ids_restore, ndim)
        if mae_flat_std > 0:
            flat = flat_patches(model, x, mae_flat_std)
            parts["flat"] = float(flat.float().mean())
            mask = mask * (~flat).to(mask.dtype)
        if mae_target == "teacher":
            with torch.no_grad():
                target = teacher.forward_decoder(teacher_latent, ids_restore, ndim).float()
            per_patch = (pred.float() - target).pow(2).mean(dim=-1)
            mae = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        else:
            mae = model.forward_loss(x, pred, mask)
        total = total + mae_weight * mae
        parts["mae"] = float(mae.detach())
    return total, parts


MAE_TARGETS = ("pixels", "teacher")


def flat_patches(model: nn.Module, x: Tensor, max_std: float) -> Tensor:
    """``(B, L)`` bool: the patches of ``x`` whose raw pixels have a standard deviation below ``max_std``.

    The standard deviation is taken over all pixels (and channels) of a patch, as ``model.patchify``
    lays them out, in the model's input units.

    Example:
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> x = torch.zeros(1, 3, 32, 32)
        >>> x[..., :16, :] = torch.rand(1, 3, 16, 32)
        >>> flat_patches(m, x, 0.01).float().mean().item()
        0.5
    """
    if max_std < 0:
        raise ValueError(f"max_std must be >= 0, got {max_std}")
    return model.patchify(x).float().std(dim=-1) < max_std


class DataAccessError(RuntimeError):
    """A stage's real data was read after the stage was sealed."""


class AuditedDataset(Dataset):
    """A view of a stage's dataset that counts reads and refuses them once sealed.

    The continual runner reads the real data of stage ``t`` only through such a view and seals it
    when stage ``t`` ends, so a later read raises :class:`DataAccessError` instead of silently
    leaking earlier data into a data-free method; ``reads`` is recorded in the stage's summary.
    With DataLoader workers (``num_workers > 0``) the reads happen in the workers' copies and are
    not counted here; the seal still holds, because the workers end with the stage's epochs.

    Example:
        >>> ds = AuditedDataset(torch.zeros(3, 1, 2, 2), "ct")
        >>> _ = ds[0]; ds.reads
        1
        >>> ds.seal()
        >>> try:
        ...     ds[1]
        ... except DataAccessError as e:
        ...     print(e)
        the ct data of a finished stage was read (item 1); its stage is sealed
    """

    def __init__(self, data, modality: str) -> None:
        self.data = data
        self.modality = modality
        self.reads = 0
        self.sealed = False
        self.source_bytes = getattr(data, "source_bytes", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Tensor:
        if self.sealed:
            raise DataAccessError(
                f"the {self.modality} data of a finished stage was read (item {i}); its stage is sealed"
            )
        self.reads += 1
        item = self.data[i]
        return item[0] if isinstance(item, list | tuple) else item

    def seal(self) -> None:
        self.sealed = True


def save_samples(path: str | os.PathLike, samples: Tensor, metadata: Mapping[str, object]) -> Path:
    """Write a ``(N, C, *S)`` float32 buffer with JSON-able metadata as safetensors (atomically)."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    return atomic_write_safetensors(path, {"samples": samples.detach().float().contiguous().cpu()}, meta)


def load_samples(path: str | os.PathLike) -> tuple[Tensor, dict]:
    """Read what :func:`save_samples` wrote: ``(samples, metadata)``.

    Raises:
        ValueError: naming the file, when it is truncated, corrupt or holds no ``samples``.
    """
    from safetensors import safe_open

    stored, _ = read_safetensors_header(path)
    if "samples" not in stored:
        raise ValueError(f"{path} is not a replay buffer (it holds no samples)")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return f.get_tensor("samples"), meta

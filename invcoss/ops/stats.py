"""Streaming feature statistics (Eq. 9, Appendix B.2) and the stat-matching loss (Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from invcoss.ops.checks import check_same_device, check_tensor, shape_str
from invcoss.ops.dispatch import resolve
from invcoss.ops.moments import chan_merge


def batch_mean_var(x: Tensor, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over dim 0 (the batch), in fp32.

    Args:
        x: ``(B, *F)`` with B >= 1.
        backend: see :func:`invcoss.ops.total_variation`.

    Returns:
        ``(mean, var)``, each fp32 of shape ``F`` (divide by B), differentiable in x.

    Example:
        >>> mean, var = batch_mean_var(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), backend="torch")
        >>> mean, var
        (tensor([2., 4.]), tensor([1., 4.]))
    """
    op = "batch_mean_var"
    check_tensor(op, "x", x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{op} expects x of shape (B, *F) with B >= 1, got {shape_str(x.shape)}")
    mean, var = resolve(backend, x.device, op).batch_mean_var(x.reshape(x.shape[0], -1))
    return mean.reshape(x.shape[1:]), var.reshape(x.shape[1:])


def stat_matching_loss(x: Tensor, mean: Tensor, var: Tensor, backend: str | None = None) -> Tensor:
    """Feature-statistics matching for one layer (Eq. 3).

    ``||mean_B(x) - mean||_2 + ||var_B(x) - var||_2`` with the batch mean and biased variance of x
    over dim 0, both norms unsquared (as DeepInversion). A zero difference has a zero gradient.

    Args:
        x: ``(B, *F)`` features of the synthetic batch, e.g. ``(B, L, D)`` block outputs.
        mean, var: the stored statistics, shape ``F`` (constants: no gradient flows to them).
        backend: see :func:`invcoss.ops.total_variation`.

    Returns:
        0-dim fp32 loss, differentiable in x.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
        >>> stat_matching_loss(x, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), backend="torch")
        tensor(3.)
    """
    op = "stat_matching_loss"
    check_tensor(op, "x", x)
    check_tensor(op, "mean", mean)
    check_tensor(op, "var", var)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{op} expects x of shape (B, *F) with B >= 1, got {shape_str(x.shape)}")
    feat = x.shape[1:]
    for name, t in (("mean", mean), ("var", var)):
        if t.shape != feat:
            raise ValueError(
                f"{op} expects {name} of shape {shape_str(feat)} (x's feature shape), got {shape_str(t.shape)}"
            )
        check_same_device(op, "x", x, name, t)
    impl = resolve(backend, x.device, op)
    return impl.stat_matching(x.reshape(x.shape[0], -1), mean.detach().reshape(-1), var.detach().reshape(-1))


class StatMatchingLoss(nn.Module):
    """Module form of :func:`stat_matching_loss` holding the target statistics as buffers.

    Example:
        >>> loss = StatMatchingLoss(torch.zeros(3), torch.ones(3), backend="torch")
        >>> loss(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
        tensor(0.)
    """

    def __init__(self, mean: Tensor, var: Tensor, backend: str | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("var", var.detach().clone())
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return stat_matching_loss(x, self.mean, self.var, self.backend)


class RunningStats:
    """Running per-feature mean and biased variance over any number of batches (Eq. 9).

    The state is ``(count, mean, m2)`` with ``m2`` the sum of squared deviations, merged with Chan
    et al.'s parallel formula, so data with a large mean and a small spread (mean 1e4, std 1) keeps
    its variance where a sum of squares would cancel. ``count`` is a Python int.

    Args:
        feature_shape: the shape F of one sample; batches are ``(B, *F)``.
        device: where the state lives (default CPU).
        dtype: state dtype, fp64 (default) or fp32.
        backend: which implementation folds batches in (see :func:`invcoss.ops.total_variation`).

    Example:
        >>> rs = RunningStats((2,))
        >>> rs.update(torch.tensor([[1.0, 2.0]])); rs.update(torch.tensor([[3.0, 6.0]]))
        >>> rs.count, rs.mean.tolist(), rs.var.tolist()
        (2, [2.0, 4.0], [1.0, 4.0])
    """

    def __init__(
        self,
        feature_shape: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        backend: str | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"RunningStats expects dtype torch.float32 or torch.float64, got {dtype}")
        self.feature_shape = torch.Size(feature_shape)
        self.backend = backend
        numel = self.feature_shape.numel()
        self.count = 0
        self._mean = torch.zeros(numel, device=device, dtype=dtype)
        self._m2 = torch.zeros(numel, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def mean(self) -> Tensor:
        """Mean over everything folded in so far, shape F (zeros before the first update)."""
        return self._mean.reshape(self.feature_shape)

    @property
    def var(self) -> Tensor:
        """Biased variance, shape F (zeros before the first update)."""
        return (self._m2 / max(self.count, 1)).reshape(self.feature_shape)

    @property
    def m2(self) -> Tensor:
        """Sum of squared deviations from the mean, shape F (``var * count``; zeros when empty)."""
        return self._m2.reshape(self.feature_shape)

    def update(self, x: Tensor) -> None:
        """Fold a batch ``x`` of shape ``(B, *feature_shape)`` into the state (no gradient)."""
        op = "RunningStats.update"
        check_tensor(op, "x", x)
        if x.ndim != len(self.feature_shape) + 1 or x.shape[1:] != self.feature_shape:
            raise ValueError(
                f"{op} expects x of shape (B, {', '.join(map(str, self.feature_shape))}), "
                f"got {shape_str(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(f"{op} expects x on the state's device {self.device}, got {x.device}")
        if x.shape[0] == 0:
            return
        impl = resolve(self.backend, x.device, op)
        with torch.no_grad():
            self._mean, self._m2 = impl.welford_update(
                x.detach().reshape(x.shape[0], -1), self.count, self._mean, self._m2
            )
        self.count += x.shape[0]

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another state into this one (Chan et al.); returns self."""
        if not isinstance(other, RunningStats):
            raise TypeError(
                f"RunningStats.merge expects other to be a RunningStats, got {type(other).__name__}"
            )
        if other.feature_shape != self.feature_shape:
            raise ValueError(
                f"RunningStats.merge expects other with feature shape {shape_str(self.feature_shape)}, "
                f"got {shape_str(other.feature_shape)}"
            )
        # Copies: a merge into an empty state takes the other's tensors as they are.
        mean_b = other._mean.to(self.device, self.dtype, copy=True)
        m2_b = other._m2.to(self.device, self.dtype, copy=True)
        self.count, self._mean, self._m2 = chan_merge(
            self.count, self._mean, self._m2, other.count, mean_b, m2_b
        )
        return self

    def all_reduce(self, group: object = None) -> RunningStats:
        """Merge the states of every ``torch.distributed`` rank into each rank; returns self.

        Exchanges ``(count, mean, m2)`` (never an inverse std) and merges them in rank order, so
        every rank ends with the same bits. Without an initialised process group it does nothing.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        means = [torch.empty_like(self._mean) for _ in range(world)]
        m2s = [torch.empty_like(self._m2) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        dist.all_gather(means, self._mean, group=group)
        dist.all_gather(m2s, self._m2, group=group)
        self.count, self._mean, self._m2 = 0, torch.zeros_like(self._mean), torch.zeros_like(self._m2)
        for c, m, s in zip(counts, means, m2s):
            self.count, self._mean, self._m2 = chan_merge(
                self.count, self._mean, self._m2, int(c.item()), m, s
            )
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-friendly): count, mean, m2 and the feature shape."""
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": self.mean.clone(),
            "m2": self.m2.clone(),
            "feature_shape": torch.tensor(list(self.feature_shape), dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state saved by :meth:`state_dict` (its feature shape must match)."""
        shape = torch.Size(state["feature_shape"].tolist())
        if shape != self.feature_shape:
            raise ValueError(
                f"RunningStats.load_state_dict expects feature shape {shape_str(self.feature_shape)}, "
                f"got {shape_str(shape)}"
            )
        self.count = int(state["count"])
        self._mean = state["mean"].to(self.device, self.dtype).reshape(-1).clone()
        self._m2 = state["m2"].to(self.device, self.dtype).reshape(-1).clone()

    def __repr__(self) -> str:
        return (
            f"RunningStats(feature_shape={tuple(self.feature_shape)}, count={self.count}, dtype={self.dtype})"
        )

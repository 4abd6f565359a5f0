"""Streaming feature statistics (Eq. 9, Appendix B.2) and the stat-matching loss (Eq. 3)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from invcoss.ops.checks import (
    check_nonempty,
    check_nonfinite,
    check_same_device,
    check_tensor,
    has_values,
    shape_str,
)
from invcoss.ops.dispatch import resolve
from invcoss.ops.moments import chan_merge


def batch_mean_var(x: Tensor, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over dim 0 (the batch), in fp32.

    Args:
        x: ``(B, *F)`` with B >= 1 and no zero-length axis. A NaN or inf in a column comes out in
            that column's mean and variance.
        backend: see :func:`invcoss.ops.total_variation`.

    Returns:
        ``(mean, var)``, each fp32 of shape ``F`` (divide by B), differentiable in x.

    Raises:
        ValueError: x is 0-dim or empty (B = 0, or a zero-length feature axis).

    Example:
        >>> mean, var = batch_mean_var(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), backend="torch")
        >>> mean, var
        (tensor([2., 4.]), tensor([1., 4.]))
    """
    op = "batch_mean_var"
    check_tensor(op, "x", x)
    _check_batch(op, x)
    mean, var = resolve(backend, x.device, op).batch_mean_var(x.reshape(x.shape[0], -1))
    return mean.reshape(x.shape[1:]), var.reshape(x.shape[1:])


def stat_matching_loss(x: Tensor, mean: Tensor, var: Tensor, backend: str | None = None) -> Tensor:
    """Feature-statistics matching for one layer (Eq. 3).

    ``||mean_B(x) - mean||_2 + ||var_B(x) - var||_2`` with the batch mean and biased variance of x
    over dim 0, both norms unsquared (as DeepInversion). A zero difference has a zero gradient.

    The reference statistics are not checked here, on every call (that would read them on the host
    each step): check them once where they enter with :func:`check_reference_stats`, as
    :class:`StatMatchingLoss`, :func:`invcoss.feature_stats.load_feature_stats` and the inversion do.
    A NaN or inf in x, mean or var comes out as a NaN or inf loss.

    Args:
        x: ``(B, *F)`` features of the synthetic batch, e.g. ``(B, L, D)`` block outputs, with B >= 1
            and no zero-length axis.
        mean, var: the stored statistics, shape ``F`` (constants: no gradient flows to them).
        backend: see :func:`invcoss.ops.total_variation`.

    Returns:
        0-dim fp32 loss, differentiable in x.

    Raises:
        TypeError: an argument is not a floating tensor.
        ValueError: x is empty, mean or var have another shape than x's features or live on another
            device.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
        >>> stat_matching_loss(x, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), backend="torch")
        tensor(3.)
    """
    op = "stat_matching_loss"
    check_tensor(op, "x", x)
    check_tensor(op, "mean", mean)
    check_tensor(op, "var", var)
    _check_batch(op, x)
    feat = x.shape[1:]
    for name, t in (("mean", mean), ("var", var)):
        if t.shape != feat:
            raise ValueError(
                f"{op} expects {name} of shape {shape_str(feat)} (x's feature shape), got {shape_str(t.shape)}"
            )
        check_same_device(op, "x", x, name, t)
    impl = resolve(backend, x.device, op)
    return impl.stat_matching(x.reshape(x.shape[0], -1), mean.detach().reshape(-1), var.detach().reshape(-1))


def _check_batch(op: str, x: Tensor) -> None:
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{op} expects x of shape (B, *F) with B >= 1, got {shape_str(x.shape)}")
    check_nonempty(op, "x", x, "(B, *F)")


def check_reference_stats(mean: Tensor, var: Tensor, layer: str = "the statistics") -> None:
    """Check reference statistics once, where they enter (a file, a module, an inversion).

    A mean must be finite, a variance finite and >= 0 (0 is a constant feature). Reads both on the
    host: one synchronisation on CUDA, so call it once per set of statistics, never per step. Meta
    and fake tensors (no values) pass.

    Args:
        mean, var: the statistics of one layer, the same shape.
        layer: what the error message calls them, e.g. ``"block 3 of stats.safetensors"``.

    Raises:
        TypeError: mean or var is not a floating tensor.
        ValueError: their shapes differ, or a value is out of range; the message names ``layer``,
            how many values are bad and the first one.

    Example:
        >>> check_reference_stats(torch.zeros(3), torch.tensor([1.0, -0.5, 2.0]), layer="block 0")
        Traceback (most recent call last):
        ...
        ValueError: block 0: the variance holds 1 negative or non-finite value of 3 (first at index (1,): -0.5); a variance must be finite and >= 0
    """
    op = "check_reference_stats"
    check_tensor(op, "mean", mean)
    check_tensor(op, "var", var)
    if mean.shape != var.shape:
        raise ValueError(
            f"{layer}: mean and var must have the same shape, got {shape_str(mean.shape)} and "
            f"{shape_str(var.shape)}"
        )
    if not (has_values(mean) and has_values(var)):
        return
    for what, bad, rule in (
        ("mean", ~torch.isfinite(mean), "a mean must be finite"),
        ("variance", ~(torch.isfinite(var) & (var >= 0)), "a variance must be finite and >= 0"),
    ):
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in bad.nonzero()[0])
            value = (mean if what == "mean" else var)[first].item()
            kind = "non-finite" if what == "mean" else "negative or non-finite"
            raise ValueError(
                f"{layer}: the {what} holds {n_bad} {kind} value{'s' if n_bad > 1 else ''} of "
                f"{bad.numel()} (first at index {first}: {value}); {rule}"
            )


class StatMatchingLoss(nn.Module):
    """Module form of :func:`stat_matching_loss` holding the target statistics as buffers.

    The statistics are checked once, here (:func:`check_reference_stats`), not on every call.

    Raises:
        TypeError, ValueError: see :func:`check_reference_stats`.

    Example:
        >>> loss = StatMatchingLoss(torch.zeros(3), torch.ones(3), backend="torch")
        >>> loss(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
        tensor(0.)
    """

    def __init__(self, mean: Tensor, var: Tensor, backend: str | None = None) -> None:
        super().__init__()
        check_reference_stats(mean, var, layer="StatMatchingLoss")
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

    Non-finite values (``nonfinite``): a sample (a row of the batch) holding a NaN or inf is never
    folded in silently.

    * ``"raise"`` (default): :meth:`update` stays one fused pass with no host synchronisation, and
      the check comes where the statistics are read: ``mean``, ``var``, ``m2``, :meth:`state_dict`,
      :meth:`merge` and :meth:`check` raise ``ValueError`` once any update held a non-finite value.
      No extra work is needed to notice one: a NaN or inf in a batch makes the state's ``m2`` of
      that feature NaN, and a NaN stays NaN through every later merge, so checking the state (one
      sum over the F values of ``m2`` and one host read, on CUDA a synchronisation, at the first
      read after an update; a read of an unchanged state checks nothing again) finds every bad
      batch. The price: the error names the features, not the batch; call :meth:`check` after
      each update to find the batch.
    * ``"skip"``: such samples are left out and counted in :attr:`skipped`. Each update then reads
      one flag on the host (one synchronisation on CUDA); a batch holding a non-finite value is
      folded in again from its finite rows (one more pass, over that batch only).

    Args:
        feature_shape: the shape F of one sample, sizes >= 1; batches are ``(B, *F)``.
        device: where the state lives (default CPU).
        dtype: state dtype, fp64 (default) or fp32.
        backend: which implementation folds batches in (see :func:`invcoss.ops.total_variation`).
        nonfinite: ``"raise"`` or ``"skip"`` (above).

    Raises:
        TypeError: feature_shape is not a sequence of ints.
        ValueError: a size below 1, another dtype, another nonfinite.

    Example:
        >>> rs = RunningStats((2,))
        >>> rs.update(torch.tensor([[1.0, 2.0]])); rs.update(torch.tensor([[3.0, 6.0]]))
        >>> rs.count, rs.mean.tolist(), rs.var.tolist()
        (2, [2.0, 4.0], [1.0, 4.0])
        >>> rs = RunningStats((2,), nonfinite="skip")
        >>> rs.update(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 6.0]]))
        >>> rs.count, rs.skipped, rs.mean.tolist()
        (2, 1, [2.0, 4.0])
    """

    def __init__(
        self,
        feature_shape: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        backend: str | None = None,
        nonfinite: str = "raise",
    ) -> None:
        op = "RunningStats"
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{op} expects dtype torch.float32 or torch.float64, got {dtype}")
        self.feature_shape = _feature_shape(op, feature_shape)
        self.backend = backend
        self.nonfinite = check_nonfinite(op, nonfinite)
        numel = self.feature_shape.numel()
        self.count = 0
        self.skipped = 0  # samples left out for a NaN or inf (nonfinite="skip")
        self._mean = torch.zeros(numel, device=device, dtype=dtype)
        self._m2 = torch.zeros(numel, device=device, dtype=dtype)
        self._checked: weakref.ref | None = None  # the m2 tensor last found finite

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def mean(self) -> Tensor:
        """Mean over everything folded in so far, shape F (zeros before the first update)."""
        self.check()
        return self._mean.reshape(self.feature_shape)

    @property
    def var(self) -> Tensor:
        """Biased variance, shape F (zeros before the first update)."""
        self.check()
        return (self._m2 / max(self.count, 1)).reshape(self.feature_shape)

    @property
    def m2(self) -> Tensor:
        """Sum of squared deviations from the mean, shape F (``var * count``; zeros when empty)."""
        self.check()
        return self._m2.reshape(self.feature_shape)

    def check(self, op: str = "RunningStats") -> None:
        """Raise ``ValueError`` if a non-finite value reached the state (see the class doc).

        Reads one flag on the host (a synchronisation on CUDA) unless the state is unchanged since
        it was last found finite; does nothing on meta and fake tensors (they hold no values).
        """
        m2 = self._m2
        if (self._checked is not None and self._checked() is m2) or not has_values(m2):
            return
        # One read of the F values of m2 (>= 0, so their sum is finite exactly when each one is,
        # short of an overflow of the sum itself, which the count below tells apart); a NaN or inf
        # in the data always reaches m2 (its deviations hold inf - inf or NaN).
        if not math.isfinite(float(m2.sum())):
            bad = ~torch.isfinite(m2)
            n_bad = int(bad.sum())
            if n_bad:
                first = tuple(int(i) for i in torch.unravel_index(bad.nonzero()[0, 0], self.feature_shape))
                raise ValueError(
                    f"{op}: the statistics hold non-finite values in {n_bad} of {bad.numel()} features "
                    f"(first: feature {first}): a batch passed to update() held a NaN or inf, or its "
                    f"squared deviations overflowed {self.dtype}. Clean the data, or pass "
                    "nonfinite='skip' to leave such samples out (counted in .skipped); call check() "
                    "after each update to find the batch"
                )
        self._checked = weakref.ref(m2)

    def update(self, x: Tensor) -> None:
        """Fold a batch ``x`` of shape ``(B, *feature_shape)`` into the state (no gradient).

        An empty batch (B = 0) changes nothing. A sample holding a NaN or inf raises when the
        statistics are next read, or is skipped and counted (``nonfinite``, see the class doc).
        """
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
        rows = x.detach().reshape(x.shape[0], -1)
        with torch.no_grad():
            mean, m2 = impl.welford_update(rows, self.count, self._mean, self._m2)
            if self.nonfinite == "skip" and has_values(m2) and not math.isfinite(float(m2.sum())):
                # The one host read of this mode. A NaN or inf anywhere in a column makes its m2 NaN
                # (inf - inf in the deviations); the state before this batch was finite.
                finite = rows[torch.isfinite(rows).all(1)]
                self.skipped += rows.shape[0] - finite.shape[0]
                rows = finite
                if rows.shape[0] == 0:
                    return
                mean, m2 = impl.welford_update(rows, self.count, self._mean, self._m2)
        self._mean, self._m2 = mean, m2
        self.count += rows.shape[0]

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another state into this one (Chan et al.); returns self.

        Raises ``ValueError`` when either state holds a non-finite value (see the class doc).
        """
        if not isinstance(other, RunningStats):
            raise TypeError(
                f"RunningStats.merge expects other to be a RunningStats, got {type(other).__name__}"
            )
        if other.feature_shape != self.feature_shape:
            raise ValueError(
                f"RunningStats.merge expects other with feature shape {shape_str(self.feature_shape)}, "
                f"got {shape_str(other.feature_shape)}"
            )
        self.check("RunningStats.merge (self)")
        other.check("RunningStats.merge (other)")
        self.skipped += other.skipped
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
        """Tensors only (safetensors-friendly): count, skipped, mean, m2 and the feature shape.

        Raises ``ValueError`` when the state holds a non-finite value (see the class doc).
        """
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "skipped": torch.tensor(self.skipped, dtype=torch.int64),
            "mean": self.mean.clone(),
            "m2": self.m2.clone(),
            "feature_shape": torch.tensor(list(self.feature_shape), dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state saved by :meth:`state_dict` (its feature shape must match).

        The state is checked where it enters: a count below 0, a non-finite mean, or a negative or
        non-finite m2 raises ``ValueError`` naming the entry. ``skipped`` is optional (0 when absent).
        """
        op = "RunningStats.load_state_dict"
        missing = [k for k in ("count", "mean", "m2", "feature_shape") if k not in state]
        if missing:
            raise ValueError(
                f"{op} expects state with keys count, mean, m2, feature_shape; missing {missing}"
            )
        shape = torch.Size(state["feature_shape"].tolist())
        if shape != self.feature_shape:
            raise ValueError(
                f"{op} expects feature shape {shape_str(self.feature_shape)}, got {shape_str(shape)}"
            )
        count, skipped = int(state["count"]), int(state.get("skipped", 0))
        if count < 0 or skipped < 0:
            raise ValueError(
                f"{op} expects state['count'] and state['skipped'] >= 0, got {count} and {skipped}"
            )
        mean = state["mean"].to(self.device, self.dtype).reshape(-1).clone()
        m2 = state["m2"].to(self.device, self.dtype).reshape(-1).clone()
        check_reference_stats(mean, m2, layer=f"{op}: state['mean'] / state['m2']")
        self.count, self.skipped, self._mean, self._m2 = count, skipped, mean, m2

    def __repr__(self) -> str:
        return (
            f"RunningStats(feature_shape={tuple(self.feature_shape)}, count={self.count}, dtype={self.dtype})"
        )


def _feature_shape(op: str, feature_shape: object) -> torch.Size:
    if isinstance(feature_shape, str | bytes) or not isinstance(feature_shape, Sequence):
        raise TypeError(
            f"{op} expects feature_shape to be a sequence of ints, got {type(feature_shape).__name__}"
        )
    if any(isinstance(n, bool) or not hasattr(n, "__index__") for n in feature_shape):
        raise TypeError(f"{op} expects feature_shape to be a sequence of ints, got {tuple(feature_shape)}")
    if any(n < 1 for n in feature_shape):
        raise ValueError(f"{op} expects feature_shape of sizes >= 1, got {tuple(feature_shape)}")
    return torch.Size(int(n) for n in feature_shape)

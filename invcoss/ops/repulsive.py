"""Repulsive representation learning (Eq. 5): squared cosine similarity to a persistent pool."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from invcoss.ops.checks import (
    check_int,
    check_nonempty,
    check_nonfinite,
    check_positive_float,
    check_same_device,
    check_tensor,
    has_values,
    shape_str,
)
from invcoss.ops.dispatch import resolve


def _check_h(op: str, h: Tensor, dim: int | None = None, name: str = "h", empty_ok: bool = False) -> None:
    check_tensor(op, name, h)
    want = f"(B, {dim})" if dim is not None else "(B, D)"
    if h.ndim != 2 or (dim is not None and h.shape[1] != dim):
        raise ValueError(f"{op} expects {name} of shape {want}, got {shape_str(h.shape)}")
    if not empty_ok:
        check_nonempty(op, name, h, want)


def repulsive_cosine_loss(h: Tensor, pool: Tensor, eps: float = 1e-8, backend: str | None = None) -> Tensor:
    """Mean squared cosine similarity between a batch and a pool of features (Eq. 5).

    ``1/(B P) * sum_ij cos(h_i, p_j)^2`` with ``cos`` from ``h_i / max(|h_i|, eps)`` and the same for
    ``p_j``. The gradient flows to h only; the pool is a constant. An empty pool (P = 0) gives 0
    with a zero gradient. A NaN or inf in h or the pool comes out as a NaN loss.

    Args:
        h: ``(B, D)`` features of the current synthetic batch, B >= 1 and D >= 1.
        pool: ``(P, D)`` past features (need not be normalised).
        eps: lower bound of the norms, a finite number > 0.
        backend: see :func:`invcoss.ops.total_variation`.

    Returns:
        0-dim fp32 loss.

    Raises:
        TypeError: h or pool is not a floating tensor.
        ValueError: an empty h, a pool of another width or device, eps not > 0.

    Example:
        >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> repulsive_cosine_loss(h, torch.tensor([[3.0, 0.0]]), backend="torch")
        tensor(0.5000)
    """
    op = "repulsive_cosine_loss"
    _check_h(op, h)
    check_tensor(op, "pool", pool)
    if pool.ndim != 2 or pool.shape[1] != h.shape[1]:
        raise ValueError(f"{op} expects pool of shape (P, {h.shape[1]}), got {shape_str(pool.shape)}")
    check_same_device(op, "h", h, "pool", pool)
    eps = check_positive_float(op, "eps", eps)
    if pool.shape[0] == 0:
        return (h * 0).float().sum()
    return resolve(backend, h.device, op).repulsive_direct(h, pool.detach(), eps)


class RepulsivePool:
    """Ring buffer of normalised past features with an incrementally maintained Gram matrix.

    ``sum_j cos(h_i, p_j)^2 = h^_i^T G h^_i`` with ``G = sum_j p^_j p^_j^T`` (D x D), so once the pool
    holds more features than their dimension (P > D) :meth:`loss` costs O(B D^2) instead of
    O(B P D). ``G`` is updated with a rank-k product on every push and eviction and rebuilt from the
    stored rows every ``rebuild_every`` pushes, which bounds the rounding drift of the updates.

    Non-finite features (``nonfinite``): :meth:`push` normalises its rows anyway, so it has their
    norms at hand; a row whose norm is not finite (a NaN or inf in it, or values so large that the
    fp32 norm overflows) is never stored, since it would make every later loss NaN. ``"raise"``
    (default) rejects the whole push with a ``ValueError`` naming the rows, before anything is
    stored; ``"skip"`` stores the other rows and counts the rejected ones in :attr:`skipped`. Either
    way each push reads one flag on the host (one synchronisation on CUDA, once per pushed batch,
    not per optimisation step); :meth:`loss`, the per-step path, checks nothing.

    The rows are normalised in fp32 and stored in ``dtype``; bf16 (or fp16) halves the pool's memory
    and lets the direct path run its matmuls on tensor cores for h of the same dtype. The pool keeps
    the stored rows' inverse norms (fp32), so that both paths use exactly the unit vectors
    ``p^_j = stored_j / |stored_j|`` and the direct path reads the stored rows as they are (no copy,
    no renormalisation per call). G stays in ``gram_dtype``.

    Args:
        capacity: the most features kept (the paper uses the number of samples to generate).
        dim: feature dimension D.
        device: where the pool lives.
        eps: lower bound of the norms.
        gram_dtype: dtype of G (fp32 default; fp64 for very long runs).
        rebuild_every: pushes between exact rebuilds of G.
        backend: see :func:`invcoss.ops.total_variation`.
        dtype: dtype of the stored features: fp32 (default), bf16 or fp16.
        nonfinite: ``"raise"`` or ``"skip"`` (above).

    Raises:
        TypeError: capacity, dim or rebuild_every not an int, eps not a number.
        ValueError: capacity, dim or rebuild_every below 1, eps not > 0, a gram_dtype other than
            fp32 and fp64, a dtype other than fp32, bf16 and fp16, another nonfinite.

    Example:
        >>> pool = RepulsivePool(capacity=4, dim=2, backend="torch")
        >>> pool.push(torch.tensor([[3.0, 0.0]]))
        >>> len(pool), pool.loss(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        (1, tensor(0.5000))
    """

    DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(
        self,
        capacity: int,
        dim: int,
        device: torch.device | str | None = None,
        eps: float = 1e-8,
        gram_dtype: torch.dtype = torch.float32,
        rebuild_every: int = 16,
        backend: str | None = None,
        dtype: torch.dtype = torch.float32,
        nonfinite: str = "raise",
    ) -> None:
        op = "RepulsivePool"
        self.capacity = check_int(op, "capacity", capacity, 1)
        self.dim = check_int(op, "dim", dim, 1)
        self.rebuild_every = check_int(op, "rebuild_every", rebuild_every, 1)
        self.eps = check_positive_float(op, "eps", eps)
        if dtype not in self.DTYPES:
            raise ValueError(
                f"RepulsivePool expects dtype torch.float32, torch.bfloat16 or torch.float16, got {dtype}"
            )
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"RepulsivePool expects gram_dtype torch.float32 or torch.float64, got {gram_dtype}"
            )
        self.nonfinite = check_nonfinite(op, nonfinite)
        self.backend = backend
        self.skipped = 0  # rows left out for a non-finite norm (nonfinite="skip")
        self.feats = torch.zeros(self.capacity, self.dim, device=device, dtype=dtype)
        self.inv_norms = torch.zeros(self.capacity, device=device, dtype=torch.float32)  # of the stored rows
        self.gram = torch.zeros(self.dim, self.dim, device=device, dtype=gram_dtype)
        self.size = 0  # rows in use
        self.head = 0  # next row to write
        self.pushes = 0

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored features."""
        return self.feats.dtype

    def features(self) -> Tensor:
        """The kept normalised features, ``(len(pool), D)`` in the pool's dtype, oldest first."""
        if self.size < self.capacity:
            return self.feats[: self.size]
        return torch.cat([self.feats[self.head :], self.feats[: self.head]])

    def _unit_rows(self, start: int, stop: int) -> Tensor:
        """Stored rows ``[start, stop)`` as the fp32 unit vectors both paths use, ``(stop - start, D)``."""
        return self.feats[start:stop].float() * self.inv_norms[start:stop, None]

    def _store(self, dst: int, rows: Tensor) -> None:
        n = rows.shape[0]
        self.feats[dst : dst + n] = rows
        stored = self.feats[dst : dst + n].float()
        self.inv_norms[dst : dst + n] = 1.0 / stored.norm(dim=1).clamp_min(self.eps)

    def push(self, features: Tensor) -> None:
        """Add a batch ``(K, D)`` of features (detached), evicting the oldest when full.

        An empty batch (K = 0) changes nothing. A row with a non-finite norm raises ``ValueError``
        (nothing is stored) or is skipped and counted (``nonfinite``, see the class doc).
        """
        op = "RepulsivePool.push"
        _check_h(op, features, self.dim, name="features", empty_ok=True)
        if features.device != self.device:
            raise ValueError(
                f"{op} expects features on the pool's device {self.device}, got {features.device}"
            )
        if features.shape[0] == 0:
            return
        f = features.detach().float()
        norms = f.norm(dim=1, keepdim=True)  # (K, 1)
        # The one host read of a push: the sum of K norms >= 0 is finite exactly when each one is.
        if has_values(norms) and not math.isfinite(float(norms.sum())):
            finite = torch.isfinite(norms[:, 0])
            if not bool(finite.all()):
                bad = (~finite).nonzero()[:, 0].tolist()
                if self.nonfinite == "raise":
                    rows = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
                    raise ValueError(
                        f"{op}: {len(bad)} of {f.shape[0]} rows of features hold a NaN or inf (or overflow "
                        f"the fp32 norm): rows {rows}; nothing was stored. Pass nonfinite='skip' to "
                        "RepulsivePool to store the other rows (the rejected ones are counted in .skipped)"
                    )
                self.skipped += len(bad)
                f, norms = f[finite], norms[finite]
                if f.shape[0] == 0:
                    return
        f = f / norms.clamp_min(self.eps)
        f = f[-self.capacity :]  # only the newest `capacity` rows can survive this push
        impl = resolve(self.backend, self.device, op)
        start, k = self.head, f.shape[0]
        first = min(k, self.capacity - start)
        # The ring write wraps at most once; rows below the old size hold live features to evict.
        for dst, chunk in ((start, f[:first]), (0, f[first:])):
            n = chunk.shape[0]
            if n == 0:
                continue
            n_live = max(0, min(dst + n, self.size) - dst)
            if n_live:
                impl.gram_update(self.gram, self._unit_rows(dst, dst + n_live), -1.0)
            self._store(dst, chunk)
            impl.gram_update(self.gram, self._unit_rows(dst, dst + n), 1.0)
        self.size = min(self.capacity, self.size + k)
        self.head = (start + k) % self.capacity
        self.pushes += 1
        if self.pushes % self.rebuild_every == 0:
            self.rebuild_gram()

    def rebuild_gram(self) -> None:
        """Recompute G exactly from the stored rows (bounds the drift of the rank-k updates)."""
        self.gram.zero_()
        if self.size:
            resolve(self.backend, self.device, "RepulsivePool.rebuild_gram").gram_update(
                self.gram, self._unit_rows(0, self.size), 1.0
            )

    def loss(self, h: Tensor) -> Tensor:
        """Eq. 5 of h ``(B, D)`` against the pool: the Gram path when P > D, else the direct one.

        The direct path reads the stored rows in place, with their cached inverse norms. An empty
        pool gives 0 with a zero gradient; an empty h (B = 0) is an error; a NaN or inf in h comes
        out as a NaN loss.
        """
        op = "RepulsivePool.loss"
        _check_h(op, h, self.dim)
        check_same_device(op, "h", h, "the pool", self.feats)
        if self.size == 0:
            return (h * 0).float().sum()
        impl = resolve(self.backend, h.device, op)
        if self.size > self.dim:
            return impl.repulsive_gram(h, self.gram, self.size, self.eps)
        return impl.repulsive_direct(h, self.feats[: self.size], self.eps, self.inv_norms[: self.size])

    def state_dict(self) -> dict[str, Tensor]:
        """The kept rows (oldest first, in the pool's dtype) and the configuration; G and the inverse
        norms are recomputed on load."""
        return {
            "features": self.features().clone(),
            "capacity": torch.tensor(self.capacity),
            "pushes": torch.tensor(self.pushes),
            "skipped": torch.tensor(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a pool saved by :meth:`state_dict` (capacity and dim must match; features of
        another dtype are converted to the pool's). The rows are checked where they enter: a NaN
        or inf in them raises ``ValueError``. ``skipped`` is optional (0 when absent)."""
        op = "RepulsivePool.load_state_dict"
        feats = state["features"]
        if int(state["capacity"]) != self.capacity or feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(
                f"{op} expects capacity {self.capacity} and features (P, {self.dim}), "
                f"got capacity {int(state['capacity'])} and features {shape_str(feats.shape)}"
            )
        if feats.shape[0] > self.capacity:
            raise ValueError(f"{op} expects at most {self.capacity} rows of features, got {feats.shape[0]}")
        if has_values(feats) and not bool(torch.isfinite(feats).all()):
            raise ValueError(f"{op}: state['features'] holds a NaN or inf")
        self.skipped = int(state.get("skipped", 0))
        self.size = feats.shape[0]
        self.feats.zero_()
        self.inv_norms.zero_()
        self._store(0, feats.to(self.device, self.dtype))
        self.head = self.size % self.capacity
        self.pushes = int(state["pushes"])
        self.rebuild_gram()

"""The public kernel API of invcoss.

Every op runs on four backends under the same name (see :mod:`invcoss.ops.dispatch`): ``torch``
(the reference), ``triton``, ``cpu`` and ``cuda`` (the C++/CUDA extension). ``backend=None`` picks
the fastest available for the tensor's device; ``INVCOSS_BACKEND`` overrides that default.

Example:
    >>> import torch
    >>> from invcoss import ops
    >>> x = torch.rand(2, 1, 8, 8, requires_grad=True)
    >>> ops.total_variation(x).backward()
    >>> x.grad.shape
    torch.Size([2, 1, 8, 8])
"""

from invcoss.ops.dispatch import (
    BACKEND_NAMES,
    available_backends,
    backend_status,
    default_backend,
    probe_all,
)
from invcoss.ops.repulsive import RepulsivePool, repulsive_cosine_loss
from invcoss.ops.stats import (
    RunningStats,
    StatMatchingLoss,
    batch_mean_var,
    check_reference_stats,
    stat_matching_loss,
)
from invcoss.ops.tv import TotalVariation, total_variation

probe_all()

__all__ = [
    "BACKEND_NAMES",
    "RepulsivePool",
    "RunningStats",
    "StatMatchingLoss",
    "TotalVariation",
    "available_backends",
    "backend_status",
    "batch_mean_var",
    "check_reference_stats",
    "default_backend",
    "probe_all",
    "repulsive_cosine_loss",
    "stat_matching_loss",
    "total_variation",
]

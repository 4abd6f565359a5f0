"""Library calls leave the caller's global random state as they found it, and run at pinned
compute settings.

Training seeds torch's global generator (the MAE masks its patches with ``torch.rand``), which
would otherwise reset the random stream of whoever called it. :func:`keeps_global_rng` runs a
function inside :func:`torch.random.fork_rng` over the CPU generator and every CUDA device's: the
function sees exactly the random numbers it always saw, and the caller's state is restored after,
whether the function returns or raises.

Example:
    >>> @keeps_global_rng
    ... def noisy():
    ...     torch.manual_seed(123)
    ...     return torch.rand(1)
    >>> before = torch.get_rng_state()
    >>> _ = noisy()
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def keeps_global_rng(fn: F) -> F:
    """Decorate ``fn`` so that its changes to the global RNG states do not outlive the call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- compute settings ------------------------------------------------------------------------------
# The thread count is a setting of every run: ATen splits a reduction (a conv3d, a group norm, a
# matmul in MKL) into one chunk per thread, so the float sums are grouped differently at another
# count. The results differ by about 1e-6 (and an inversion amplifies that), while at one count
# they are bit-identical under any load. The inter-op pool only runs work that eager code never
# submits (torch.jit.fork), so its size is recorded but not set.


def _check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")


def compute_record() -> dict:
    """What a manifest records of the compute settings: intra- and inter-op threads, determinism.

    Example:
        >>> sorted(compute_record())
        ['deterministic_algorithms', 'interop_threads', 'threads', 'torch']
    """
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
    }


def resolve_threads(requested: int | None, recorded: int | None, what: str) -> int:
    """The thread count of a run: ``requested``, else the ``recorded`` one of the run being
    resumed, else torch's current count (the machine's cores, or ``OMP_NUM_THREADS``).

    Resuming at another count than the run was made with would make it no longer a function of
    its settings, so that is refused.

    Raises:
        ValueError: ``requested`` is not an int >= 1, or differs from ``recorded``; the message
            names both counts.

    Example:
        >>> resolve_threads(None, 3, "run"), resolve_threads(2, None, "run")
        (3, 2)
        >>> resolve_threads(2, 3, "the run in out")
        Traceback (most recent call last):
        ...
        ValueError: cannot resume the run in out at 2 CPU threads: it was made with 3, and its numbers depend on the count; resume it with 3 (--threads 3)
    """
    _check_threads(requested)
    if requested is not None and recorded is not None and requested != recorded:
        raise ValueError(
            f"cannot resume {what} at {requested} CPU threads: it was made with {recorded}, and its "
            f"numbers depend on the count; resume it with {recorded} (--threads {recorded})"
        )
    if requested is not None:
        return requested
    return recorded if recorded is not None else torch.get_num_threads()


@contextlib.contextmanager
def pinned_compute(threads: int | None = None) -> Iterator[dict]:
    """Run a block at ``threads`` intra-op threads with deterministic algorithms; restore after.

    ``threads=None`` keeps the current count. :func:`torch.use_deterministic_algorithms` is on
    with ``warn_only=True``: on the CPU every op invcoss uses is deterministic at a fixed thread
    count already, so it changes no number there (and costs no measurable time). On CUDA it
    selects the deterministic kernels (cuDNN included) and warns, rather than fails, for an op that
    has none, such as the trilinear upsampling backward of the 3D generator; such a run is not
    bit-identical. It also sets ``CUBLAS_WORKSPACE_CONFIG`` when unset (and leaves it set), which
    cuBLAS reads when it starts and needs for reproducible sums. Yields :func:`compute_record`.

    Raises:
        ValueError: ``threads`` is not None or an int >= 1.

    Example:
        >>> before = torch.get_num_threads()
        >>> with pinned_compute(1) as record:
        ...     record["threads"], torch.are_deterministic_algorithms_enabled()
        (1, True)
        >>> torch.get_num_threads() == before
        True
    """
    _check_threads(threads)
    saved_threads = torch.get_num_threads()
    saved_det = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    saved_benchmark = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        yield compute_record()
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det[0], warn_only=saved_det[1])
        torch.backends.cudnn.benchmark = saved_benchmark


def derive_seed(seed: int, what: str, index: int) -> int:
    """A 63-bit seed from ``(seed, what, index)``, stable across platforms and runs.

    Example:
        >>> derive_seed(0, "z", 1) == derive_seed(0, "z", 1) != derive_seed(0, "z", 2)
        True
    """
    digest = hashlib.sha256(f"{int(seed)}:{what}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

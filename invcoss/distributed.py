"""Several processes, one run: a small layer over :mod:`torch.distributed` for runs under ``torchrun``.

``torchrun --nproc-per-node N -m invcoss.cli ...`` starts N copies of a command and tells each its
place through the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_from_env` reads them and joins the process group: gloo for a CPU
device, NCCL (with gloo beside it for CPU tensors) for a CUDA device, each rank on
``cuda:LOCAL_RANK``. Without those variables, or with ``WORLD_SIZE=1``, it does nothing and returns
``None``: a single process runs exactly as it always did, and every helper below then answers as
for one rank (:func:`rank` is 0, :func:`world_size` is 1, a gather returns a list of one).

Failures: every collective of this module waits at most ``INVCOSS_DIST_TIMEOUT`` seconds (default
:data:`DEFAULT_TIMEOUT_S`) and turns a failure (a peer that crashed, was killed or stopped
answering) into :class:`DistributedError`, whose message names this rank, the collective, the
timeout and what to do (rerun with ``--resume``) instead of hanging or printing a backend trace.
The same timeout bounds the collectives of :class:`torch.nn.parallel.DistributedDataParallel`,
which the process group carries; :func:`failures_explained` converts their errors as well.

Example (one process: nothing to join):
    >>> import os
    >>> "WORLD_SIZE" in os.environ
    False
    >>> init_from_env() is None, rank(), world_size(), is_main()
    (True, 0, 1, True)
    >>> list(shard_indices(10, 1, 3)), list(shard_indices(10, 1, 3, strided=True))
    ([4, 5, 6], [1, 4, 7])
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks before the run stops with :class:`DistributedError`."""

TIMEOUT_ENV = "INVCOSS_DIST_TIMEOUT"
_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, was killed or did not answer within the timeout."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a multi-process run.

    Attributes:
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes (>= 2; one process has no context).
        local_rank: the rank on this machine (picks the CUDA device).
        backend: the process group's backend, ``"gloo"`` or ``"cpu:gloo,cuda:nccl"``.
        device: the device this rank computes on (``cuda:LOCAL_RANK`` for CUDA).
        timeout_s: how long a collective waits before failing.
        owns_group: whether :func:`init_from_env` created the group (only then :func:`destroy` ends it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files and prints."""
        return self.rank == 0


def timeout_from_env() -> float:
    """The collective timeout in seconds: ``INVCOSS_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ValueError: the variable is set to something other than a positive number.

    Example:
        >>> timeout_from_env() == DEFAULT_TIMEOUT_S or TIMEOUT_ENV in os.environ
        True
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} expects a positive number of seconds, got {raw!r}")
    return value


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} expects an integer (set by torchrun), got {raw!r}") from None


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment, 1 when unset (a plain ``python`` launch).

    Example:
        >>> launched_world_size()
        1
    """
    if not os.environ.get("WORLD_SIZE"):
        return 1
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise ValueError(f"WORLD_SIZE expects an integer >= 1, got {world}")
    return world


def init_from_env(
    device: torch.device | str | None = None, timeout: float | None = None
) -> DistContext | None:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the device the command was asked for. Its type picks the backend (CUDA: NCCL with
            gloo beside it; anything else: gloo); a CUDA rank always computes on
            ``cuda:LOCAL_RANK`` (an index given here is replaced). Default: CUDA when available.
        timeout: seconds a collective (and joining) waits for the others; default
            :func:`timeout_from_env`.

    Returns:
        ``None`` for a single process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``), with nothing
        initialised; otherwise the :class:`DistContext` of this rank. When a process group already
        exists (the caller initialised it), its context is returned and left as it is.

    Raises:
        ValueError: a torchrun variable is malformed or missing, or ``timeout`` is not positive.
        DistributedError: the other ranks did not join within the timeout.
    """
    world = launched_world_size()
    if timeout is None:
        timeout = timeout_from_env()
    elif not timeout > 0:
        raise ValueError(f"init_from_env expects timeout > 0 seconds, got {timeout}")
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_available() and dist.is_initialized():
        return _context_of_existing(dev, timeout)
    if world == 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [n for n in _ENV_NAMES if not os.environ.get(n)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
            "torchrun --nproc-per-node N -m invcoss.cli ..."
        )
    rank_, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank_ < world:
        raise ValueError(f"RANK expects an integer in [0, {world}), got {rank_}")
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} needs cuda:{local}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=rank_,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except (RuntimeError, dist.DistError) as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedError(
            f"rank {rank_} of {world}: the process group at {where} did not form within {timeout:g} s "
            f"({TIMEOUT_ENV}): {_first_line(e)}"
        ) from e
    return DistContext(rank_, world, local, backend, dev, float(timeout))


def _context_of_existing(dev: torch.device, timeout: float) -> DistContext:
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
    return DistContext(
        dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()), dev, timeout, owns_group=False
    )


def is_initialized() -> bool:
    """Whether a process group exists (a multi-process run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (always true for one process): it writes shared files and prints."""
    return rank() == 0


def destroy(ctx: DistContext | None = None) -> None:
    """End the process group :func:`init_from_env` created (nothing for ``None`` or a caller's group)."""
    if ctx is not None and ctx.owns_group and is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, rank: int, world: int, strided: bool = False) -> range:
    """The indices of ``n`` samples that ``rank`` of ``world`` processes reads.

    Every index in ``range(n)`` belongs to exactly one rank (none read twice, none dropped). The
    shards are uneven when ``world`` does not divide ``n``: contiguous shards give the first
    ``n % world`` ranks one sample more; strided shards take every ``world``-th sample from ``rank``.
    A rank may get an empty shard when ``n < world``.

    Args:
        n: number of samples, >= 0.
        rank: ``0 <= rank < world``.
        world: number of processes, >= 1.
        strided: interleaved shards instead of contiguous blocks.

    Example:
        >>> [list(shard_indices(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
        >>> [list(shard_indices(5, r, 2, strided=True)) for r in range(2)]
        [[0, 2, 4], [1, 3]]
    """
    for name, value in (("n", n), ("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"shard_indices expects {name} to be an int, got {type(value).__name__}")
    if n < 0:
        raise ValueError(f"shard_indices expects n >= 0, got {n}")
    if world < 1:
        raise ValueError(f"shard_indices expects world >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"shard_indices expects rank in [0, {world}), got {rank}")
    if strided:
        return range(rank, n, world)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def failure_message(what: str, cause: BaseException | str) -> str:
    """The message of a :class:`DistributedError`: who failed where, why, and what to do next."""
    timeout = timeout_from_env()
    reason = cause if isinstance(cause, str) else _first_line(cause)
    return (
        f"rank {rank()} of {world_size()}: {what} failed: another rank stopped (crashed, was killed or ran "
        f"out of memory) or did not answer within {timeout:g} s ({TIMEOUT_ENV}). Finished outputs are "
        f"kept; rerun the same command with --resume to continue. Cause: {reason}"
    )


@contextlib.contextmanager
def failures_explained(what: str) -> Iterator[None]:
    """Turn an error of torch.distributed inside the block into :class:`DistributedError`.

    For a process group only: with one process the block runs untouched. Catches
    :class:`torch.distributed.DistError` and the ``RuntimeError`` a backend raises when a peer's
    connection closes or a collective times out (DDP's gradient all-reduce inside ``backward``).
    """
    if not is_initialized():
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except dist.DistError as e:
        raise DistributedError(failure_message(what, e)) from e
    except RuntimeError as e:
        text = str(e).lower()
        if any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "c10d")):
            raise DistributedError(failure_message(what, e)) from e
        raise


def barrier() -> None:
    """Wait until every rank arrives (nothing for one process).

    On gloo it is :func:`torch.distributed.monitored_barrier`, whose error names the ranks that did
    not arrive within the timeout.
    """
    if not is_initialized():
        return
    with failures_explained("barrier"):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(
                timeout=datetime.timedelta(seconds=timeout_from_env()), wait_all_ranks=True
            )
        else:
            dist.barrier()


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process.

    Example:
        >>> all_gather_object({"files": 3})
        [{'files': 3}]
    """
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    with failures_explained("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (other ranks' ``obj`` is ignored); ``obj`` for one process.

    Example:
        >>> broadcast_object([1, 2])
        [1, 2]
    """
    if not is_initialized():
        return obj
    box = [obj]
    with failures_explained("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T], share: bool = True) -> T | None:
    """Call ``fn()`` on rank 0 only, and let every rank share its outcome.

    For a check or a read that must happen once (a shared folder, an input file): the others wait
    for rank 0, then return its value (``share``; it must pickle) or None, or raise the exception
    it raised, so every rank stops with the same error (a user error exits 2 on every rank instead
    of one rank exiting while the others wait). For one process it is ``fn()``.

    Example:
        >>> on_main(lambda: 6 * 7)
        42
    """
    if not is_initialized():
        return fn()
    value, error = None, None
    if rank() == 0:
        try:
            value = fn()
        except Exception as e:  # shared with the other ranks, then raised on every rank
            error = e
    outcome = broadcast_object((value if share else None, _picklable(error)))
    if outcome[1] is not None:
        if rank() == 0:
            raise error
        raise outcome[1]
    return value if rank() == 0 else outcome[0]


def on_all(fn: Callable[[], T]) -> T:
    """Call ``fn()`` on every rank; when it raises on any rank, raise on every rank.

    For a step where each rank checks its own files before the ranks work together: a rank that
    finds a problem does not leave the others waiting in the next collective. A rank whose own
    call failed raises its own exception; the others raise the lowest failing rank's. For one
    process it is ``fn()``.

    Example:
        >>> on_all(lambda: "mine")
        'mine'
    """
    if not is_initialized():
        return fn()
    value, error = None, None
    try:
        value = fn()
    except Exception as e:  # shared with the other ranks, then raised on every rank
        error = e
    failed = [e for e in all_gather_object(_picklable(error)) if e is not None]
    if error is not None:
        raise error
    if failed:
        raise failed[0]
    return value


def _picklable(error: Exception | None) -> Exception | None:
    """``error``, or a RuntimeError with its message when it does not pickle (to send it to other ranks)."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def all_gather_tensors(t: Tensor) -> list[Tensor]:
    """Every rank's tensor, in rank order; the first dimension may differ between ranks.

    Args:
        t: ``(N_r, *F)`` with the same trailing shape ``F`` and dtype on every rank (N_r may be 0).

    Returns:
        ``[t_0, ..., t_{W-1}]`` on ``t``'s device; ``[t]`` for one process.

    Example:
        >>> [x.shape for x in all_gather_tensors(torch.zeros(3, 2))]
        [torch.Size([3, 2])]
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"all_gather_tensors expects a Tensor, got {type(t).__name__}")
    if t.ndim < 1:
        raise ValueError("all_gather_tensors expects t of shape (N, *F), got a 0-dim tensor")
    if not is_initialized():
        return [t]
    world = dist.get_world_size()
    with failures_explained("all_gather_tensors"):
        sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
        counts = [int(s.item()) for s in sizes]
        # all_gather needs equal shapes: pad every contribution to the longest, then cut.
        longest = max(counts)
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return [p[:c] for p, c in zip(parts, counts)]


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks, as a new tensor (a copy of ``t`` for one process).

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"all_reduce_sum expects a Tensor, got {type(t).__name__}")
    out = t.detach().clone()
    if is_initialized():
        with failures_explained("all_reduce_sum"):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def batch_part(n: int) -> range:
    """The positions of a global batch of ``n`` samples that this rank computes (contiguous; all for one process).

    A training step splits every global batch this way, so the batches, their order and each
    sample's place in them are the same for any number of ranks; a rank's part may be empty when
    ``n`` is smaller than the number of ranks.

    Example:
        >>> batch_part(5)
        range(0, 5)
    """
    return shard_indices(n, rank(), world_size())


class _StepModule(nn.Module):
    """Holds the model so that DDP's forward can run any closure over it (a loss of several calls)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def data_parallel(
    model: nn.Module, device: torch.device | None = None, find_unused_parameters: bool = True
) -> Callable[..., Any]:
    """``run(fn, *args)`` that computes ``fn(model, *args)``, inside DistributedDataParallel under a process group.

    A step's loss often needs more than ``model.forward`` (an encoder pass against a teacher, a
    decoder on its latent); DDP averages the gradients only of what runs inside its own forward, so
    the closure runs there. DDP broadcasts rank 0's parameters when it wraps the model and
    all-reduces (averages) the gradients in ``backward``, so the ranks stay identical. For one
    process ``run`` just calls ``fn``.

    Args:
        model: the module whose parameters train; on ``device`` already.
        device: the rank's device (a CUDA device is DDP's ``device_ids``).
        find_unused_parameters: let steps leave parameters out. True by default: the MAE holds a
            2D and a 3D patch embedding and uses one per batch, and a distillation step may skip
            the decoder.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> run = data_parallel(lin)
        >>> run(lambda m, x: m(x).sum(), torch.zeros(3, 2)).shape
        torch.Size([])
    """
    if not is_initialized():
        return lambda fn, *args: fn(model, *args)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device is not None and device.type == "cuda" else None
    with failures_explained("wrapping the model in DistributedDataParallel"):
        return DistributedDataParallel(
            _StepModule(model),
            device_ids=ids,
            find_unused_parameters=find_unused_parameters,
        )

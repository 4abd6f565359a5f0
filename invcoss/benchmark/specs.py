"""The benchmark specs: for each op family, its inputs, reference, fused callables and minimum work.

One table, :data:`FAMILIES`, holds a spec per family: ``tv``, ``stats`` and ``repulsive`` (an
:class:`OpFamily` each) and ``inversion`` (the whole inversion step, an
:class:`~invcoss.benchmark.inversion.InversionFamily`). An op family makes one set of inputs for a
shape and times one or more ops on them (``stats``: the stat-matching loss and the Welford update;
``repulsive``: the direct formula and RepulsivePool's Gram path). Each :class:`Op` says

- ``reference``: the eager torch callable (:mod:`invcoss.ops.backend_torch`), which the
  ``eager`` and ``compile`` providers run;
- ``fused``: the callable of one fused backend (``cpu``, ``cuda``, ``triton``);
- ``work``: the bytes and flops any implementation of one call must move or compute, at the least;
- ``oracle``: the forward value from the float64 numpy formulation of :mod:`invcoss.benchmark.refs`
  (the tests' oracle too), against which :func:`oracle_error` judges the eager reference itself.

:func:`make_inputs`, :func:`build` and :func:`work` look a :class:`Case` up in this table; nothing
else in the harness knows one op from another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from invcoss import ops
from invcoss.benchmark.inversion import INVERSION, InversionFamily
from invcoss.benchmark.providers import REFERENCE_PROVIDERS
from invcoss.benchmark.refs import repulsive_ref, stat_matching_ref, to_np, tv_ref
from invcoss.ops import backend_torch as ref
from invcoss.ops.moments import chan_merge

MODES = ("fwd", "fwd+bwd")

Inputs = dict[str, Tensor]
Draw = Callable[..., Tensor]  # draw(*shape): seeded standard normal values on the device, in the dtype
Call = Callable[[Tensor], object]  # a callable of the op's argument: the loss, or the folded state
Work = tuple[float | None, float | None]  # (bytes, flops); None where the op has no such count


@dataclass(frozen=True)
class Op:
    """One timed op of a family: its callables on the family's inputs, and its minimum work.

    ``reference(inputs, **options)`` and ``fused(inputs, backend, **options)`` return a callable of
    ``arg(inputs)`` (the tensor a ``fwd+bwd`` row differentiates in); they build whatever state the
    op keeps (a pool, a running state) outside the timed call. ``options`` are a case's
    :attr:`Case.options`. ``work(shape, mode, itemsize)`` gives ``(bytes, flops)``.
    """

    name: str  # the rows' op name: tv, stat_matching, welford, repulsive_direct, repulsive_pool
    reference: Callable[..., Call]
    fused: Callable[..., Call]
    work: Callable[[tuple[int, ...], str, int], Work]
    arg: Callable[[Inputs], Tensor]
    tiny: tuple[int, ...]  # a shape the Triton interpreter runs in milliseconds (tests, rehearsal)
    modes: tuple[str, ...] = MODES
    oracle: Callable[[Inputs], object] | None = None  # float64 numpy value of the forward call


@dataclass(frozen=True)
class OpFamily:
    """An op family (``kernels/<name>.py``, ``benchmarks/bench_<name>.py``): its inputs and ops.

    ``inputs(shape, draw)`` makes the tensors every op and provider of a case share.
    """

    name: str
    inputs: Callable[[tuple[int, ...], Draw], Inputs]
    ops: tuple[Op, ...]


def _passes(mode: str) -> int:
    # Forward reads the input once; backward reads it again and writes a gradient of its size.
    return 3 if mode == "fwd+bwd" else 1


# ---- tv ---------------------------------------------------------------------------------------------


def _tv_inputs(shape: tuple[int, ...], draw: Draw) -> Inputs:
    return {"x": draw(*shape).clamp_(-1, 1)}  # x: (B, C, H, W) or (B, C, D, H, W)


def _tv_reference(inputs: Inputs) -> Call:
    weights = (1.0,) * (inputs["x"].ndim - 2)
    return lambda t: ref.tv(t, weights).sum()


def _tv_fused(inputs: Inputs, backend: str) -> Call:
    return lambda t: ops.total_variation(t, reduction="sum", backend=backend)


def _tv_work(shape: tuple[int, ...], mode: str, itemsize: int) -> Work:
    # Forward reads x; backward reads x again and writes the gradient (3 passes in all). A design
    # that keeps a gradient from the forward pass moves more, not less.
    return float(math.prod(shape) * itemsize * _passes(mode)), None


def _tv_oracle(inputs: Inputs) -> object:
    return tv_ref(to_np(inputs["x"]))[0].sum()


TV = OpFamily(
    "tv",
    _tv_inputs,
    (
        Op(
            "tv",
            _tv_reference,
            _tv_fused,
            _tv_work,
            arg=lambda i: i["x"],
            tiny=(2, 1, 3, 8, 8),
            oracle=_tv_oracle,
        ),
    ),
)


# ---- stats ------------------------------------------------------------------------------------------


def _stats_inputs(shape: tuple[int, ...], draw: Draw) -> Inputs:
    b, *feat = shape
    # The target statistics stay fp32, as stored statistics are; only the features change dtype.
    return {"x": draw(b, *feat), "mean": draw(*feat).float() * 0.1, "var": draw(*feat).float().abs()}


def _stat_matching_reference(inputs: Inputs) -> Call:
    mean, var = inputs["mean"].reshape(-1), inputs["var"].reshape(-1)
    return lambda t: ref.stat_matching(t.reshape(t.shape[0], -1), mean, var)


def _stat_matching_fused(inputs: Inputs, backend: str) -> Call:
    mean, var = inputs["mean"], inputs["var"]
    return lambda t: ops.stat_matching_loss(t, mean, var, backend=backend)


def _stat_matching_work(shape: tuple[int, ...], mode: str, itemsize: int) -> Work:
    # The same three passes as TV; the statistics vectors are negligible.
    return float(math.prod(shape) * itemsize * _passes(mode)), None


def _stat_matching_oracle(inputs: Inputs) -> object:
    x = to_np(inputs["x"])
    x = x.reshape(x.shape[0], -1)
    return stat_matching_ref(x, to_np(inputs["mean"]).reshape(-1), to_np(inputs["var"]).reshape(-1))[0]


def _batch_rows(inputs: Inputs) -> Tensor:
    x = inputs["x"]
    return x.reshape(x.shape[0], -1)  # (B, F)


def _running_state(x: Tensor, dtype: torch.dtype, backend: str) -> ops.RunningStats:
    # A non-empty state, so every timed call merges.
    state = ops.RunningStats(x.shape[1:], device=x.device, dtype=dtype, backend=backend)
    state.update(x)
    return state


def _welford_reference(inputs: Inputs, state_dtype: torch.dtype = torch.float32) -> Call:
    state = _running_state(_batch_rows(inputs), state_dtype, "torch")
    count, mean, m2 = state.count, state.mean, state.m2

    def fold(t: Tensor) -> tuple[Tensor, Tensor]:
        # The plain-torch way: var_mean of the batch, then Chan's merge into the state.
        var_b, mean_b = torch.var_mean(t.to(mean.dtype), dim=0, correction=0)
        _, new_mean, new_m2 = chan_merge(count, mean, m2, t.shape[0], mean_b, var_b * t.shape[0])
        return new_mean, new_m2

    return fold


def _welford_fused(inputs: Inputs, backend: str, state_dtype: torch.dtype = torch.float32) -> Call:
    state = _running_state(_batch_rows(inputs), state_dtype, backend)

    def update(t: Tensor) -> tuple[Tensor, Tensor]:
        state.update(t)  # in place; the first call folds the same batch as the reference's call
        return state.mean, state.m2

    return update


def _welford_work(shape: tuple[int, ...], mode: str, itemsize: int) -> Work:
    return float(math.prod(shape) * itemsize), None  # reads the batch once


STATS = OpFamily(
    "stats",
    _stats_inputs,
    (
        Op(
            "stat_matching",
            _stat_matching_reference,
            _stat_matching_fused,
            _stat_matching_work,
            arg=lambda i: i["x"],
            tiny=(4, 5, 8),
            oracle=_stat_matching_oracle,
        ),
        Op(
            "welford",
            _welford_reference,
            _welford_fused,
            _welford_work,
            arg=_batch_rows,
            tiny=(4, 5, 8),
            modes=("fwd",),
        ),
    ),
)


# ---- repulsive --------------------------------------------------------------------------------------


def _repulsive_inputs(shape: tuple[int, ...], draw: Draw) -> Inputs:
    b, p, d = shape
    return {"h": draw(b, d), "pool": draw(p, d)}  # h: (B, D), pool: (P, D)


def _repulsive_reference(inputs: Inputs) -> Call:
    # The direct formula through the B x P similarity matrix: the reference of both repulsive ops.
    pool = inputs["pool"]
    return lambda h: ref.repulsive_direct(h, pool, 1e-8)


def _repulsive_direct_fused(inputs: Inputs, backend: str) -> Call:
    pool = inputs["pool"]
    return lambda h: ops.repulsive_cosine_loss(h, pool, backend=backend)


def _repulsive_pool_fused(inputs: Inputs, backend: str) -> Call:
    feats = inputs["pool"]
    pool = ops.RepulsivePool(feats.shape[0], feats.shape[1], device=feats.device, backend=backend)
    pool.push(feats)  # built here, outside the timed call
    return pool.loss


def _repulsive_oracle(inputs: Inputs) -> object:
    return repulsive_ref(to_np(inputs["h"]), to_np(inputs["pool"]))[0]


def _repulsive_direct_work(shape: tuple[int, ...], mode: str, itemsize: int) -> Work:
    # Reads h and the pool; the cosine matrix h^ p^T is 2 B P D flops and the gradient c p^ another
    # 2 B P D; backward reads both again and writes the gradient.
    b, p, d = shape
    reads = (b + p) * d * itemsize
    if mode == "fwd+bwd":
        return float(2 * reads + b * d * itemsize), 4.0 * b * p * d
    return float(reads), 2.0 * b * p * d


def _repulsive_pool_work(shape: tuple[int, ...], mode: str, itemsize: int) -> Work:
    # The Gram path: h^ G h^ is 2 B D^2 flops; the gradient reuses G h^ (a saved (B, D)), so fwd+bwd
    # needs no more matmul flops; G is read as fp32.
    b, _, d = shape
    nbytes = b * d * itemsize * _passes(mode) + d * d * 4 * (2 if mode == "fwd+bwd" else 1)
    return float(nbytes), 2.0 * b * d * d


REPULSIVE = OpFamily(
    "repulsive",
    _repulsive_inputs,
    (
        Op(
            "repulsive_direct",
            _repulsive_reference,
            _repulsive_direct_fused,
            _repulsive_direct_work,
            arg=lambda i: i["h"],
            tiny=(3, 6, 4),
            oracle=_repulsive_oracle,
        ),
        Op(
            "repulsive_pool",
            _repulsive_reference,
            _repulsive_pool_fused,
            _repulsive_pool_work,
            arg=lambda i: i["h"],
            tiny=(3, 9, 4),
            oracle=_repulsive_oracle,
        ),
    ),
)


# ---- the table --------------------------------------------------------------------------------------

FAMILIES: Mapping[str, OpFamily | InversionFamily] = {f.name: f for f in (TV, STATS, REPULSIVE, INVERSION)}
# Each op by name, with its family: what a Case names.
OPS: Mapping[str, tuple[OpFamily, Op]] = {
    op.name: (family, op) for family in (TV, STATS, REPULSIVE) for op in family.ops
}


@dataclass(frozen=True)
class Case:
    """One op at one shape: a row of the tables for each of its modes and providers.

    ``modes`` defaults to the op's; ``options`` are keyword arguments of its callables (``welford``:
    ``state_dtype``, the dtype of the running state).

    Example:
        >>> Case("welford", (256, 197, 768)).name, Case("welford", (256, 197, 768)).modes
        ('welford[256x197x768]', ('fwd',))
        >>> Case("tv", (48, 1, 16, 192, 192), "paper").family
        'tv'
    """

    op: str
    shape: tuple[int, ...]
    tag: str = ""  # e.g. "paper" for the paper's shapes
    modes: tuple[str, ...] | None = None
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Case expects op in {sorted(OPS)}, got {self.op!r}")
        if self.modes is None:
            object.__setattr__(self, "modes", OPS[self.op][1].modes)

    @property
    def name(self) -> str:
        return f"{self.op}{'-' + self.tag if self.tag else ''}[{'x'.join(map(str, self.shape))}]"

    @property
    def family(self) -> str:
        """The op family: tv, stats or repulsive."""
        return OPS[self.op][0].name

    @property
    def spec(self) -> Op:
        return OPS[self.op][1]


def tiny_cases() -> list[Case]:
    """One case per op at its tiny shape (the tests and the GPU check's rehearsal)."""
    return [Case(name, op.tiny) for name, (_, op) in OPS.items()]


def make_inputs(case: Case, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Inputs of ``case``: seeded normal values drawn on the CPU, then moved to ``device`` in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return OPS[case.op][0].inputs(case.shape, draw)


def build(case: Case, provider: str, mode: str, inputs: Inputs) -> Callable[[], object]:
    """A zero-argument callable that runs ``case`` once for ``provider`` in ``mode``.

    It returns what the call computed: the loss (``fwd``), the gradient of the op's argument
    (``fwd+bwd``), or the folded ``(mean, m2)`` (``welford``).
    """
    op, options = case.spec, dict(case.options)
    if provider in REFERENCE_PROVIDERS:
        f = op.reference(inputs, **options)
        if provider == "compile":
            f = torch.compile(f, dynamic=False)
    else:
        f = op.fused(inputs, provider, **options)
    return _with_grad(f, op.arg(inputs), mode == "fwd+bwd")


def _with_grad(f: Call, arg: Tensor, backward: bool) -> Callable[[], object]:
    if not backward:

        def run_fwd() -> object:
            with torch.no_grad():
                return f(arg)

        return run_fwd
    leaf = arg.detach().requires_grad_()

    def run_fwd_bwd() -> Tensor:
        leaf.grad = None
        loss = f(leaf)
        loss.backward()
        return leaf.grad

    return run_fwd_bwd


def work(case: Case, mode: str, itemsize: int) -> Work:
    """(bytes, flops) that any implementation of one call must move or compute, at the least.

    ``itemsize`` is the element size of the inputs (the gradient has the input's dtype). Forward and
    backward are separate calls under autograd, so ``fwd+bwd`` counts what each must do (the counts
    of each op are in its ``work`` function in this module).

    Example:
        >>> work(Case("tv", (2, 3, 4, 5)), "fwd+bwd", 4)  # x read twice, the gradient written once
        (1440.0, None)
    """
    return case.spec.work(case.shape, mode, itemsize)


# ---- agreement with the reference --------------------------------------------------------------------

# The largest normwise relative difference, |value - reference| / |reference|, a provider may have from
# the eager reference before it is timed, by input dtype. Normwise, because a benchmark's reductions
# are large and some outputs tiny (a repulsive gradient), where elementwise tolerances either fail on
# rounding or pass anything; per-element checks against float64 numpy are the tests' job
# (tests/ops/, against invcoss.benchmark.refs).
AGREEMENT: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


def _parts(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [torch.as_tensor(value[k]) for k in sorted(value)]
    return [torch.as_tensor(v) for v in value]


def relative_error(value: object, reference: object) -> float:
    """The largest normwise relative difference between two results, in float64.

    A result is a tensor, a tuple of tensors, or a dict of numbers (the inversion step's losses,
    compared term by term); where a reference part is all zeros its difference counts absolutely.

    Example:
        >>> relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0]))  # |(0, 0.5)| / |(3, 4)|
        0.1
    """
    keys = [set(v) if isinstance(v, dict) else None for v in (value, reference)]
    if keys[0] != keys[1]:
        raise ValueError(f"relative_error expects results of one structure, got {value!r} and {reference!r}")
    errs = []
    for a, b in zip(_parts(value), _parts(reference), strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        diff, scale = (a - b).norm().item(), b.norm().item()
        errs.append(diff / scale if scale > 0 else diff)
    return math.nan if any(math.isnan(e) for e in errs) else max(errs, default=0.0)


def assert_agrees(value: object, reference: object, dtype: torch.dtype, what: str) -> None:
    """Raise AssertionError when ``value`` is further from ``reference`` than :data:`AGREEMENT` allows."""
    err, tol = relative_error(value, reference), AGREEMENT[dtype]
    if not err <= tol:
        raise AssertionError(
            f"{what}: differs from the eager reference by {err:.2e} (normwise relative), "
            f"more than the {tol:.0e} allowed in {str(dtype).replace('torch.', '')}"
        )


def oracle_error(case: Case, inputs: Inputs) -> float | None:
    """Normwise relative error of the eager reference's forward value against the float64 oracle.

    None for an op without an oracle (the Welford update, whose result is a running state).
    Meant for small inputs: the oracle runs in numpy on the CPU.
    """
    spec = case.spec
    if spec.oracle is None:
        return None
    with torch.no_grad():
        value = spec.reference(inputs, **dict(case.options))(spec.arg(inputs))
    return relative_error(value, torch.as_tensor(spec.oracle(inputs), dtype=torch.float64))

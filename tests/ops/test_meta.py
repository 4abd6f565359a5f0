"""Meta and fake tensors on every op and backend: shapes and dtypes for torch.compile and torch.export.

Each case runs once on real CPU tensors and once on meta tensors (and under ``FakeTensorMode``) and
must give outputs and gradients of the same shapes and dtypes; the values checks of the stateful
ops (RunningStats, RepulsivePool) step aside, as there are no values. ``torch.export`` of a small
module over the ops gives a program that computes what the module does.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from invcoss import ops
from tests.ops.backends import DEVICE
from tests.ops.tolerances import assert_matches


def _losses(backend: str | None, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every op forward and backward on tensors created on ``device``; the outputs and gradients."""
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x = new(2, 1, 3, 5, 4).requires_grad_()
    feats = new(5, 3, 8).requires_grad_()
    h = new(4, 8).requires_grad_()
    mean, var = torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device)
    tv = ops.total_variation(x, backend=backend)
    tv_none = ops.total_variation(x, reduction="none", weights=(0.5, 1.0, 1.0), backend=backend)
    bm, bv = ops.batch_mean_var(feats, backend=backend)
    sm = ops.StatMatchingLoss(mean, var, backend=backend)(feats)
    rep = ops.repulsive_cosine_loss(h, new(6, 8), backend=backend)
    pool = ops.RepulsivePool(12, 8, device=device, backend=backend)
    pool.push(new(5, 8))
    direct = pool.loss(h)  # P <= D: the direct path
    pool.push(new(7, 8))
    gram = pool.loss(h)  # P > D: the Gram path
    rs = ops.RunningStats((3, 8), device=device, backend=backend)
    rs.update(feats.detach())
    rs.update(feats.detach()[:2])
    total = tv + tv_none.sum() + bm.sum() + bv.sum() + sm + rep + direct + gram
    grads = torch.autograd.grad(total, (x, feats, h))
    return [tv, tv_none, bm, bv, sm, rep, direct, gram, rs.mean, rs.var, pool.gram, *grads]


def _signature(tensors: list[torch.Tensor]) -> list[tuple]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def test_every_op_runs_on_meta_tensors(backend, dtype=torch.float32):
    real = _signature(_losses(backend, DEVICE, dtype))
    meta = _losses(backend, "meta", dtype)
    assert all(t.device.type == "meta" for t in meta)
    assert _signature(meta) == real


def test_meta_tensors_with_the_default_backend(monkeypatch):
    monkeypatch.delenv("INVCOSS_BACKEND", raising=False)
    assert ops.default_backend(torch.device("meta")) == ops.default_backend(torch.device("cpu"))
    assert _signature(_losses(None, "meta", torch.float32)) == _signature(_losses(None, "cpu", torch.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_meta_tensors_skip_the_value_checks(backend):
    # A NaN cannot be seen on meta tensors: the stateful ops check nothing there, and say nothing.
    rs = ops.RunningStats((3,), device="meta", backend=backend)
    rs.update(torch.full((2, 3), float("nan"), device="meta"))
    rs.check()
    pool = ops.RepulsivePool(4, 3, device="meta", backend=backend)
    pool.push(torch.empty(2, 3, device="meta"))
    assert len(pool) == 2


def test_every_op_runs_on_fake_tensors(backend, dtype=torch.bfloat16):
    real = _signature(_losses(backend, DEVICE, dtype))
    with FakeTensorMode():
        fake = _losses(backend, DEVICE, dtype)
    assert _signature(fake) == real


class _Objective(torch.nn.Module):
    """A tiny inversion objective over every loss op, with its statistics and pool as buffers."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.stat = ops.StatMatchingLoss(torch.zeros(3, 8), torch.ones(3, 8), backend=backend)
        self.tv = ops.TotalVariation(weights=(1.0, 0.5), backend=backend)
        self.pool = torch.nn.Buffer(torch.randn(6, 8))

    def forward(self, x: torch.Tensor, feats: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        mean, var = ops.batch_mean_var(feats, backend=self.backend)
        rep = ops.repulsive_cosine_loss(h, self.pool, backend=self.backend)
        return self.tv(x) + self.stat(feats) + rep + mean.sum() + var.sum()


def test_torch_export_of_a_module_over_the_ops(backend):
    module = _Objective(backend).to(DEVICE)
    args = tuple(torch.randn(*s, device=DEVICE) for s in ((2, 1, 5, 6), (4, 3, 8), (3, 8)))
    batch = {0: torch.export.Dim.AUTO}  # symbolic batch sizes through every fake kernel
    program = torch.export.export(module, args, dynamic_shapes=(batch, batch, batch))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    namespace = {"torch": None, "triton": "invcoss_triton."}.get(
        backend, "invcoss."
    )  # cpu, cuda: the extension
    if namespace is not None:  # the fused ops stay whole in the graph
        assert {f"{namespace}tv.default", f"{namespace}stat_matching.default"} <= targets
    other = tuple(torch.randn(*s, device=DEVICE) for s in ((3, 1, 5, 6), (7, 3, 8), (5, 8)))
    assert_matches(program.module()(*other), module(*other), torch.float32)

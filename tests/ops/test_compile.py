"""torch.compile(fullgraph=True) graphs every op on every backend, forward and backward (SPEC 2).

The fused ops are ``torch.library`` custom ops with fake implementations and autograd formulas, so
Dynamo traces them as opaque nodes with no graph break. On CPU tensors the Triton ops run through
the interpreter, and the ``aot_eager`` backend (Dynamo and AOTAutograd, which is where the
registration matters) stands in for inductor, which would only add its C++ compilation of the
surrounding elementwise ops.
"""

import torch

from invcoss import ops
from tests.ops.backends import DEVICE, interpreted, make
from tests.ops.tolerances import assert_matches


def _losses(backend, x, feats, h, mean, var, pool):
    tv = ops.total_variation(x, reduction="mean", backend=backend)
    bm, bv = ops.batch_mean_var(feats, backend=backend)
    sm = ops.stat_matching_loss(feats, mean, var, backend=backend)
    rep = ops.repulsive_cosine_loss(h, pool, backend=backend)
    return tv + sm + 0.1 * rep.square() + bm.sum() + bv.sum()


def _compiler(backend: str | None) -> str:
    return "aot_eager" if backend is not None and interpreted(backend) else "inductor"


def _inputs():
    x, feats, h = make((2, 1, 3, 6, 5)), make((5, 3, 8)), make((4, 8))
    return x, feats, h, make((3, 8)), make((3, 8)).abs(), make((7, 8))


def _check_compiled(backend: str | None) -> None:
    inputs = _inputs()
    eager_in = [t.clone().requires_grad_(i < 3) for i, t in enumerate(inputs)]
    comp_in = [t.clone().requires_grad_(i < 3) for i, t in enumerate(inputs)]
    eager = _losses(backend, *eager_in)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _losses(backend, *a), fullgraph=True, backend=_compiler(backend))
    out = compiled(*comp_in)
    out.backward()
    assert_matches(out, eager, torch.float32)
    for a, b in zip(comp_in[:3], eager_in[:3]):
        assert_matches(a.grad, b.grad, torch.float32)


def test_compile_fullgraph_matches_eager(backend):
    _check_compiled(backend)


def test_compile_default_backend(monkeypatch):
    # backend=None: the choice (and INVCOSS_BACKEND) is read while tracing, still without a break.
    monkeypatch.delenv("INVCOSS_BACKEND", raising=False)
    _check_compiled(None)


def test_compile_pool_loss_gram_path(backend):
    pool = ops.RepulsivePool(capacity=12, dim=4, device=DEVICE, backend=backend)
    pool.push(make((12, 4)))
    h = make((3, 4)).requires_grad_()
    eager = pool.loss(h)
    (eager_grad,) = torch.autograd.grad(eager, h)
    torch._dynamo.reset()
    compiled = torch.compile(pool.loss, fullgraph=True, backend=_compiler(backend))(h)
    (compiled_grad,) = torch.autograd.grad(compiled, h)
    assert_matches(compiled, eager, torch.float32)
    assert_matches(compiled_grad, eager_grad, torch.float32)

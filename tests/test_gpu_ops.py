"""Every op on the device backends (triton, cuda) against the torch reference on device tensors.

These run where a CUDA device exists (benchmarks/gpu_check.sh runs them with TRITON_INTERPRET=0).
``INVCOSS_TEST_DEVICE=cpu`` runs the same tests on CPU tensors, with the ``cpu`` backend in place of
``cuda`` and Triton through the interpreter, on the small shapes only: that is the GPU check's
rehearsal (``gpu_check.sh --rehearse``). Elsewhere the module is skipped, and the same kernels are
tested through the interpreter (tests/test_triton_ops.py) and as compiled objects
(tests/test_triton_aot.py, tests/test_ext_build.py).

The backends are not filtered by what is available: a device backend that is missing (the
extension did not build, Triton does not import) fails every test of it, with the reason.
"""

import math
import os

import pytest
import torch

from invcoss import ops
from invcoss.ops.dispatch import unavailable_reason
from tests.ops.tolerances import tol

DEVICE = os.environ.get("INVCOSS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not DEVICE or (DEVICE == "cuda" and INTERPRET) or (DEVICE == "cpu" and not INTERPRET),
    reason="needs a CUDA device and TRITON_INTERPRET=0 (or INVCOSS_TEST_DEVICE=cpu with the interpreter)",
)
GPU_BACKENDS = ["triton", "cpu" if DEVICE == "cpu" else "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Under the interpreter (the rehearsal) only inputs up to this many elements run.
REHEARSAL_NUMEL = 4096


@pytest.fixture(autouse=True)
def _backend_present(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend is not None and backend not in ops.available_backends():
        pytest.fail(f"backend {backend!r} is missing on {DEVICE}: {unavailable_reason(backend)}")


def _sizes(shapes):
    """``shapes``, or on CPU tensors (the rehearsal) the ones small enough for the interpreter."""
    if DEVICE != "cpu":
        return shapes
    return [s for s in shapes if math.prod(s) <= REHEARSAL_NUMEL]


def _cuda(shape, dtype, contiguous=True):
    if contiguous:
        return torch.randn(shape, device=DEVICE).to(dtype)
    return torch.randn(*shape[:-1], shape[-1] + 5, device=DEVICE).to(dtype)[..., : shape[-1]]


def _check(a, b, dtype, numel):
    t = tol(dtype, numel)
    if dtype != torch.float32:  # low precision: at most the error of plain torch in that dtype, x2
        t = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), **t)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "shape", _sizes([(1, 1, 1, 1), (3, 2, 37, 129), (2, 1, 5, 31, 67), (48, 1, 16, 96, 96)]), ids=str
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_tv(backend, shape, dtype, contiguous):
    x = _cuda(shape, dtype, contiguous).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = [1.0, 0.5, 2.0][: x.ndim - 2]
    out = ops.total_variation(x, "none", w, backend=backend)
    ref = ops.total_variation(xr, "none", w, backend="torch")
    _check(out, ref, dtype, x.numel())
    g = torch.rand_like(ref)
    out.backward(g), ref.backward(g)
    _check(x.grad, xr.grad, dtype, x.numel())
    again = ops.total_variation(x.detach(), "none", w, backend=backend)
    assert torch.equal(again, out.detach())  # deterministic: bitwise equal


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", _sizes([(1, 1), (7, 13), (48, 145, 768), (5, 3, 11)]), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_stats(backend, shape, dtype, contiguous):
    x = _cuda(shape, dtype, contiguous).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    mu, var = torch.randn(shape[1:], device=DEVICE), torch.rand(shape[1:], device=DEVICE)
    m, v = ops.batch_mean_var(x.detach(), backend=backend)
    mr, vr = ops.batch_mean_var(xr.detach(), backend="torch")
    _check(m, mr, dtype, x.numel())
    _check(v, vr, dtype, x.numel())
    loss = ops.stat_matching_loss(x, mu, var, backend=backend)
    ref = ops.stat_matching_loss(xr, mu, var, backend="torch")
    _check(loss, ref, dtype, x.numel())
    loss.backward(), ref.backward()
    _check(x.grad, xr.grad, dtype, x.numel())
    rs, rr = (
        ops.RunningStats(shape[1:], device=DEVICE, backend=backend),
        ops.RunningStats(shape[1:], device=DEVICE, backend="torch"),
    )
    for n in (1, 3, shape[0]):
        rs.update(x.detach()[:n]), rr.update(x.detach()[:n])
    torch.testing.assert_close(rs.mean, rr.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rs.var, rr.var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bpd", _sizes([(1, 1, 1), (7, 13, 5), (320, 4099, 768), (33, 70, 64)]), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repulsive(backend, bpd, dtype):
    b, p, d = bpd
    h = _cuda((b, d), dtype).requires_grad_()
    hr = h.detach().clone().requires_grad_()
    pool = _cuda((p, d), dtype)
    loss = ops.repulsive_cosine_loss(h, pool, backend=backend)
    ref = ops.repulsive_cosine_loss(hr, pool, backend="torch")
    _check(loss, ref, dtype, b * p * d)
    loss.backward(), ref.backward()
    _check(h.grad, hr.grad, dtype, b * p * d)
    with torch.no_grad():  # the loss-only path (no gradient computed)
        _check(ops.repulsive_cosine_loss(h, pool, backend=backend), ref, dtype, b * p * d)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_pool_gram_path(backend):
    # Pushes that wrap the ring buffer, with more rows than the feature dimension (the Gram path);
    # a tenth of the rows and a 16-dim feature under the interpreter.
    capacity, dim, pushes = 3000, 256, (500, 1200, 64, 2000, 900)
    if DEVICE == "cpu":
        capacity, dim, pushes = 300, 16, tuple(k // 10 for k in pushes)
    pool = ops.RepulsivePool(capacity, dim, device=DEVICE, backend=backend)
    kept = []
    for k in pushes:
        f = torch.randn(k, dim, device=DEVICE)
        pool.push(f)
        kept = kept + [f]
    kept = torch.cat(kept)[-capacity:]
    assert len(pool) == capacity > dim
    h = torch.randn(64, dim, device=DEVICE, requires_grad=True)
    hr = h.detach().clone().requires_grad_()
    loss, ref = pool.loss(h), ops.repulsive_cosine_loss(hr, kept, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    loss.backward(), ref.backward()
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-4, atol=1e-8)

"""Every op on the GPU backends (triton, cuda) against the torch reference on CUDA tensors.

These run where a CUDA device exists (benchmarks/gpu_check.sh runs them with TRITON_INTERPRET=0);
on a CPU-only machine the module is skipped, and the same kernels are tested through the Triton
interpreter (tests/test_triton_ops.py) and as compiled objects (tests/test_triton_aot.py,
tests/test_ext_build.py).
"""

import os

import pytest
import torch

from invcoss import ops
from tests.refs import tol

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0",
)
GPU_BACKENDS = [b for b in ("triton", "cuda") if b in ops.available_backends()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cuda(shape, dtype, contiguous=True):
    if contiguous:
        return torch.randn(shape, device="cuda").to(dtype)
    return torch.randn(*shape[:-1], shape[-1] + 5, device="cuda").to(dtype)[..., : shape[-1]]


def _check(a, b, dtype, numel):
    t = tol(dtype, numel)
    if dtype != torch.float32:  # low precision: at most the error of plain torch in that dtype, x2
        t = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), **t)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (3, 2, 37, 129), (2, 1, 5, 31, 67), (48, 1, 16, 96, 96)], ids=str
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
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (48, 145, 768), (5, 3, 11)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_stats(backend, shape, dtype, contiguous):
    x = _cuda(shape, dtype, contiguous).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    mu, var = torch.randn(shape[1:], device="cuda"), torch.rand(shape[1:], device="cuda")
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
        ops.RunningStats(shape[1:], device="cuda", backend=backend),
        ops.RunningStats(shape[1:], device="cuda", backend="torch"),
    )
    for n in (1, 3, shape[0]):
        rs.update(x.detach()[:n]), rr.update(x.detach()[:n])
    torch.testing.assert_close(rs.mean, rr.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rs.var, rr.var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bpd", [(1, 1, 1), (7, 13, 5), (320, 4099, 768), (33, 70, 64)], ids=str)
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
    pool = ops.RepulsivePool(3000, 256, device="cuda", backend=backend)
    kept = []
    for k in (500, 1200, 64, 2000, 900):
        f = torch.randn(k, 256, device="cuda")
        pool.push(f)
        kept = kept + [f]
    kept = torch.cat(kept)[-3000:]
    h = torch.randn(64, 256, device="cuda", requires_grad=True)
    hr = h.detach().clone().requires_grad_()
    loss, ref = pool.loss(h), ops.repulsive_cosine_loss(hr, kept, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    loss.backward(), ref.backward()
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-4, atol=1e-8)

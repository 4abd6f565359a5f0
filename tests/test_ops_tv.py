"""total_variation (Eq. 8) on the torch reference backend against the float64 numpy formulation."""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import to_np, tv_ref
from tests.ops.tolerances import TOL

SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (3, 1, 1, 13),
    (1, 2, 17, 1),
    (2, 1, 3, 5, 7),
    (1, 1, 1, 11, 2),
    (2, 2, 4, 1, 3),
]


def _x(shape, dtype, contiguous=True):
    x = torch.randn(shape, dtype=torch.float64)
    if not contiguous:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous strides
        assert not x.is_contiguous() or min(shape[-2:]) == 1
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_numpy(shape, dtype, contiguous):
    x = _x(shape, dtype, contiguous).requires_grad_()
    weights = [1.0, 0.5, 2.0][: x.ndim - 2]
    sums, grad = tv_ref(to_np(x), weights)
    out = ops.total_variation(x, reduction="none", weights=weights, backend="torch")
    assert out.shape == (shape[0],)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(to_np(out), sums, **TOL[dtype])
    g = torch.randn(shape[0], dtype=out.dtype)
    out.backward(g)
    np.testing.assert_allclose(to_np(x.grad), grad * to_np(g).reshape(-1, *[1] * (x.ndim - 1)), **TOL[dtype])


def test_reductions():
    x = torch.randn(3, 2, 6, 5)
    none = ops.total_variation(x, reduction="none", backend="torch")
    torch.testing.assert_close(ops.total_variation(x, reduction="sum", backend="torch"), none.sum())
    torch.testing.assert_close(
        ops.total_variation(x, reduction="mean", backend="torch"), none.sum() / x.numel()
    )
    assert ops.total_variation(x).ndim == 0


def test_known_values_and_sign_zero_gradient():
    x = torch.tensor([[[[0.0, 1.0, 1.0], [3.0, 1.0, 1.0]]]], requires_grad=True)
    # horizontal: |1-0| + 0 + |1-3| + 0 = 3; vertical: 3 + 0 + 0 = 3
    loss = ops.total_variation(x, reduction="sum", backend="torch")
    assert loss.item() == 6.0
    loss.backward()
    # The two equal neighbours on the right contribute sign(0) = 0.
    expected = torch.tensor([[[[-2.0, 1.0, 0.0], [2.0, -1.0, 0.0]]]])
    torch.testing.assert_close(x.grad, expected)


def test_axis_of_length_one_contributes_zero():
    x = torch.randn(2, 1, 1, 1, 9)
    flat = torch.abs(torch.diff(x, dim=-1)).flatten(1).sum(1)
    torch.testing.assert_close(ops.total_variation(x, reduction="none", backend="torch"), flat)


def test_module_equals_functional():
    x = torch.randn(2, 3, 4, 5)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            ops.TotalVariation(reduction, [2.0, 1.0], backend="torch")(x),
            ops.total_variation(x, reduction, [2.0, 1.0], backend="torch"),
        )


def test_gradcheck_fp64():
    x = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.total_variation(t, "sum", [1.0, 2.0, 3.0], backend="torch"), (x,)
    )


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.zeros(4, 4), {}, r"x of shape \(B, C, H, W\) or \(B, C, D, H, W\), got \(4, 4\)"),
        (torch.zeros(1, 1, 2, 2), {"reduction": "max"}, "reduction"),
        (torch.zeros(1, 1, 2, 2), {"weights": [1.0]}, "weights"),
    ],
)
def test_bad_input(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.total_variation(x, **kwargs)


def test_bad_type():
    with pytest.raises(TypeError, match="x"):
        ops.total_variation([[1.0]])
    with pytest.raises(TypeError, match="floating"):
        ops.total_variation(torch.zeros(1, 1, 2, 2, dtype=torch.int64))

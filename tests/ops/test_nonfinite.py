"""A NaN in the input comes out as NaN on every backend: no loss hides a broken batch as 0."""

import pytest
import torch

from invcoss import ops
from tests.ops.backends import DEVICE, make

pytestmark = pytest.mark.device
NAN = float("nan")


def test_stat_matching_propagates_nan(backend):
    x = make((4, 5, 6))
    x[1, 2, 3] = NAN
    x.requires_grad_()
    zeros, ones = torch.zeros(5, 6, device=DEVICE), torch.ones(5, 6, device=DEVICE)
    loss = ops.stat_matching_loss(x, zeros, ones, backend=backend)
    loss.backward()
    assert loss.isnan()
    assert x.grad.isnan().any()


def test_stat_matching_exact_match_is_zero_with_zero_gradient(backend):
    # The special case that must stay: ||0|| = 0 with a zero (not NaN) gradient.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=DEVICE, requires_grad=True)
    mean, var = torch.tensor([2.0, 3.0], device=DEVICE), torch.tensor([1.0, 1.0], device=DEVICE)
    loss = ops.stat_matching_loss(x, mean, var, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(2, 1, 3, 4, 4), (2, 3, 5, 5)], ids=["3d", "2d"])
def test_total_variation_propagates_nan(backend, shape):
    x = make(shape)
    x.view(-1)[7] = NAN
    assert ops.total_variation(x, reduction="none", backend=backend)[0].isnan()


def test_repulsive_propagates_nan(backend):
    h, pool = make((3, 8)), make((5, 8))
    h[0, 0] = NAN
    assert ops.repulsive_cosine_loss(h, pool, backend=backend).isnan()

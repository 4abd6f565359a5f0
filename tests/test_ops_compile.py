"""torch.compile(fullgraph=True) graphs every op with its default backend, forward and backward."""

import torch

from invcoss import ops


def _losses(x, h, feats, mean, var, pool_feats):
    tv = ops.total_variation(x, reduction="mean")
    bm, bv = ops.batch_mean_var(feats)
    sm = ops.stat_matching_loss(feats, mean, var)
    rep = ops.repulsive_cosine_loss(h, pool_feats)
    return tv + sm + rep + bm.sum() + bv.sum()


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 6, 5, requires_grad=True)
    h = torch.randn(4, 8, requires_grad=True)
    feats = torch.randn(5, 3, 8, requires_grad=True)
    mean, var = torch.randn(3, 8), torch.rand(3, 8)
    pool_feats = torch.randn(7, 8)
    args = (x, h, feats, mean, var, pool_feats)
    eager = _losses(*args)
    eager_grads = torch.autograd.grad(eager, (x, h, feats))
    compiled = torch.compile(_losses, fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, (x, h, feats))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_pool_loss_gram_path():
    pool = ops.RepulsivePool(capacity=12, dim=4)
    pool.push(torch.randn(12, 4))
    h = torch.randn(3, 4, requires_grad=True)
    eager = pool.loss(h)
    compiled = torch.compile(pool.loss, fullgraph=True)(h)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

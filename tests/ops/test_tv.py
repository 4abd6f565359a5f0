"""total_variation (Eq. 8) on every backend against the float64 numpy reference (SPEC 2.1).

Known values, shapes (1, primes, several row, column and depth groups), reductions, every dtype
and memory layout forward and backward, module == functional, determinism, gradcheck in fp64; the
backward op (``tv_backward``) on its own, that the forward keeps nothing but x for it, the kernels'
argument checks and their ``torch.library`` registration (opcheck); the extension's results do not
depend on the thread count. torch.compile is in test_compile.py.
"""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import to_np, tv_ref
from tests.ops.backends import (
    DEVICE,
    EXT,
    FP64_BACKENDS,
    KERNEL_BACKENDS,
    LAYOUTS,
    assert_same_bits_with_1_and_2_threads,
    backend_dtypes,
    interpreted,
    make,
    opcheck,
    opcheck_cases,
    shape_layouts,
    sizes,
    steps,
)
from tests.ops.tolerances import assert_matches, plain_tv, plain_with_grad

# (shape, weights): odd shapes on every backend; the paper's sizes on CUDA only.
SHAPES = sizes(
    [
        ((2, 3, 37, 41), (1.0, 0.5)),  # primes; 37 rows: three row chunks, the last one short
        ((1, 1, 1, 67), (1.0, 1.0)),  # H = 1 contributes nothing
        ((3, 1, 5, 1), (1.0, 2.0)),  # W = 1: every value is both ends of its row
        ((1, 1, 2, 2), (1.0, 1.0)),  # W = 2: no interior
        ((1, 2, 3, 300), (0.5, 2.0)),  # two column groups
        ((1, 2, 17, 1), (1.0, 1.0)),
        # Widths around the CPU kernels' 16-value vector steps: 15 differences (no full step), 16
        # (one step, no tail), 17 (a tail of one), 32 (two steps).
        ((2, 1, 3, 16), (1.0, 0.5)),
        ((2, 1, 3, 17), (0.5, 1.0)),
        ((1, 2, 2, 3, 18), (1.0, 2.0, 0.5)),
        ((1, 1, 3, 4, 33), (0.25, 1.0, 1.0)),
        ((1, 2, 9, 5, 7), (2.0, 1.0, 0.25)),  # three depth groups, the depth sign carried across
        ((2, 1, 1, 6, 5), (1.0, 1.0, 1.0)),  # D = 1
        ((2, 2, 4, 1, 3), (1.0, 0.5, 2.0)),  # H = 1 inside a volume
        ((1, 1, 1, 1), (1.0, 1.0)),
        ((1, 1, 1, 1, 1), (1.0, 1.0, 1.0)),
    ],
    [
        ((3, 2, 37, 129), (1.0, 0.5)),
        ((2, 1, 5, 31, 67), (1.0, 0.5, 2.0)),
        ((48, 1, 16, 96, 96), (1.0, 0.5, 2.0)),  # 3D CT batches
    ],
)
DTYPE_SHAPES = shape_layouts([(2, 3, 11, 13), (2, 2, 3, 11, 13)], [(3, 2, 37, 129), (2, 1, 5, 31, 67)])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(x: torch.Tensor) -> list[float]:
    return [1.0, 0.5, 2.0][: x.ndim - 2]


@pytest.mark.device
@pytest.mark.parametrize("shape, weights", SHAPES, ids=str)
def test_tv_matches_reference(backend, shape, weights):
    x = steps(shape).requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend=backend)
    assert sums.shape == (shape[0],) and sums.dtype == torch.float32
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    assert_matches(sums, ref_sums, torch.float32, x.numel())
    upstream = torch.randn(shape[0], device=DEVICE)
    sums.backward(upstream)
    assert_matches(x.grad, ref_grad * to_np(upstream).reshape(-1, *[1] * (x.ndim - 1)), torch.float32)


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
@pytest.mark.parametrize("shape, layout", DTYPE_SHAPES)
def test_tv_dtypes_and_layouts(backend, dtype, shape, layout):
    x = make(shape, dtype, layout).requires_grad_()
    w = _weights(x)
    sums = ops.total_variation(x, "none", w, backend=backend)
    assert sums.dtype == _acc(dtype)
    upstream = torch.randn(shape[0], device=DEVICE, dtype=_acc(dtype))
    sums.backward(upstream)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    ref_sums, ref_grad = tv_ref(to_np(x), w)
    plain, plain_grad = plain_with_grad(plain_tv, x, w, upstream=upstream)
    assert_matches(sums, ref_sums, dtype, x.numel(), plain=plain)
    ref_grad = ref_grad * to_np(upstream).reshape(-1, *[1] * (x.ndim - 1))
    assert_matches(x.grad, ref_grad, dtype, plain=plain_grad, backend=backend)


@pytest.mark.device
def test_tv_reductions_and_module(backend):
    # 37800 values: the extension's parallel path (the interpreter gets a smaller image).
    x = make((3, 2, 7, 9) if interpreted(backend) else (3, 2, 70, 90))
    ref = tv_ref(to_np(x), [2.0, 1.0])[0]
    got = {r: ops.total_variation(x, r, [2.0, 1.0], backend=backend) for r in ("none", "sum", "mean")}
    assert got["none"].shape == (3,) and got["sum"].ndim == 0 and got["mean"].ndim == 0
    assert_matches(got["none"], ref, torch.float32, x.numel())
    assert_matches(got["sum"], ref.sum(), torch.float32, x.numel())
    assert_matches(got["mean"], ref.sum() / x.numel(), torch.float32, x.numel())
    default = ops.total_variation(x, backend=backend)  # reduction="mean", unit weights
    assert_matches(default, tv_ref(to_np(x))[0].sum() / x.numel(), torch.float32, x.numel())
    for r, value in got.items():
        assert torch.equal(ops.TotalVariation(r, [2.0, 1.0], backend=backend)(x), value)
    xg = x.clone().requires_grad_()  # the same sums when x requires grad
    assert torch.equal(ops.total_variation(xg, "none", [2.0, 1.0], backend=backend).detach(), got["none"])


@pytest.mark.device
def test_tv_known_values_and_sign_zero_gradient(backend):
    x = torch.tensor([[[[0.0, 1.0, 1.0], [3.0, 1.0, 1.0]]]], device=DEVICE, requires_grad=True)
    # horizontal: |1-0| + 0 + |1-3| + 0 = 3; vertical: 3 + 0 + 0 = 3
    loss = ops.total_variation(x, reduction="sum", backend=backend)
    assert loss.item() == 6.0
    loss.backward()
    # The two equal neighbours on the right contribute sign(0) = 0.
    expected = torch.tensor([[[[-2.0, 1.0, 0.0], [2.0, -1.0, 0.0]]]], device=DEVICE)
    assert torch.equal(x.grad, expected)


@pytest.mark.device
def test_tv_axes_of_length_one_contribute_zero(backend):
    x = make((2, 1, 1, 1, 9)).requires_grad_()
    sums = ops.total_variation(x, "none", (5.0, 7.0, 1.0), backend=backend)  # D = H = 1: weights unused
    assert_matches(sums, np.abs(np.diff(to_np(x), axis=-1)).reshape(2, -1).sum(1), torch.float32)
    sums.sum().backward()
    assert_matches(x.grad, tv_ref(to_np(x))[1], torch.float32)


@pytest.mark.device
def test_tv_deterministic(backend):
    shape = (48, 1, 16, 96, 96) if DEVICE == "cuda" else (2, 3, 29, 70)
    x = make(shape).requires_grad_()
    first = ops.total_variation(x, "sum", backend=backend)
    (g1,) = torch.autograd.grad(first, x)
    second = ops.total_variation(x, "sum", backend=backend)
    (g2,) = torch.autograd.grad(second, x)
    assert torch.equal(first, second) and torch.equal(g1, g2)  # bitwise: no atomics


@pytest.mark.parametrize("backend", FP64_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(2, 2, 5, 4), (2, 1, 3, 4, 5)], ids=str)
def test_tv_gradcheck_fp64(backend, shape):
    x = make(shape, torch.float64).requires_grad_()
    w = _weights(x)
    assert torch.autograd.gradcheck(lambda t: ops.total_variation(t, "sum", w, backend=backend), (x,))


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.zeros(4, 4), {}, ValueError, r"x of shape \(B, C, H, W\) or \(B, C, D, H, W\), got \(4, 4\)"),
        (torch.zeros(1, 1, 2, 2), {"reduction": "max"}, ValueError, "reduction"),
        (torch.zeros(1, 1, 2, 2), {"weights": [1.0]}, ValueError, "weights"),
        ([[1.0]], {}, TypeError, "x"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.int64), {}, TypeError, "floating"),
    ],
    ids=["rank", "reduction", "weights", "not-a-tensor", "integer"],
)
def test_tv_bad_input(backend, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.total_variation(x, backend=backend, **kwargs)


# ---- the kernels behind the public op ---------------------------------------------------------------


def _ops_of(backend: str):
    return torch.ops.invcoss_triton if backend == "triton" else torch.ops.invcoss


# Odd shapes, widths that take the vector paths of the kernels (multiples of 8 values) and widths
# that do not, 2-D and 3-D.
BACKWARD_SHAPES = [(3, 2, 7, 9), (2, 1, 3, 5, 16), (1, 3, 1, 1), (2, 2, 9, 24)]


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(KERNEL_BACKENDS), indirect=["backend"])
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tv_backward_op(backend, dtype, shape, layout):
    # The backward op alone: grad_sums[b] * d(sums[b])/dx with a different scale per sample (zero
    # and negative ones too), written contiguous in x's dtype whatever x's layout.
    x = make(shape, dtype, layout)
    w = _weights(x)
    grad_sums = torch.tensor([1.5, 0.0, -2.0][: shape[0]], device=DEVICE, dtype=_acc(dtype))
    got = _ops_of(backend).tv_backward(x, w, grad_sums)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    ref = tv_ref(to_np(x), w)[1] * to_np(grad_sums).reshape(-1, *[1] * (x.ndim - 1))
    _, plain_grad = plain_with_grad(plain_tv, x, w, upstream=grad_sums)
    assert_matches(got, ref, dtype, plain=plain_grad, backend=backend)


@pytest.mark.device
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_tv_saves_only_x_for_backward(backend):
    # Nothing of x's size but x itself is kept between forward and backward.
    x = make((2, 3, 8, 16)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sums = ops.total_variation(x, "none", backend=backend)
    assert len(saved) == 1 and saved[0] is x
    sums.sum().backward()
    assert_matches(x.grad, tv_ref(to_np(x))[1], torch.float32)


@pytest.mark.parametrize("backend", FP64_BACKENDS, indirect=True)
def test_tv_double_backward(backend):
    # Second order: zero in x (the gradient is piecewise constant) and linear in the upstream gradient.
    x = make((2, 1, 4, 5), torch.float64).requires_grad_()
    up = torch.tensor([0.5, -2.0], dtype=torch.float64, device=DEVICE).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda t: ops.total_variation(t, "none", backend=backend), (x,), (up,), check_undefined_grad=False
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_tv_double_backward_in_the_upstream_gradient(backend):
    x = make((2, 2, 5, 8)).requires_grad_()
    up = torch.tensor([0.5, -2.0], device=DEVICE, requires_grad=True)
    sums = ops.total_variation(x, "none", backend=backend)
    (g,) = torch.autograd.grad(sums, x, up, create_graph=True)
    gg = torch.randn_like(x)
    d_up, d_x = torch.autograd.grad(g, (up, x), gg, allow_unused=True)
    unit = tv_ref(to_np(x))[1]
    assert_matches(d_up, (to_np(gg) * unit).reshape(2, -1).sum(1), torch.float32)
    assert d_x is None or not d_x.any()


@pytest.mark.device
@pytest.mark.parametrize("backend", [EXT], indirect=True)
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.invcoss.tv(make((3, 4)), [1.0, 1.0]), r"tv: expected x of shape \(B, C, H, W\)"),
        (lambda: torch.ops.invcoss.tv(make((1, 1, 3, 4)), [1.0]), "one weight per spatial axis"),
        (
            lambda: torch.ops.invcoss.tv(
                torch.ones(1, 1, 3, 4, dtype=torch.int32, device=DEVICE), [1.0, 1.0]
            ),
            "floating",
        ),
        (
            lambda: torch.ops.invcoss.tv_backward(make((2, 1, 3, 4)), [1.0, 1.0], make((3,))),
            r"tv_backward: expected grad_sums of shape \(2,\), got \[3\]",
        ),
        (
            lambda: torch.ops.invcoss.tv_backward(make((2, 1, 3, 4)), [1.0], make((2,))),
            "tv_backward: expected one weight per spatial axis",
        ),
        (lambda: torch.ops.invcoss.scale_rows(make((3, 4)), make((4,))), r"expected scale of shape \(3,\)"),
    ],
    ids=["rank", "weights", "dtype", "backward-grad-sums", "backward-weights", "scale-rows"],
)
def test_tv_kernel_argument_checks(backend, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


OPCHECK_CASES = [
    ("triton", "tv", lambda: (make((2, 2, 5, 6)).requires_grad_(), [1.0, 0.5])),
    ("triton", "tv_backward", lambda: (make((2, 2, 5, 8)), [1.0, 0.5], make((2,)))),
    (EXT, "tv", lambda: (make((2, 2, 5, 6)).requires_grad_(), [1.0, 0.5])),
    (EXT, "tv", lambda: (make((1, 2, 3, 4, 5)), [1.0, 1.0, 1.0])),
    (EXT, "tv_backward", lambda: (make((2, 1, 3, 4, 8)), [1.0, 1.0, 1.0], make((2,)))),
    (EXT, "scale_rows", lambda: (make((3, 4, 5)), make((3,)))),
]


@opcheck_cases(OPCHECK_CASES)
def test_tv_opcheck(backend, name, args):
    opcheck(backend, name, args())


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_tv_identical_with_1_and_2_threads(backend):
    def run():
        g = torch.Generator().manual_seed(3)
        out = []
        for shape, w in (((3, 2, 200, 230), (1.0, 0.3)), ((2, 1, 9, 130, 150), (1.0, 1.0, 1.0))):
            x = torch.randn(shape, generator=g).requires_grad_()
            sums = ops.total_variation(x, "none", w, backend="cpu")
            sums.sum().backward()
            out += [sums, x.grad]
        return out

    assert_same_bits_with_1_and_2_threads(run)


def test_16_bit_inputs_tune_over_the_configs_of_16_byte_loads():
    # bf16/fp16 tiles of four values per thread load 8 bytes at a time: the autotuner never picks them.
    from invcoss.kernels import tv as tv_kernels

    configs = tv_kernels.TV_CONFIGS
    flags = {"ALIGNED": True, "WIDE_INDEX": False}
    half = tv_kernels.prune_for_variant(configs, {"x_ptr": torch.empty(1, dtype=torch.bfloat16)}, **flags)
    assert half and all(tv_kernels.values_per_thread(c) >= 8 for c in half)
    assert len(half) < len(configs)
    assert tv_kernels.prune_for_variant(configs, {"x_ptr": torch.empty(1)}, **flags) == configs
    interp = [tv_kernels.TV_INTERPRET_CONFIG]
    x16 = {"x_ptr": torch.empty(1, dtype=torch.float16)}
    assert tv_kernels.prune_for_variant(interp, x16, **flags) == interp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "flags", [{"ALIGNED": False, "WIDE_INDEX": False}, {"ALIGNED": True, "WIDE_INDEX": True}]
)
def test_scalar_loads_and_int64_offsets_tune_over_four_values_per_thread(dtype, flags):
    # Eight values per thread buy no wider load there and cost registers (a spill with Triton 3.6).
    from invcoss.kernels import tv as tv_kernels

    configs = tv_kernels.TV_CONFIGS
    narrow = tv_kernels.prune_for_variant(configs, {"x_ptr": torch.empty(1, dtype=dtype)}, **flags)
    assert narrow and all(tv_kernels.values_per_thread(c) < 8 for c in narrow)
    assert len(narrow) < len(configs)
    # The ahead-of-time table compiles the same subset for the variant.
    assert tv_kernels.tv_backward_kernel.variant_configs(configs, dtype.itemsize, flags) == narrow
    # Nothing to keep: the configs are left as they are rather than emptied.
    interp = [tv_kernels.TV_INTERPRET_CONFIG]
    assert tv_kernels.prune_for_variant(interp, {"x_ptr": torch.empty(1, dtype=dtype)}, **flags) == interp


@pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the extension's cpu backend is not built")
def test_cpu_backward_outputs_reuse_freed_blocks_half_a_page_from_x():
    # A loop frees step t's gradient before step t+1 asks for one: the block comes back with its pages
    # mapped. Live outputs never share a block, and every output starts half a 4 KB page from x.
    x = torch.randn(2, 1, 8, 256, 256)  # 4 MiB: large enough for the cache
    weights, scale = [1.0, 1.0, 1.0], torch.tensor([1.0, -2.0])
    first = torch.ops.invcoss.tv_backward(x, weights, scale)
    want = first.clone()
    ptr = first.data_ptr()
    assert (ptr - x.data_ptr()) % 4096 == 2048
    live = torch.ops.invcoss.tv_backward(x, weights, scale)
    assert live.data_ptr() != ptr
    del first
    again = torch.ops.invcoss.tv_backward(x, weights, scale * 0.5)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, want * 0.5)
    torch.testing.assert_close(live, want)

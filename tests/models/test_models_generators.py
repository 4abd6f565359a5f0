"""InvUNet (Appendix B.3, Table 4) and the bottom-to-top baseline (Table 3)."""

from __future__ import annotations

import pytest
import torch

from invcoss.models import (
    BOTTOM_UP_PRESETS,
    BottomUpGenerator,
    GeneratorConfig,
    InvUNet,
    create_bottom_up,
    load_pretrained_into,
)

PAPER_PARAMS = {"InvUNet": 7.7e6, "bottom_up": 10.6e6, "bottom_up_large": 25.9e6}  # Table 3, 2D
SMALL_SIZE = {2: (32, 32), 3: (16, 32, 32)}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _latent(dim: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name, build",
    [
        ("InvUNet", lambda: InvUNet(ndim=2)),
        ("bottom_up", lambda: create_bottom_up("bottom_up")),
        ("bottom_up_large", lambda: create_bottom_up("bottom_up_large")),
    ],
)
def test_parameter_counts_are_within_20_percent_of_the_paper(name, build):
    with torch.device("meta"):
        n = _params(build())
    paper = PAPER_PARAMS[name]
    print(f"{name} (2D, 224x224, latent 128): {n / 1e6:.2f}M parameters, paper {paper / 1e6:.1f}M")
    assert abs(n - paper) <= 0.2 * paper


@pytest.mark.parametrize(
    "ndim, size, bottleneck",
    [(2, (224, 224), (14, 14)), (3, (16, 192, 192), (1, 12, 12))],
)
def test_invunet_follows_table_4(ndim, size, bottleneck):
    with torch.device("meta"):
        g = InvUNet(ndim=ndim)
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for name, module in g.named_modules():
            if name == "noise_projector" or name.count(".") == 2 and ".levels." in name:
                module.register_forward_hook(lambda m, i, o, name=name: shapes.append((name, tuple(o.shape))))
        out = g(torch.empty(2, g.config.latent_dim))
    latent, channels = (128, 3) if ndim == 2 else (512, 1)
    assert g.config.latent_dim == latent
    assert out.shape == (2, channels, *size)
    levels = [(c, tuple(s * 2**i for s in bottleneck)) for i, c in enumerate((256, 128, 64, 32, 16))]
    expected = [("noise_projector", (2, 256, *bottleneck))]
    expected += [(f"memory_cache.levels.{i}", (2, c, *s)) for i, (c, s) in enumerate(levels[1:])]
    expected += [(f"inversion.levels.{i}", (2, c, *s)) for i, (c, s) in enumerate(levels[1:])]
    assert shapes == expected
    norm = torch.nn.BatchNorm2d if ndim == 2 else torch.nn.InstanceNorm3d
    up_mode = "bilinear" if ndim == 2 else "trilinear"
    assert isinstance(g.memory_cache.levels[0].conv[1], norm)
    assert g.inversion.levels[3].up.mode == up_mode
    # the Inversion Branch fuses the Memory Cache skip by concatenation
    assert g.inversion.levels[0].conv[0].in_channels == 256 + 128


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_reach_the_latent_and_every_branch_layer(ndim):
    torch.manual_seed(0)
    g = InvUNet(ndim=ndim, out_size=SMALL_SIZE[ndim])  # the paper's channels at a small size
    batch = 2 if ndim == 2 else 1  # BatchNorm needs two samples; InstanceNorm does not
    z = _latent(g.config.latent_dim, batch=batch).requires_grad_()
    target = torch.rand(
        batch, g.config.out_channels, *SMALL_SIZE[ndim], generator=torch.Generator().manual_seed(1)
    )
    (g(z) - target).pow(2).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for branch in (g.memory_cache, g.inversion, g.noise_projector):
        for name, p in branch.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(list(g.memory_cache.levels)) == len(list(g.inversion.levels)) == 4


@pytest.mark.parametrize("cls", [InvUNet, BottomUpGenerator])
@pytest.mark.parametrize("ndim, low, high", [(2, 0.0, 1.0), (3, -1.0, 1.0)])
def test_output_ranges(cls, ndim, low, high):
    torch.manual_seed(0)
    g = cls(ndim=ndim, out_size=SMALL_SIZE[ndim], channels=(32, 16, 16, 8, 8))
    with torch.no_grad():
        out = g(_latent(g.config.latent_dim, batch=3) * 50)  # large latents push towards saturation
    assert out.shape == (3, 3 if ndim == 2 else 1, *SMALL_SIZE[ndim])
    assert out.min() >= low and out.max() <= high
    assert out.min() < low + 0.5 and out.max() > high - 0.5  # the range is used, not a constant


@pytest.mark.parametrize("cls", [InvUNet, BottomUpGenerator])
def test_output_size_follows_the_request(cls):
    g = cls(ndim=2, latent_dim=8, out_size=(48, 80), channels=(8, 8, 4, 4, 4))
    assert g(_latent(8)).shape == (2, 3, 48, 80)
    g3 = cls(ndim=3, latent_dim=8, out_size=(8, 16, 24), channels=(8, 4, 4, 4))  # 3 levels: factor 8
    assert g3(_latent(8)).shape == (2, 1, 8, 16, 24)
    with pytest.raises(ValueError, match=r"out_size \(100, 100\) must be a positive multiple of 16"):
        cls(ndim=2, out_size=100)
    with pytest.raises(ValueError, match=r"out_size \(8, 192, 192\) must be a positive multiple of 16"):
        cls(ndim=3, out_size=(8, 192, 192))
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 8\), got \(2, 9\)"):
        g(_latent(9))
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        cls(ndim=1)


def test_bottom_up_presets_and_shapes():
    assert sorted(BOTTOM_UP_PRESETS) == ["bottom_up", "bottom_up_large"]
    with pytest.raises(ValueError, match="unknown bottom-up configuration 'tiny'"):
        create_bottom_up("tiny")
    with torch.device("meta"):
        assert create_bottom_up("bottom_up")(torch.empty(2, 128)).shape == (2, 3, 224, 224)
        g3 = create_bottom_up("bottom_up_large", ndim=3)
        assert g3(torch.empty(2, 512)).shape == (2, 1, 16, 192, 192)
    assert isinstance(g3.stages[0][2], torch.nn.InstanceNorm3d)
    # a single stream: no skip connections, one conv per level
    convs = [m for m in g3.stages.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.in_channels for c in convs] == list(BOTTOM_UP_PRESETS["bottom_up_large"][:-1])


@pytest.mark.parametrize("cls", [InvUNet, BottomUpGenerator])
@pytest.mark.parametrize("ndim", [2, 3])
def test_save_and_load_reproduce_outputs_bit_for_bit(tmp_path, cls, ndim):
    torch.manual_seed(0)
    g = cls(ndim=ndim, latent_dim=16, out_size=SMALL_SIZE[ndim], channels=(16, 8, 8, 4, 4))
    g(_latent(16, batch=4))  # train-mode pass: BatchNorm running statistics move
    g.eval().save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.config == g.config
    z = _latent(16, seed=3)
    with torch.no_grad():
        assert torch.equal(g(z), loaded(z))
    for (name, a), b in zip(g.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_the_wrong_generator_fails_with_the_differences(tmp_path):
    InvUNet(ndim=2, latent_dim=16, out_size=32, channels=(8, 8, 4, 4, 4)).save_pretrained(tmp_path)
    wanted = GeneratorConfig(ndim=2, latent_dim=32, out_size=32, channels=(8, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="latent_dim: checkpoint 16, expected 32"):
        InvUNet.from_pretrained(tmp_path, expect=wanted)
    other = InvUNet(ndim=2, latent_dim=16, out_size=64, channels=(8, 8, 4, 4, 4))
    with pytest.raises(ValueError, match=r"out_size: checkpoint \(32, 32\), model \(64, 64\)"):
        load_pretrained_into(other, tmp_path, strict=False)
    with pytest.raises(ValueError, match="holds a InvUNet, not a BottomUpGenerator"):
        BottomUpGenerator.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "shape, dims",
    [
        ((2, 3, 5, 7), (2, 3)),
        ((1, 2, 3, 1, 4), (2, 3, 4)),
        ((2, 1, 1, 1), (2, 3)),
        ((1, 2, 4, 11, 13), (3, 4)),
    ],
    ids=["2d", "3d", "one-pixel", "3d-in-plane"],
)
def test_upsample2x_linear_is_interpolate(shape, dims):
    # The compiled generators' upsampling (no scatter in its backward) against F.interpolate,
    # forward and backward, in float64 so that only the summation order may differ.
    from invcoss.models.blocks import upsample2x_linear

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    size = [2 * s if i + 2 in dims else s for i, s in enumerate(shape[2:])]
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = upsample2x_linear(a, dims)
    want = torch.nn.functional.interpolate(b, size=size, mode=mode, align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample2x_linear_keeps_the_dtype_and_rounds_once(dtype):
    from invcoss.models.blocks import upsample2x_linear

    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = upsample2x_linear(x, (2, 3))
    want = torch.nn.functional.interpolate(x.double(), scale_factor=2, mode="bilinear", align_corners=False)
    assert got.dtype == dtype
    # Computed in fp32 and rounded once to the dtype: within half an ulp of the exact value (+ fp32).
    ulp = torch.finfo(dtype).eps
    assert ((got.double() - want).abs() <= (0.5 * ulp + 1e-6) * want.abs() + 1e-6).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_upsampling_layer_switches_formulation_only_under_compile(ndim, monkeypatch):
    from invcoss.models.blocks import LinearUpsample2x

    layer = LinearUpsample2x(ndim)
    x = torch.randn(1, 2, *([3] * ndim), generator=torch.Generator().manual_seed(3))
    eager = layer(x)
    want = torch.nn.functional.interpolate(
        x, scale_factor=2, mode="bilinear" if ndim == 2 else "trilinear", align_corners=False
    )
    assert torch.equal(eager, want)  # eagerly the ATen kernel itself
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert dict(layer.state_dict()) == {}  # nothing to save: nn.Upsample checkpoints load as they were

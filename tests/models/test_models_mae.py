"""The dimension-free MAE: shapes per preset, patches, masking, Eq. 7 loss, learning, checkpoints."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from invcoss.models import MAE, InvUNet, MAEConfig, create_model, list_presets, load_pretrained_into
from invcoss.models.pos_embed import sincos_pos_embed

SMALL = {"img_size_2d": (32, 48), "img_size_3d": (16, 32, 48)}  # 6 tokens in 2D and in 3D
# Real forward passes for the presets that are cheap on CPU; the others run on the meta device.
CPU_PRESETS = {"vit_tiny", "vit_nano"}
EXPECTED = {  # preset: (width, blocks, 2D tokens, 3D tokens)
    "vit_base": (768, 12, 196, 144),
    "vit_small": (384, 12, 196, 144),
    "vit_tiny": (192, 12, 196, 144),
    "vit_nano": (96, 4, 49, 36),
}


def _input(config: MAEConfig, ndim: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.in_chans(ndim), *config.img_size(ndim), generator=g)


@pytest.fixture(scope="module")
def small() -> MAE:
    torch.manual_seed(0)
    return create_model("vit_nano", **SMALL).eval()


def test_presets_are_listed():
    assert list_presets() == sorted(EXPECTED)
    with pytest.raises(ValueError, match="unknown MAE preset 'vit_huge'"):
        create_model("vit_huge")
    with pytest.raises(TypeError, match="unknown MAE option"):
        create_model("vit_nano", widht=3)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_shapes_for_every_preset(preset: str, ndim: int):
    width, depth, tokens_2d, tokens_3d = EXPECTED[preset]
    L = tokens_2d if ndim == 2 else tokens_3d
    device = "cpu" if preset in CPU_PRESETS else "meta"
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model(preset)
        cfg = model.config
        x = (
            _input(cfg, ndim, 1)
            if device == "cpu"
            else torch.empty(1, cfg.in_chans(ndim), *cfg.img_size(ndim))
        )
        with torch.no_grad():
            loss, pred, mask = model(x)
            latent, _, ids_restore = model.forward_encoder(x, 0.75)
            features, embedding = model.unmasked_features(x)
    patch_dim = math.prod(cfg.patch_size(ndim)) * cfg.in_chans(ndim)
    assert loss.shape == ()
    assert pred.shape == (1, L, patch_dim)
    assert mask.shape == ids_restore.shape == (1, L)
    assert latent.shape == (1, 1 + int(L * 0.25), width)
    assert len(features) == depth
    assert all(f.shape == (1, 1 + L, width) for f in features)
    assert embedding.shape == (1, width)
    if device == "cpu":
        assert torch.isfinite(loss) and loss > 0
        assert int(mask.sum()) == L - int(L * 0.25)


@pytest.mark.parametrize("ndim", [2, 3])
def test_patchify_matches_hand_indexing_and_roundtrips(ndim: int):
    cfg = MAEConfig(
        embed_dim=48,
        depth=1,
        num_heads=2,
        decoder_embed_dim=24,
        decoder_depth=1,
        decoder_num_heads=2,
        img_size_2d=(32, 48),
        patch_size_2d=(16, 8),
        in_chans_2d=3,
        img_size_3d=(8, 32, 48),
        patch_size_3d=(4, 16, 8),
        in_chans_3d=2,
    )
    model = MAE(cfg)
    x = _input(cfg, ndim, 2, seed=ndim)
    patches = model.patchify(x)
    assert patches.shape == (2, cfg.num_patches(ndim), cfg.patch_dim(ndim))
    # Patch number l sits at grid position unravel(l) (last axis fastest); its vector is the patch's
    # pixels in raster order, channels last.
    grid, patch = cfg.grid(ndim), cfg.patch_size(ndim)
    for l in (0, 1, cfg.num_patches(ndim) - 1):
        pos = np.unravel_index(l, grid)
        window = tuple(slice(i * p, (i + 1) * p) for i, p in zip(pos, patch))
        block = x[(slice(None), slice(None), *window)]  # (B, C, *patch)
        expected = block.permute(0, *range(2, 2 + ndim), 1).reshape(2, -1)
        assert torch.equal(patches[:, l], expected)
    assert torch.equal(model.unpatchify(patches, ndim), x)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("ndim", [2, 3])
def test_masking_hides_exactly_the_requested_fraction(small: MAE, ndim: int, ratio: float):
    model = create_model("vit_nano") if ratio == 0.75 else small  # 49 / 36 tokens, and 6 tokens
    L = model.config.num_patches(ndim)
    x = _input(model.config, ndim, 3)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(x, ratio)
    keep = int(L * (1 - ratio))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [L - keep] * 3
    assert latent.shape[1] == 1 + keep
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(L).expand(3, L))


def test_noise_decides_the_mask(small: MAE):
    x = _input(small.config, 2, 2)
    noise = torch.rand(2, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = small.forward_encoder(x, 0.5, noise=noise)
        b = small.forward_encoder(x, 0.5, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the three patches with the largest noise are the masked ones
    largest = noise.topk(3, dim=1).indices
    expected = torch.zeros(2, 6).scatter_(1, largest, 1.0)
    assert torch.equal(a[1], expected)


def test_encoder_without_masking_equals_the_unmasked_features(small: MAE):
    x = _input(small.config, 3, 2)
    with torch.no_grad():
        latent, mask, _ = small.forward_encoder(x, 0.0, noise=torch.arange(6.0).expand(2, 6))
        last = small.block_features(x)[-1]
        embedding = small.embed(x)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, small.norm(last), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embedding, small.norm(last)[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("ndim", [2, 3])
def test_loss_is_computed_on_masked_patches_only(ndim: int, norm_pix_loss: bool):
    model = create_model("vit_nano", norm_pix_loss=norm_pix_loss, **SMALL)
    x = _input(model.config, ndim, 2)
    pred = torch.randn(2, 6, model.config.patch_dim(ndim), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]])
    base = model.forward_loss(x, pred, mask)

    def changed(sample: int, patch: int) -> torch.Tensor:
        patches = model.patchify(x).clone()
        patches[sample, patch] = torch.linspace(-3, 3, patches.shape[-1])
        return model.forward_loss(model.unpatchify(patches, ndim), pred, mask)

    assert torch.equal(changed(0, 1), base)  # unmasked patch of sample 0
    assert torch.equal(changed(1, 0), base)  # unmasked patch of sample 1
    assert not torch.allclose(changed(0, 2), base)  # masked patch
    # independent float64 value of Eq. 7 (mean over masked patches of the per-patch MSE)
    target = model.patchify(x).double().numpy()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
            target.var(-1, ddof=1, keepdims=True) + 1e-6
        )
    per_patch = ((pred.double().numpy() - target) ** 2).mean(-1)
    expected = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
    assert base.dtype == torch.float32
    assert base.item() == pytest.approx(expected, rel=1e-5)


def test_vit_nano_learns_on_a_fixed_batch():
    # Stripes whose period divides the patch: every patch of an image has the same normalised
    # content, so the masked patches are predictable from the visible ones, and predicting the
    # per-patch mean (the loss of a model that learned nothing about the image) scores about 1.
    torch.manual_seed(0)
    S, B = 64, 4
    model = create_model("vit_nano", img_size_2d=S)
    g = torch.Generator().manual_seed(0)
    pix = torch.arange(S, dtype=torch.float32)
    periods = torch.randint(1, 4, (B, 1, 1), generator=g).float()
    phase = torch.rand(B, 1, 1, generator=g) * 2 * math.pi
    vertical = torch.randint(0, 2, (B, 1, 1), generator=g).bool()
    coord = torch.where(vertical, pix[None, :, None].expand(B, S, S), pix[None, None, :].expand(B, S, S))
    x = (0.5 + 0.5 * torch.sin(2 * math.pi * periods * coord / 16 + phase))[:, None].expand(B, 3, S, S)
    eval_noise = torch.rand(B, (S // 16) ** 2, generator=g)
    with torch.no_grad():
        before = model(x, noise=eval_noise)[0].item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(20):
        loss = model(x)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(x, noise=eval_noise)[0].item()
    print(f"vit_nano MAE loss on a fixed batch: {before:.3f} -> {after:.3f} after 20 steps")
    assert after < 0.6 * before
    assert after < 0.7  # clearly below the ~1.0 of predicting the patch mean


def test_invalid_inputs_are_refused(small: MAE):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, D, H, W\), got \(3, 32, 48\)"):
        small(torch.rand(3, 32, 48))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 48\).*got \(1, 1, 32, 48\)"):
        small(torch.rand(1, 1, 32, 48))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 32, 48\).*got \(1, 1, 16, 32, 32\)"):
        small(torch.rand(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 6\), got \(2, 5\)"):
        small(torch.rand(2, 3, 32, 48), noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        small(torch.rand(2, 3, 32, 48), mask_ratio=1.0)
    with pytest.raises(ValueError, match="must be divisible by patch_size_2d"):
        MAEConfig(img_size_2d=(100, 100))
    with pytest.raises(ValueError, match="embed_dim/num_heads"):
        MAEConfig(embed_dim=100, num_heads=12)
    with pytest.raises(TypeError, match="MAE expects an MAEConfig"):
        MAE({"embed_dim": 96})


def test_sincos_table_matches_the_formula():
    # independent numpy version of the 2D table: first half encodes rows, second half columns
    dim, grid = 16, (3, 5)

    def axis(pos: np.ndarray, width: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(width // 2) / (width / 2))
        angles = pos[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(3.0), np.arange(5.0), indexing="ij")
    expected = np.concatenate([axis(rows.ravel(), 8), axis(cols.ravel(), 8)], axis=1)
    np.testing.assert_allclose(sincos_pos_embed(grid, dim).numpy(), expected, rtol=1e-6, atol=1e-7)
    table = sincos_pos_embed((2, 3, 4), 30)  # widths 10, 10, 10
    assert table.shape == (24, 30) and torch.unique(table, dim=0).shape[0] == 24


@pytest.mark.parametrize("ndim", [2, 3])
def test_save_and_load_reproduce_outputs_bit_for_bit(tmp_path, small: MAE, ndim: int):
    small.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MAE.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == small.config
    x = _input(small.config, ndim, 2)
    noise = torch.rand(2, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a, b in zip(small(x, noise=noise), loaded(x, noise=noise)):
            assert torch.equal(a, b)
        assert torch.equal(small.embed(x), loaded.embed(x))
    header = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert header["model_type"] == "MAE" and header["config"]["img_size_3d"] == [16, 32, 48]


def test_loading_the_wrong_preset_fails_with_the_differences(tmp_path, small: MAE):
    small.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not the expected MAE.*embed_dim: checkpoint 96, expected 192"):
        MAE.from_pretrained(tmp_path, expect="vit_tiny")
    assert MAE.from_pretrained(tmp_path, expect="vit_nano").config == small.config  # sizes may differ
    with torch.device("meta"):
        tiny = create_model("vit_tiny")
    with pytest.raises(
        ValueError, match=r"embed_dim: checkpoint 96, model 192.*depth: checkpoint 4, model 12"
    ):
        load_pretrained_into(tiny, tmp_path)
    with pytest.raises(ValueError, match="holds a MAE, not a InvUNet"):
        InvUNet.from_pretrained(tmp_path)


def test_strict_false_loads_at_another_input_size(tmp_path, small: MAE):
    small.save_pretrained(tmp_path)
    other = create_model("vit_nano")  # 112x112 and 16x96x96
    with pytest.raises(ValueError, match=r"img_size_2d: checkpoint \(32, 48\), model \(112, 112\)"):
        load_pretrained_into(other, tmp_path, strict=True)
    load_pretrained_into(other, tmp_path, strict=False)
    for (name, a), b in zip(small.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.config.img_size_2d == (112, 112)


def test_a_directory_mixing_two_saves_is_detected(tmp_path, small: MAE):
    small.save_pretrained(tmp_path / "a")
    create_model("vit_nano").save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="mixes two checkpoints"):
        MAE.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        MAE.from_pretrained(tmp_path / "a")


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, small: MAE, monkeypatch):
    small.save_pretrained(tmp_path)

    real_fsync = os.fsync

    def failing_fsync(fd):  # the bytes are written, the disk fills before they are synced
        os.write(fd, b"half a file")
        real_fsync(fd)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        create_model("vit_nano", **SMALL).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MAE.from_pretrained(tmp_path)
    assert torch.equal(loaded.cls_token, small.cls_token)

"""Public ViT/MAE weights into the project's MAE: table order, key mapping, 3D inflation, Hub cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from invcoss.feature_stats import config_hash
from invcoss.models import MAE, MAEConfig, create_model
from invcoss.models.pos_embed import sincos_pos_embed
from invcoss.models.public_weights import inflate_patch_kernel

timm = pytest.importorskip("timm")


def mae_2d_table(side: int, dim: int) -> np.ndarray:
    """facebookresearch/mae's get_2d_sincos_pos_embed, from its formula: for the token in row ``i``,
    column ``j`` the first half of the features is the 1-D table of ``j`` (np.meshgrid(grid_w,
    grid_h) puts the column coordinate first), the second half that of ``i``."""

    def one_axis(pos: np.ndarray, width: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    i, j = np.divmod(np.arange(side * side, dtype=np.float64), side)  # raster order, columns fastest
    return np.concatenate([one_axis(j, dim // 2), one_axis(i, dim // 2)], axis=1)


def test_mae_order_matches_facebookresearch_and_invcoss_order_is_unchanged():
    side, dim = 14, 768
    mae = mae_2d_table(side, dim)
    np.testing.assert_allclose(sincos_pos_embed((side, side), dim, "mae").numpy(), mae, atol=1e-6)
    ours = sincos_pos_embed((side, side), dim).numpy()
    assert np.abs(ours - mae).max() > 1.5  # the two orders differ (halves swapped)
    np.testing.assert_array_equal(
        ours[:, : dim // 2], sincos_pos_embed((side, side), dim, "mae")[:, dim // 2 :]
    )


def test_order_is_not_in_the_config_hash_but_is_saved(tmp_path):
    a = preset = MAEConfig(
        embed_dim=48,
        depth=1,
        num_heads=4,
        decoder_embed_dim=24,
        decoder_depth=1,
        decoder_num_heads=2,
        img_size_2d=32,
        img_size_3d=(16, 32, 32),
    )
    b = MAEConfig(**{**preset.__dict__, "pos_embed_order": "mae"})
    assert config_hash(a) == config_hash(b)
    model = MAE(b)
    model.save_pretrained(tmp_path / "ckpt")
    assert MAE.from_pretrained(tmp_path / "ckpt").config.pos_embed_order == "mae"
    with pytest.raises(ValueError, match="pos_embed_order"):
        MAEConfig(pos_embed_order="hw")


def _timm_vit(cls_row: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=48,
        embed_dim=48,
        depth=2,
        num_heads=4,
        num_classes=0,
    ).eval()
    with torch.no_grad():
        vit.pos_embed[0, 1:] = torch.from_numpy(mae_2d_table(3, 48)).float()
        vit.pos_embed[0, 0] = cls_row
    return vit


def _timm_blocks(vit, x: torch.Tensor) -> list[torch.Tensor]:
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for blk in vit.blocks:
        h = blk(h)
        outs.append(h)
    return outs


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_give_the_same_block_outputs_bit_for_bit(tmp_path, suffix, caplog):
    vit = _timm_vit(cls_row=0.25)  # a non-zero class row is folded into the class token
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    with caplog.at_level("WARNING", logger="invcoss.models.mae"):
        model = MAE.from_timm(path, num_heads=4).eval()  # a file does not record the heads
    printed = caplog.text
    assert "freshly initialised" in printed and "decoder_blocks" in printed and "licence" in printed
    assert model.config.pos_embed_order == "mae" and model.config.num_heads == 4
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = _timm_blocks(vit, x), model.block_features(x)
        assert all(torch.equal(a, b) for a, b in zip(ref, ours, strict=True))
        assert torch.equal(vit.norm(ref[-1])[:, 1:].mean(1), model.embed(x))
    fresh = {k.split(".")[0] for k in model.conversion.fresh}
    assert fresh == {"decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "mask_token"}


def test_mae_checkpoint_with_decoder_round_trips_and_3d_is_inflated():
    cfg = MAEConfig(
        embed_dim=48,
        depth=1,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=1,
        img_size_2d=32,
        img_size_3d=(16, 32, 32),
        pos_embed_order="mae",
    )
    torch.manual_seed(0)
    src = MAE(cfg).eval()
    # the facebookresearch/mae layout: stored tables with a zero class row, one decoder
    state = {k.replace(".2d", ""): v for k, v in src.state_dict().items() if ".3d" not in k}
    zero = torch.zeros(1, 1, 48)
    state["pos_embed"] = torch.cat([zero, sincos_pos_embed((2, 2), 48, "mae")[None]], 1)
    state["decoder_pos_embed"] = torch.cat([zero[..., :32], sincos_pos_embed((2, 2), 32, "mae")[None]], 1)
    model = MAE.from_timm({"model": state}, num_heads=4, verbose=False).eval()
    assert model.config.decoder_embed_dim == 32 and model.config.decoder_num_heads == 1
    assert sorted({k.split(".")[0] for k in model.conversion.fresh}) == ["decoder_embed", "decoder_pred"]
    x = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.equal(src(x, noise=noise)[1], model(x, noise=noise)[1])
        # a grey volume constant along depth: the same tokens as its slice repeated in 3 channels
        grey = torch.rand(1, 1, 32, 32)
        t2 = model.patch_embed["2d"](grey.expand(1, 3, 32, 32))
        t3 = model.patch_embed["3d"](grey[:, :, None].expand(1, 1, 16, 32, 32))
    torch.testing.assert_close(t3, t2, rtol=1e-5, atol=1e-5)


def test_inflation_formula():
    w = torch.randn(5, 3, 4, 4)
    w3 = inflate_patch_kernel(w, 2, 1)
    assert w3.shape == (5, 1, 2, 4, 4)
    torch.testing.assert_close(w3[:, 0, 1], w.sum(1) / 2)
    with pytest.raises(ValueError, match="in_chans_3d"):
        inflate_patch_kernel(w, 2, 2)


def test_learned_table_and_missing_file_are_refused(tmp_path):
    vit = _timm_vit()
    with torch.no_grad():
        vit.pos_embed.normal_(std=0.02)
    with pytest.raises(ValueError, match="learned position table"):
        MAE.from_timm(vit, verbose=False)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        MAE.from_timm(tmp_path / "missing.pth")


# -- Hugging Face Hub cache (no network: files placed in huggingface_hub's cache layout) ----------
hub = pytest.importorskip("huggingface_hub")


def _cache(root, repo_id: str, files: dict) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_timm_name_is_read_from_the_hub_cache_with_its_licence(tmp_path, caplog):
    torch.manual_seed(0)
    # timm's vit_base_patch16_224 has 12 heads; a narrow stand-in keeps the test small
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=96, depth=1, num_classes=0
    )
    with torch.no_grad():
        vit.pos_embed[0, 1:] = torch.from_numpy(mae_2d_table(2, 96)).float()
        vit.pos_embed[0, 0] = 0
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "w.safetensors"))
    _cache(
        tmp_path / "hub", "timm/vit_base_patch16_224.mae", {"model.safetensors": tmp_path / "w.safetensors"}
    )
    with caplog.at_level("WARNING", logger="invcoss.models.mae"):
        model = MAE.from_timm("vit_base_patch16_224.mae", cache_dir=tmp_path / "hub")
    assert model.config.num_heads == 12 and model.conversion.licence == "cc-by-nc-4.0"
    assert model.config.name == "vit_base_patch16_224.mae"
    assert "cc-by-nc-4.0" in caplog.text
    with pytest.raises(FileNotFoundError, match="not in"):
        MAE.from_timm("vit_small_patch16_224.augreg_in21k", cache_dir=tmp_path / "hub")


def test_from_pretrained_reads_a_hub_repository_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32), depth=1)
    saved = model.save_pretrained(tmp_path / "ckpt")
    _cache(tmp_path / "hub", "someone/tiny-mae", {n: saved / n for n in ("config.json", "model.safetensors")})
    loaded = MAE.from_pretrained("someone/tiny-mae", cache_dir=tmp_path / "hub")
    assert torch.equal(loaded.cls_token, model.cls_token)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="someone/other"):
        MAE.from_pretrained("someone/other", cache_dir=tmp_path / "hub", allow_download=True)
    # the default cache is where HF_HUB_CACHE points
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert torch.equal(MAE.from_pretrained("someone/tiny-mae").cls_token, model.cls_token)


def test_a_pickled_object_is_refused_and_a_missing_hub_library_is_named(tmp_path, monkeypatch):
    torch.save({"model": {}, "args": TrainingArgs()}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="other than tensors"):
        MAE.from_timm(tmp_path / "ckpt.pth")
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="needs huggingface_hub"):
        MAE.from_pretrained("someone/tiny-mae")


class TrainingArgs:  # stands for the argparse.Namespace a training script pickles with its weights
    pass

"""Pre-training: the schedule, resuming, and phantoms → preprocess → pretrain → stats end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from invcoss.cli import main
from invcoss.data import CachedDataset
from invcoss.feature_stats import load_feature_stats
from invcoss.models import MAE, create_model
from invcoss.pretrain import PretrainConfig, learning_rate, pretrain

SMALL = {"img_size_2d": 32}


def test_schedule_warmup_then_cosine():
    cfg = PretrainConfig(epochs=30, lr=1e-3, min_lr=1e-5, warmup_epochs=4)
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(1, cfg) == pytest.approx(2.5e-4)
    assert learning_rate(4, cfg) == pytest.approx(1e-3)
    assert learning_rate(17, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert learning_rate(30, cfg) == pytest.approx(1e-5)
    t = 10.0
    expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (t - 4) / 26))
    assert learning_rate(t, cfg) == pytest.approx(expected)
    # The paper: 40 warm-up epochs of 300, the same fraction by default.
    assert PretrainConfig(epochs=300).warmup == 40
    assert PretrainConfig(epochs=15).warmup == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        PretrainConfig(mask_ratio=1.0)


def tiny_run(out, epochs: int, resume: bool = False):
    torch.manual_seed(0)
    model = create_model("vit_nano", **SMALL)
    data = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    cfg = PretrainConfig(epochs=epochs, batch_size=4, lr=1e-3, warmup_epochs=1)
    return pretrain(model, data, out, cfg, modality="xray", resume=resume, device="cpu")


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    straight = tiny_run(tmp_path / "a", 2)
    tiny_run(tmp_path / "b", 1)
    resumed = tiny_run(tmp_path / "b", 2, resume=True)
    assert resumed.epochs_run == 1 and resumed.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    summary = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert summary["epochs_done"] == 2 and summary["modality"] == "xray" and len(summary["losses"]) == 2
    # Done already: resuming again does nothing.
    assert tiny_run(tmp_path / "b", 2, resume=True).epochs_run == 0


def test_existing_run_needs_resume_and_the_same_model(tmp_path):
    tiny_run(tmp_path, 1)
    made_with = json.loads((tmp_path / "pretrain.json").read_text())["compute"]["threads"]
    assert made_with == torch.get_num_threads()
    with pytest.raises(ValueError, match=f"it was made with {made_with}, .*--threads {made_with}"):
        pretrain(
            create_model("vit_nano", **SMALL), torch.rand(4, 3, 32, 32), tmp_path,
            PretrainConfig(epochs=2), modality="xray", resume=True, threads=made_with + 1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="already holds a training run"):
        tiny_run(tmp_path, 2)
    other = create_model("vit_nano", img_size_2d=48)
    with pytest.raises(ValueError, match="its model differ"):
        pretrain(
            other, torch.rand(4, 3, 48, 48), tmp_path, PretrainConfig(epochs=2), modality="xray", resume=True
        )


def fixed_mask_loss(model: MAE, x: torch.Tensor) -> float:
    noise = torch.rand(
        x.shape[0], model.config.num_patches(x.ndim - 2), generator=torch.Generator().manual_seed(1)
    )
    model.eval()
    with torch.no_grad():
        return model(x, 0.75, noise)[0].item()


@pytest.mark.slow
def test_phantoms_preprocess_pretrain_stats(tmp_path):
    runner = CliRunner()
    scans, cache, ckpt, stats = (
        tmp_path / "scans",
        tmp_path / "cache",
        tmp_path / "ckpt",
        tmp_path / "s.safetensors",
    )

    r = runner.invoke(
        main, ["phantoms", "--modality", "ct", "--count", "2", "--out", str(scans), "--size", "30x48x48"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 2 ct phantoms" in r.stdout

    args = ["preprocess", "--modality", "ct", "--data", str(scans), "--out", str(cache), "--profile", "quick"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "preprocessed 2 files (0 already done, 0 skipped) -> 10 samples" in r.stdout
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "preprocessed 0 files (2 already done, 0 skipped) -> 10 samples" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps  # no work, nothing rewritten

    train = ["pretrain", "--data", str(cache), "--preset", "vit_nano", "--out", str(ckpt)]
    train += ["--batch-size", "5", "--lr", "2e-3", "--warmup-epochs", "1", "--device", "cpu"]
    r = runner.invoke(main, [*train, "--epochs", "3"])
    assert r.exit_code == 0, r.output
    assert "trained vit_nano on 10 ct samples for 3 epochs" in r.stdout
    r = runner.invoke(main, [*train, "--epochs", "5", "--resume"])
    assert r.exit_code == 0, r.output
    assert "for 2 epochs" in r.stdout

    losses = json.loads((ckpt / "pretrain.json").read_text())["losses"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    data = torch.stack([CachedDataset(cache)[i] for i in range(10)])
    torch.manual_seed(0)  # the CLI's initial weights for --seed 0
    initial = create_model("vit_nano")
    trained = MAE.from_pretrained(ckpt, expect="vit_nano")
    # Most of a patch-normalised CT target is noise, so the reachable fall is a few percent.
    assert fixed_mask_loss(trained, data) < 0.97 * fixed_mask_loss(initial, data)

    r = runner.invoke(main, ["stats", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(stats)])
    assert r.exit_code == 0, r.output
    assert "statistics of 4 blocks over 10 ct samples" in r.stdout and "smaller" in r.stdout
    loaded = load_feature_stats(stats, trained, modality="ct")
    assert loaded.count == 10 and loaded.input_size == (16, 96, 96)
    assert all(m.shape == (37, 96) for m in loaded.mean)  # class token + 1x6x6 patches, width 96
    # The statistics are a stage's only replay artifact: kept unless --overwrite, and the same run
    # writes the same bytes.
    first = stats.read_bytes()
    r = runner.invoke(main, ["stats", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(stats)])
    assert r.exit_code == 2 and "pass --overwrite" in r.output
    assert stats.read_bytes() == first
    r = runner.invoke(
        main, ["stats", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(stats), "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    assert stats.read_bytes() == first

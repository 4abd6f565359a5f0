"""invcoss-cli invert: end to end with the packaged models, user errors exit 2 and write nothing, resume after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from invcoss.assets import available, default_model_dir
from invcoss.cli import main
from invcoss.data import read_nifti
from invcoss.feature_stats import collect_feature_stats, load_feature_stats
from invcoss.models import MAE, create_model
from invcoss.models.weights import weights_hash

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--warmup-steps", "3"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small CT model (input 16x32x32) with its statistics beside it, as pretrain + stats write them."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
    model.save_pretrained(folder)
    data = torch.rand(6, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    collect_feature_stats(model, data, modality="ct", out=folder / "stats.safetensors")
    return folder


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_every_modality_has_a_small_packaged_model():
    assert available() == ["ct", "mri", "pathology", "xray"]
    sizes = {p: p.stat().st_size for m in available() for p in default_model_dir(m).iterdir()}
    assert max(sizes.values()) < 2_000_000 and sum(sizes.values()) < 8_500_000


@pytest.mark.slow
def test_ct_end_to_end_with_the_packaged_model(runner, tmp_path):
    out = tmp_path / "ct"
    r = runner.invoke(
        main,
        [
            "invert",
            "--modality",
            "ct",
            "--out",
            str(out),
            "--num-samples",
            "3",
            "--batch-size",
            "2",
            "--set",
            "min_batch_size=1",
            *FAST,
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.output
    assert f"wrote 3 synthetic ct volumes to {out} (2 batches" in r.stdout
    assert "stat-matching loss: synthetic" in r.stdout and "mean pairwise cosine" in r.stdout
    for i in range(3):
        img = nib.load(out / "samples" / f"ct_{i:05d}.nii.gz")
        assert img.get_data_dtype() == np.float32 and img.shape == (96, 96, 16)
        assert read_nifti(out / "samples" / f"ct_{i:05d}.nii.gz").spacing == pytest.approx(
            (1.5, 256 / 96, 256 / 96), abs=1e-4
        )
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["sources"]["model"].startswith("packaged ct model")
    assert m["identity"]["model"]["preset"] == "vit_nano_w64" and (out / "preview.png").is_file()
    assert m["spacing_from"] == "statistics"  # the packaged statistics record their data's spacing
    q = m["quality"]["stat_loss"]
    assert q["synthetic"] < q["noise"]


@pytest.mark.slow
def test_xray_end_to_end_with_a_reference(runner, tmp_path):
    ref = tmp_path / "scans"
    assert (
        runner.invoke(main, ["phantoms", "--modality", "xray", "--count", "4", "--out", str(ref)]).exit_code
        == 0
    )
    out = tmp_path / "xray"
    args = ["invert", "--modality", "xray", "--out", str(out), "--num-samples", "4", "--batch-size", "2"]
    r = runner.invoke(main, [*args, *FAST, "--reference", str(ref), "--compare-rep"])
    assert r.exit_code == 0, r.output
    assert "Frechet distance to the reference" in r.stdout and "with L_rep" in r.stdout
    a = np.load(out / "samples" / "xray_00003.npy")
    assert a.shape == (3, 112, 112) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert (out / "png" / "xray_00003.png").is_file()
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert q["reference"]["samples"] == 4 and q["mean_pairwise_cosine"]["reference"] is not None
    assert (
        q["frechet_distance"]["synthetic_reference"] >= 0 and q["rep_comparison"]["without_rep"] is not None
    )
    # A few steps from noise copy no phantom: no synthetic sample is flagged as memorised.
    assert "memorisation:" in r.stdout and q["memorisation"]["synthetic"] == 4
    assert q["memorisation"]["pixels"]["score"] == 0.0 and q["memorisation"]["flagged_both"] == []


def test_unknown_modality_exits_2_and_writes_nothing(runner, tmp_path):
    r = runner.invoke(main, ["invert", "--modality", "pet", "--out", str(tmp_path / "o")])
    assert_user_error(r, "'pet' is not one of")
    assert not (tmp_path / "o").exists()


def test_a_format_the_modality_cannot_take_exits_2_and_writes_nothing(runner, tmp_path):
    r = runner.invoke(main, ["invert", "--modality", "ct", "--format", "png", "--out", str(tmp_path / "o")])
    assert_user_error(r, "--format: sample format must be one of nifti, npy, dicom for 3D samples, got 'png'")
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_exits_2_and_writes_nothing(runner, tmp_path):
    r = runner.invoke(
        main,
        ["invert", "--modality", "ct", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
    )
    assert_user_error(r, "checkpoint", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(
        main, ["invert", "--modality", "ct", "--checkpoint", str(empty), "--out", str(tmp_path / "o")]
    )
    assert_user_error(r, "cannot load checkpoint", "config.json")
    assert not (tmp_path / "o").exists()


def test_statistics_of_another_model_or_modality_exit_2_and_write_nothing(runner, tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    other = str(tiny_checkpoint / "stats.safetensors")  # vit_nano at 16x32x32, not the packaged model
    r = runner.invoke(main, ["invert", "--modality", "ct", "--stats", other, "--out", str(out)])
    assert_user_error(r, "were collected with vit_nano", "but the model is vit_nano_w64")
    xray = str(default_model_dir("xray") / "stats.safetensors")
    r = runner.invoke(main, ["invert", "--modality", "ct", "--stats", xray, "--out", str(out)])
    assert_user_error(r, "are for xray, not ct")
    r = runner.invoke(
        main, ["invert", "--modality", "ct", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    )
    assert_user_error(r, "bottleneck is a single voxel")  # the quick profile's upsample=2 on a 32x32 input
    assert not out.exists()


def test_statistics_of_other_weights_exit_2_unless_allowed(runner, tmp_path, tiny_checkpoint):
    """The same architecture with other weights (e.g. a fine-tuned model) is another model."""
    torch.manual_seed(7)
    other = tmp_path / "other"
    create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32)).save_pretrained(other)
    mine = load_feature_stats(tiny_checkpoint / "stats.safetensors").weights_hash
    theirs = weights_hash(MAE.from_pretrained(other))
    base = ["invert", "--modality", "ct", "--checkpoint", str(other), "--set", "upsample=1"]
    base += ["--stats", str(tiny_checkpoint / "stats.safetensors"), "--num-samples", "1", "--batch-size", "1"]
    r = runner.invoke(main, [*base, *FAST, "--out", str(tmp_path / "o")])
    assert_user_error(r, f"collected with weights {mine[:16]}, but the model's weights are {theirs[:16]}")
    assert "--allow-other-weights" in r.output and not (tmp_path / "o").exists()
    r = runner.invoke(main, [*base, *FAST, "--allow-other-weights", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert f"Warning: feature statistics {tiny_checkpoint / 'stats.safetensors'} were collected" in r.output
    sources = json.loads((tmp_path / "o" / "manifest.json").read_text())["sources"]
    assert (sources["model_weights_hash"], sources["stats_weights_hash"]) == (theirs, mine)


def test_checkpoint_and_config_errors_exit_2(runner, tmp_path, tiny_checkpoint):
    base = ["invert", "--modality", "ct", "--set", "upsample=1", "--out", str(tmp_path / "o")]
    r = runner.invoke(main, [*base, "--checkpoint", str(tiny_checkpoint), "--set", "steps=abc"])
    assert_user_error(r, "--set steps expects int, got 'abc' (str)")
    r = runner.invoke(main, [*base, "--checkpoint", str(tiny_checkpoint), "--set", "alpha_rep=x"])
    assert_user_error(r, "--set alpha_rep expects float, got 'x' (str)")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "stats.safetensors"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    r = runner.invoke(main, [*base, "--checkpoint", str(broken)])
    assert_user_error(r, f"cannot load checkpoint {broken}", "model.safetensors is truncated")
    (broken / "model.safetensors").write_bytes(weights)
    header = json.loads((broken / "config.json").read_text())
    header["config"]["depth"] = "4"
    (broken / "config.json").write_text(json.dumps(header))
    r = runner.invoke(main, [*base, "--checkpoint", str(broken)])
    assert_user_error(r, "MAEConfig.depth expects int, got '4' (str)")
    header["config"]["depth"], header["config"]["embed_dim"] = 4, 96 * 4096
    (broken / "config.json").write_text(json.dumps(header))
    r = runner.invoke(main, [*base, "--checkpoint", str(broken)])
    assert_user_error(r, "saved with a different config")
    assert not (tmp_path / "o").exists()


def test_other_user_errors_exit_2(runner, tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["invert", "--modality", "ct", "--checkpoint", str(tiny_checkpoint), "--set", "upsample=1"]
    assert_user_error(runner.invoke(main, [*base, "--out", str(out)]), "is not empty")
    # --resume continues only a run of ours: a folder without a manifest is not taken over.
    assert_user_error(
        runner.invoke(main, [*base, "--out", str(out), "--resume"]),
        f"{out} holds no inversion run to resume (no manifest.json)",
        "--out",
    )
    assert_user_error(
        runner.invoke(main, [*base, "--set", "steps=0", "--out", str(tmp_path / "a")]), "steps must be >= 1"
    )
    assert_user_error(runner.invoke(main, [*base, "--set", "stepz=2", "--out", str(tmp_path / "a")]), "stepz")
    assert_user_error(
        runner.invoke(main, [*base, "--set", "compile_mode=fast", "--out", str(tmp_path / "a")]),
        "compile_mode must be one of",
    )
    assert_user_error(
        runner.invoke(main, [*base, "--backend", "nope", "--out", str(tmp_path / "a")]), "backend 'nope'"
    )
    if not torch.cuda.is_available():
        assert_user_error(
            runner.invoke(main, [*base, "--device", "cuda", "--out", str(tmp_path / "a")]), "no CUDA"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and os.listdir(out) == ["keep.txt"]


def test_resume_continues_at_the_recorded_thread_count(runner, tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    args = [
        "invert", "--modality", "ct", "--checkpoint", str(tiny_checkpoint), "--num-samples", "2",
        "--batch-size", "2", *FAST, "--set", "upsample=1", "--out", str(out),
    ]  # fmt: skip
    r = runner.invoke(main, [*args, "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert re.search(r"\(1 batches, \d+ s, \d+ samples/h\)", r.stdout), r.stdout  # no compiling on CPU
    assert json.loads((out / "manifest.json").read_text())["compute"]["threads"] == 1
    try:
        assert_user_error(
            runner.invoke(main, [*args, "--resume", "--threads", "2"]),
            "made with 1 CPU threads and this process has 2", "--threads 1",
        )  # fmt: skip
        torch.set_num_threads(2)
        r = runner.invoke(main, [*args, "--resume"])  # no --threads: the run's count
        assert r.exit_code == 0, r.output
        assert "0 of 1 batches run" in r.stdout and "samples/h" not in r.stdout
    finally:
        torch.set_num_threads(1)


def test_statistics_without_their_data_summary_warn_and_keep_the_phantoms_spacing(
    runner, tmp_path, tiny_checkpoint
):
    import dataclasses

    from invcoss.feature_stats import save_feature_stats

    model = MAE.from_pretrained(tiny_checkpoint)
    old = dataclasses.replace(load_feature_stats(tiny_checkpoint / "stats.safetensors", model), data=None)
    save_feature_stats(old, tmp_path / "old.safetensors")
    out = tmp_path / "run"
    r = runner.invoke(
        main,
        [
            "invert",
            "--modality",
            "ct",
            "--checkpoint",
            str(tiny_checkpoint),
            "--stats",
            str(tmp_path / "old.safetensors"),
            "--num-samples",
            "2",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup-steps",
            "1",
            "--set",
            "upsample=1",
            "--out",
            str(out),
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.output
    assert "Warning: the ct feature statistics record no spacing or value range" in r.stderr
    assert json.loads((out / "manifest.json").read_text())["spacing_from"] == "phantoms"


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "samples").iterdir())}


@pytest.mark.slow
def test_resume_after_the_process_is_killed_between_batches(runner, tmp_path, tiny_checkpoint):
    args = [
        "invert", "--modality", "ct", "--checkpoint", str(tiny_checkpoint), "--num-samples", "5",
        "--batch-size", "1", "--steps", "6", "--warmup-steps", "6", "--set", "upsample=1", "--threads", "1",
        "--set", "min_batch_size=1",
    ]  # fmt: skip
    whole = tmp_path / "whole"
    assert runner.invoke(main, [*args, "--out", str(whole)]).exit_code == 0
    cut = tmp_path / "cut"
    code = "import sys; from invcoss.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(cut)], stderr=subprocess.DEVNULL)
    manifest = cut / "manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text())["batches"]:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.loads(manifest.read_text())
    assert 1 <= len(m["batches"]) < 5 and not m["complete"]  # killed with batches left to do
    for name in (n for b in m["batches"] for n in b["samples"]):
        read_nifti(cut / name)  # every finished file is whole
    r = runner.invoke(main, [*args, "--out", str(cut), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"{5 - len(m['batches'])} of 5 batches run" in r.stdout
    assert _files(cut) == _files(whole) and not list(cut.rglob("*.tmp"))

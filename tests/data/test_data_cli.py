"""invcoss-cli phantoms / preprocess / pretrain / stats: summaries, skipped files, user errors exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from invcoss.cli import main
from invcoss.data import read_nifti, read_picture


@pytest.fixture
def runner():
    return CliRunner()


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, a message naming the problem, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output


def make_scans(runner, folder, count: int = 2):
    r = runner.invoke(
        main,
        ["phantoms", "--modality", "ct", "--count", str(count), "--out", str(folder), "--size", "20x40x40"],
    )
    assert r.exit_code == 0, r.output
    good = (folder / "ct_0000.nii.gz").read_bytes()
    (folder / "ct_9999_truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "readme.txt").write_text("not an image\n")


def test_phantoms_every_modality(runner, tmp_path):
    for modality, size in (
        ("ct", "12x32x32"),
        ("mri", "12x32x32"),
        ("xray", "48x40"),
        ("pathology", "64x64"),
    ):
        out = tmp_path / modality
        r = runner.invoke(
            main, ["phantoms", "--modality", modality, "--count", "2", "--out", str(out), "--size", size]
        )
        assert r.exit_code == 0, r.output
        assert f"wrote 2 {modality} phantoms" in r.stdout
        files = sorted(out.iterdir())
        assert len(files) == 2
        if modality in ("ct", "mri"):
            assert read_nifti(files[0]).array.shape == (12, 32, 32)
        else:
            assert read_picture(files[0]).array.shape[1:] == tuple(int(s) for s in size.split("x"))


def test_phantoms_bad_size_exits_2(runner, tmp_path):
    r = runner.invoke(main, ["phantoms", "--modality", "ct", "--out", str(tmp_path), "--size", "32x32"])
    assert_user_error(r, "size for ct phantoms must be 3 positive integers")
    r = runner.invoke(main, ["phantoms", "--modality", "ct", "--out", str(tmp_path), "--size", "axb"])
    assert_user_error(r, "expected something like 64x160x160")


def test_preprocess_reports_skipped_files_by_name(runner, tmp_path):
    make_scans(runner, tmp_path / "scans")
    r = runner.invoke(
        main,
        [
            "preprocess",
            "--modality",
            "ct",
            "--data",
            str(tmp_path / "scans"),
            "--out",
            str(tmp_path / "c"),
            "--profile",
            "quick",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "preprocessed 2 files (0 already done, 2 skipped: 1 unreadable, 1 not an image) -> 6 samples"
        in r.stdout
    )
    assert "skipped ct_9999_truncated.nii.gz: cannot read voxel data" in r.stderr
    assert "skipped readme.txt: not a NIfTI file" in r.stderr


def test_preprocess_strict_exits_2_without_traceback(runner, tmp_path):
    make_scans(runner, tmp_path / "scans")
    args = ["preprocess", "--modality", "ct", "--data", str(tmp_path / "scans"), "--out", str(tmp_path / "c")]
    r = runner.invoke(main, [*args, "--profile", "quick", "--strict"])
    assert_user_error(r, "ct_9999_truncated.nii.gz", "cannot read voxel data", "--strict")


def test_preprocess_user_errors(runner, tmp_path):
    r = runner.invoke(
        main,
        ["preprocess", "--modality", "ct", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "c")],
    )
    assert_user_error(r, "does not exist")
    make_scans(runner, tmp_path / "scans")
    base = ["preprocess", "--modality", "ct", "--data", str(tmp_path / "scans"), "--out", str(tmp_path / "c")]
    assert runner.invoke(main, [*base, "--profile", "quick"]).exit_code == 0
    assert_user_error(runner.invoke(main, [*base, "--profile", "paper"]), "another configuration")


def test_pretrain_and_stats_user_errors(runner, tmp_path):
    make_scans(runner, tmp_path / "scans")
    cache = tmp_path / "cache"
    runner.invoke(
        main, ["preprocess", "--modality", "ct", "--data", str(tmp_path / "scans"), "--out", str(cache)]
    )
    # (A paper-profile cache trains the preset at its own size: tests/cli/test_cli_runlog.py.)
    r = runner.invoke(
        main, ["pretrain", "--data", str(tmp_path / "nowhere"), "--epochs", "1", "--out", str(tmp_path / "k")]
    )
    assert_user_error(r, "does not exist")
    r = runner.invoke(
        main, ["pretrain", "--data", str(tmp_path / "scans"), "--epochs", "1", "--out", str(tmp_path / "k")]
    )
    assert_user_error(r, "give --modality")
    r = runner.invoke(
        main,
        [
            "pretrain",
            "--data",
            str(cache),
            "--modality",
            "mri",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "k"),
        ],
    )
    assert_user_error(r, "holds ct data, but --modality mri")
    r = runner.invoke(
        main, ["pretrain", "--data", str(cache), "--preset", "vit_huge", "--out", str(tmp_path / "k")]
    )
    assert_user_error(r, "--preset", "'vit_huge' is not one of 'vit_base', 'vit_nano'")
    r = runner.invoke(
        main,
        [
            "stats",
            "--checkpoint",
            str(tmp_path / "nockpt"),
            "--data",
            str(cache),
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert_user_error(r, "cannot load checkpoint")

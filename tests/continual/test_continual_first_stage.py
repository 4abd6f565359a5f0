"""``ContinualConfig.first_stage_epochs``: the first stage's own budget and schedule."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from invcoss.cli import main
from invcoss.continual import run_continual, stage_dir
from invcoss.continual.config import ContinualConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> ContinualConfig:
    return ContinualConfig.from_profile(
        "quick",
        method="seq",
        order=("xray", "pathology"),
        img_size_2d=32,
        batch_size=4,
        stats_batch_size=8,
        **kw,
    )


def test_first_stage_trains_its_own_epochs_on_its_own_schedule(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {m: torch.rand(8, 3, 32, 32, generator=g) for m in ("xray", "pathology")}
    seen = []
    run_continual(
        data,
        tmp_path / "a",
        _config(epochs=1, first_stage_epochs=3),
        device="cpu",
        on_event=lambda e: seen.append((e.stage, e.step.epochs)) if e.kind == "train" else None,
    )
    assert seen == [(0, 3)] * 6 + [(1, 1)] * 2  # 8 samples in batches of 4
    for t, epochs in ((0, 3), (1, 1)):
        stage = json.loads(
            (stage_dir(tmp_path / "a", t, ("xray", "pathology")[t]) / "stage.json").read_text()
        )
        assert [h["epoch"] for h in stage["history"]] == list(range(1, epochs + 1))
    # Stage 1 is exactly the first stage of a run with 3 epochs everywhere (same warm-up and decay).
    run_continual(data, tmp_path / "b", _config(epochs=3), device="cpu")
    a = load_file(stage_dir(tmp_path / "a", 0, "xray") / "model.safetensors")
    b = load_file(stage_dir(tmp_path / "b", 0, "xray") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_stage_epochs_validation_and_default():
    assert _config(epochs=5).stage_epochs(0) == 5
    assert _config(epochs=5, first_stage_epochs=7).stage_epochs(1) == 5
    with pytest.raises(ValueError, match="first_stage_epochs must be >= 1 or None, got 0"):
        _config(first_stage_epochs=0)
    # A configuration saved before the field existed still reads back (the default).
    values = _config().to_dict()
    del values["first_stage_epochs"]
    assert ContinualConfig.from_dict(values).first_stage_epochs is None


def test_cli_first_stage_epochs(tmp_path):
    runner = CliRunner()
    scans = tmp_path / "xray"
    r = runner.invoke(
        main, ["phantoms", "--modality", "xray", "--count", "4", "--out", str(scans), "--size", "48x48"]
    )
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    args = [
        "continual", "--order", "xray", "--method", "seq", "--out", str(run), "--epochs", "1", "--batch-size", "2",
        "--img-size-2d", "32x32", "--threads", "1", "--data", f"xray={scans}",
    ]  # fmt: skip
    r = runner.invoke(main, [*args, "--first-stage-epochs", "0"])
    assert r.exit_code == 2 and "--first-stage-epochs" in r.output
    r = runner.invoke(main, [*args, "--first-stage-epochs", "2"])
    assert r.exit_code == 0, r.output
    stage = json.loads((stage_dir(run, 0, "xray") / "stage.json").read_text())
    assert [h["epoch"] for h in stage["history"]] == [1, 2]
    assert json.loads((run / "continual.json").read_text())["config"]["first_stage_epochs"] == 2


def test_experiment_forgetting_first_stage_epochs(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "forgetting", "--size", "tiny", "--methods", "seq", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--first-stage-epochs", "3", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "experiment.json").read_text())["experiment"]["base"]["first_stage_epochs"] == 3
    history = json.loads((stage_dir(out / "runs" / "seq", 0, "ct") / "stage.json").read_text())["history"]
    later = json.loads((stage_dir(out / "runs" / "seq", 1, "xray") / "stage.json").read_text())["history"]
    assert (len(history), len(later)) == (3, 2)  # the tiny size trains 2 epochs per stage

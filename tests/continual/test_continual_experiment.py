"""``invcoss-cli experiment forgetting`` end to end at its tiny size."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from invcoss.cli import main
from invcoss.continual import stage_dir
from invcoss.continual.config import buffer_count
from invcoss.continual.eval import reconstruction_loss
from invcoss.continual.experiment import ForgettingExperiment
from invcoss.data import open_dataset
from invcoss.models import MAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_experiment_forgetting_tiny_end_to_end(tmp_path):
    out = tmp_path / "exp"
    runner = CliRunner()
    r = runner.invoke(main, ["experiment", "forgetting", "--size", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| method | modality | loss after its stage")
    assert lines[-1].startswith("mean forgetting over ct: seq ") and "3 runs in" in lines[-1]
    rows = list(csv.DictReader((out / "forgetting.csv").open()))
    assert [(row["method"], row["modality"]) for row in rows] == [
        (m, mod) for m in ("seq", "er", "invcoss") for mod in ("ct", "xray")
    ]
    by = {(row["method"], row["modality"]): row for row in rows}
    held_out = open_dataset(out / "cache" / "test" / "ct", "ct")
    exp = ForgettingExperiment.from_size("tiny")
    for m in ("seq", "er", "invcoss"):
        # The table's losses, scored again here from the checkpoints on the held-out CT scans.
        run = out / "runs" / m
        own, end = (
            reconstruction_loss(
                MAE.from_pretrained(stage_dir(run, t, mod)),
                held_out,
                repeats=exp.eval_repeats,
                seed=exp.seed,
                batch_size=exp.base.stats_batch_size,
            )
            for t, mod in ((0, "ct"), (1, "xray"))
        )
        ct = by[m, "ct"]
        assert float(ct["loss_after_own_stage"]) == pytest.approx(own, rel=1e-5)
        assert float(ct["loss_at_end"]) == pytest.approx(end, rel=1e-5)
        assert float(ct["forgetting"]) == pytest.approx(end - own, rel=1e-4, abs=1e-6)
        # All methods share stage 1 (same seed, same data): the same loss after it.
        assert float(ct["loss_after_own_stage"]) == pytest.approx(
            float(by["seq", "ct"]["loss_after_own_stage"])
        )
        assert float(by[m, "xray"]["forgetting"]) == 0.0
        # The probe is scored at every stage for every seen modality.
        retention = list(csv.DictReader((run / "eval" / "retention.csv").open()))
        assert [(row["stage"], row["modality"]) for row in retention if row["probe_accuracy"]] == [
            ("1", "ct"), ("2", "ct"), ("2", "xray")
        ]  # fmt: skip
    assert int(by["seq", "ct"]["replay_bytes"]) == 0
    assert int(by["er", "ct"]["replay_bytes"]) > int(by["invcoss", "ct"]["replay_bytes"]) > 0
    summary = json.loads((out / "experiment.json").read_text())
    assert set(summary["mean_forgetting"]) == {"seq", "er", "invcoss"}
    assert summary["experiment"]["base"]["order"] == ["ct", "xray"]
    assert summary["compute"]["threads"] == 1  # the experiment's default, whatever the machine
    retention = json.loads((out / "runs" / "invcoss" / "eval" / "retention.json").read_text())
    assert retention["settings"]["compute"]["threads"] == 1
    assert Image.open(out / "retention.png").size == (840, 344)
    # The synthetic replay of stage 2 has as many samples as er keeps.
    stage = json.loads((out / "runs" / "invcoss" / "stage2_xray" / "stage.json").read_text())
    train_ct = json.loads((out / "runs" / "er" / "stage1_ct" / "stage.json").read_text())["samples"]
    assert stage["buffer"] == {"ct": buffer_count(train_ct, 0.10)}
    # A second run refuses the folder without --resume, and with it re-evaluates the same table.
    r = runner.invoke(main, ["experiment", "forgetting", "--size", "tiny", "--out", str(out)])
    assert r.exit_code == 2 and "--resume" in r.output
    before = (out / "forgetting.md").read_text()
    r = runner.invoke(main, ["experiment", "forgetting", "--size", "tiny", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert (out / "forgetting.md").read_text() == before


def test_experiment_forgetting_passes_the_buffer_weights(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "forgetting", "--size", "tiny", "--out", str(out), "--methods", "invcoss"]
    r = CliRunner().invoke(main, [*args, "--buffer-mae-weight", "0", "--distill-weight", "2.5"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "experiment.json").read_text())
    base = summary["experiment"]["base"]
    assert (base["buffer_mae_weight"], base["distill_weight"], base["method"]) == (0.0, 2.5, "invcoss")
    # Region, raw-pixel and probe columns, numbers in every row; the probe's labels on both sides.
    (ct,) = [row for row in summary["rows"] if row["modality"] == "ct"]
    assert ct["forgetting_structured"] == pytest.approx(ct["forgetting"])  # no CT air at the tiny size
    assert ct["background_fraction"] == 0.0 and ct["forgetting_background"] is None
    assert ct["raw_forgetting"] != ct["forgetting"] and 0 <= ct["probe_accuracy_at_end"] <= 1
    assert ct["probe_forgetting"] == pytest.approx(
        ct["probe_accuracy_after_own_stage"] - ct["probe_accuracy_at_end"]
    )
    classes = summary["evaluation"]["probe_classes"]
    assert classes["ct"] == {
        "train": {"lower_chest": 3, "upper_chest": 1},
        "test": {"lower_chest": 3, "upper_chest": 1},
    }
    assert classes["xray"]["train"] == {"high_lung_bases": 4, "low_lung_bases": 4}
    assert "| background | structured | raw pixels | probe |" in (out / "forgetting.md").read_text()
    assert "mean forgetting, structured patches: invcoss " in r.stdout
    r = CliRunner().invoke(main, [*args, "--resume", "--buffer-mae-weight", "-1"])
    assert r.exit_code == 2 and "buffer_mae_weight" in r.output and "Traceback" not in r.output

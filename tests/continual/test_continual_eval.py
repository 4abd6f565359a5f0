"""Evaluation of continual runs: fixed-mask loss, forgetting, probe, storage, plot, and the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from invcoss.cli import main
from invcoss.continual import run_continual, stage_dir
from invcoss.continual.config import ContinualConfig
from invcoss.continual.eval import evaluate_run, reconstruction_loss, storage_report
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.probe import linear_probe, read_labelled_csv
from invcoss.data import write_phantoms
from invcoss.models import MAE, create_model
from tests.continual.test_continual_run import TINY  # the tiny run settings shared by the continual tests

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """seq and er runs over ct then xray on random tensors, and held-out tensors."""
    root = tmp_path_factory.mktemp("runs")
    g = torch.Generator().manual_seed(0)
    train = {
        "ct": torch.rand(10, 1, 16, 32, 32, generator=g) * 2 - 1,
        "xray": torch.rand(10, 3, 32, 32, generator=g),
    }
    test = {
        "ct": torch.rand(5, 1, 16, 32, 32, generator=g) * 2 - 1,
        "xray": torch.rand(5, 3, 32, 32, generator=g),
    }
    for method in ("seq", "er", "invcoss"):
        config = ContinualConfig.from_profile("quick", method=method, order=("ct", "xray"), **TINY)
        run_continual(train, root / method, config, device="cpu")
    return root, test


def test_reconstruction_loss_uses_fixed_masks_and_averages_samples():
    model = create_model("vit_nano", img_size_2d=32).eval()
    x = torch.rand(5, 3, 32, 32)
    noise = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        per_sample = [
            float(model(x[i : i + 1], 0.75, noise=noise[r, i : i + 1])[0]) for r in range(2) for i in range(5)
        ]
    expected = sum(per_sample) / len(per_sample)
    got = reconstruction_loss(model, x, repeats=2, seed=3, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    assert reconstruction_loss(model, x, repeats=2, seed=3, batch_size=5) == pytest.approx(got, rel=1e-6)
    assert reconstruction_loss(model, x, repeats=2, seed=4) != pytest.approx(got, rel=1e-6)
    assert model.training is False
    with pytest.raises(ValueError, match="empty"):
        reconstruction_loss(model, torch.zeros(0, 3, 32, 32))


def test_evaluate_scores_seen_modalities_and_forgetting(runs, tmp_path):
    root, test = runs
    table = evaluate_run(root / "seq", test, repeats=1, seed=0, device="cpu")
    assert [(r.stage, r.modality) for r in table.rows] == [(1, "ct"), (2, "ct"), (2, "xray")]
    first = MAE.from_pretrained(stage_dir(root / "seq", 0, "ct"))
    last = MAE.from_pretrained(stage_dir(root / "seq", 1, "xray"))
    own = reconstruction_loss(first, test["ct"], repeats=1, seed=0)
    end = reconstruction_loss(last, test["ct"], repeats=1, seed=0)
    ct_end = table.final()["ct"]
    assert ct_end.loss == pytest.approx(end, rel=1e-6) and ct_end.loss_after_own_stage == pytest.approx(
        own, rel=1e-6
    )
    assert ct_end.forgetting == pytest.approx(end - own, rel=1e-5, abs=1e-7)
    assert table.rows[0].forgetting == 0.0 and table.final()["xray"].forgetting == 0.0
    assert table.curve("xray") == [None, table.final()["xray"].loss]
    paths = table.write(tmp_path)
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert (
        len(rows) == 3
        and rows[1]["method"] == "seq"
        and float(rows[1]["forgetting"]) == pytest.approx(ct_end.forgetting)
    )
    img = Image.open(paths["png"]).convert("RGB")
    assert img.size == (2 * 420, 344)  # one panel per modality: ct and xray
    assert (31, 119, 180) in {c for _, c in img.getcolors(1 << 20)}  # the run's curve is drawn
    saved = json.loads(paths["json"].read_text())
    assert saved["order"] == ["ct", "xray"]
    assert saved["settings"] == {
        "mask_ratio": 0.75,
        "repeats": 1,
        "seed": 0,
        "samples": {"ct": 5, "xray": 5},
        "probe": {},
    }
    with pytest.raises(ValueError, match="mri not in the run's order"):
        evaluate_run(root / "seq", {"mri": test["ct"]})


def test_storage_report_counts_what_each_method_keeps(runs):
    root, _ = runs
    seq, er, inv = (storage_report(root / m) for m in ("seq", "er", "invcoss"))
    assert [r.replay_bytes for r in seq] == [0, 0]
    for k, m in enumerate(("ct", "xray")):
        assert er[k].replay_bytes == (stage_dir(root / "er", k, m) / "buffer.safetensors").stat().st_size
        assert inv[k].replay_bytes == (stage_dir(root / "invcoss", k, m) / "stats.safetensors").stat().st_size
        assert er[k].checkpoint_bytes == inv[k].checkpoint_bytes == seq[k].checkpoint_bytes > 0
    # One 16x32x32 float32 CT sample is 64 KiB; its statistics (4 blocks x 2 x 5 tokens x 96) 15 KiB.
    assert er[0].replay_bytes > 64 * 1024 > inv[0].replay_bytes > 4 * 2 * 5 * 96 * 4
    assert er[0].data_bytes == 10 * 16 * 32 * 32 * 4 and er[0].source_bytes is None  # tensors given
    # er keeps 1 of 10 samples: a tenth of the data, plus the file header.
    assert 0.1 <= er[0].replay_bytes / er[0].data_bytes < 0.11
    assert [r.kept_after for r in (seq[0], er[0], inv[0])] == ["nothing", "buffer", "statistics"]


def test_linear_probe_fits_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 2] - x[:, 5] > 0).long()
    assert linear_probe(x[:150], y[:150], x[150:], y[150:], 2) >= 0.96
    noise = torch.randint(0, 2, (200,), generator=g)
    assert linear_probe(x[:150], noise[:150], x[150:], noise[150:], 2) < 0.75


def _labelled_folder(root, split: bool):
    """X-ray and pathology pictures labelled by kind (easily separable)."""
    xr = write_phantoms(root / "a", "xray", 3, size=(48, 48))
    pa = write_phantoms(root / "b", "pathology", 3, size=(48, 48))
    lines = ["file,label,split" if split else "file,label"]
    for i, p in enumerate(xr + pa):
        label = "xray" if p in xr else "path"
        lines.append(
            f"{p.relative_to(root)},{label}" + (f",{'test' if i % 3 == 0 else 'train'}" if split else "")
        )
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_labelled_csv_format_and_errors(tmp_path):
    path = _labelled_folder(tmp_path, split=True)
    s = read_labelled_csv(path, "xray", (32, 32), channels=3)
    assert s.classes == ["path", "xray"] and s.samples.shape == (6, 3, 32, 32)
    assert s.test.tolist() == [True, False, False, True, False, False]
    bad = tmp_path / "bad.csv"
    for text, match in [
        ("name,label\na.png,x\n", "needs the columns file,label"),
        ("file,label\na.png,x\nb.png,x\n", "single class"),
        ("file,label\nmissing.png,x\nb.png,y\n", "does not exist"),
        ("file,label,split\na/xray_0000.png,x,val\na/xray_0001.png,y,test\n", "split must be train or test"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_labelled_csv(bad, "xray", (32, 32), channels=3)


def test_cli_continual_evaluate_storage_end_to_end(tmp_path):
    runner = CliRunner()
    caches = {}
    for m, size in (("ct", "24x48x48"), ("xray", "48x48")):
        for split, count in (("train", 4 if m == "xray" else 1), ("test", 2 if m == "xray" else 1)):
            folder = tmp_path / "scans" / split / m
            r = runner.invoke(
                main,
                ["phantoms", "--modality", m, "--count", str(count), "--out", str(folder), "--size", size],
            )
            assert r.exit_code == 0, r.output
            caches[(split, m)] = folder
    run = tmp_path / "run"
    args = [
        "continual", "--order", "ct,xray", "--method", "er", "--out", str(run), "--epochs", "1",
        "--batch-size", "2", "--buffer-fraction", "0.5", "--threads", "1", "--img-size-2d", "32x32",
        "--img-size-3d", "16x32x32", "--data", f"ct={caches['train', 'ct']},xray={caches['train', 'xray']}",
    ]  # fmt: skip
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("er: 2 stages ct -> xray (2 trained now)")
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "already holds a continual run" in r.output and "Traceback" not in r.output
    labels = _labelled_folder(tmp_path / "lab", split=False)
    r = runner.invoke(
        main,
        ["evaluate", "--checkpoints", str(run), "--threads", "1", "--labels", f"xray={labels}",
         "--data", f"ct={caches['test', 'ct']},xray={caches['test', 'xray']}"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "stage 2      xray:        ct loss" in r.stdout and "probe" in r.stdout
    assert r.stdout.splitlines()[-1].startswith(
        "evaluated 2 checkpoints of er on 2 modalities: mean forgetting"
    )
    assert (run / "eval" / "retention.png").is_file()
    rows = list(csv.DictReader((run / "eval" / "retention.csv").open()))
    assert [row["probe_accuracy"] != "" for row in rows] == [False, False, True]
    r = runner.invoke(main, ["storage", str(run)])
    assert r.exit_code == 0 and r.stdout.splitlines()[-1].startswith("er keeps")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["continual", "--order", "ct,pet", "--data", "ct=x", "--out", "o"], "unknown modality 'pet'"),
        (["continual", "--order", "ct", "--data", "ct", "--out", "o"], "expected modality=PATH"),
        (
            ["continual", "--order", "ct", "--data", "ct=x,mri=y", "--out", "o"],
            "mri, which --order ct does not",
        ),
        (["continual", "--order", "ct", "--data", "ct=nowhere", "--out", "o"], "data nowhere does not exist"),
        (
            ["continual", "--order", "ct", "--data", "ct=x", "--out", "o", "--buffer-fraction", "2"],
            "buffer_fraction",
        ),
        (["evaluate", "--checkpoints", "nowhere", "--data", "ct=x"], "not a continual run folder"),
        (["storage", "nowhere"], "not a continual run folder"),
        (["experiment", "forgetting", "--methods", "seq,ewc"], "methods must be a non-empty subset"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_line_plot_draws_and_validates(tmp_path):
    p = line_plot(
        tmp_path / "p.png",
        [
            Panel("a", ["1", "2", "3"], {"x": [1.0, None, 2.0], "y": [0.5, 0.7, 0.9]}),
            Panel("b", ["1"], {"x": [3.0]}),
        ],
        "title",
    )
    img = Image.open(p).convert("RGB")
    assert img.size == (840, 344)
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # both series drawn
    with pytest.raises(ValueError, match="has 2 values for 3 x labels"):
        line_plot(tmp_path / "q.png", [Panel("a", ["1", "2", "3"], {"x": [1.0, 2.0]})])
    with pytest.raises(ValueError, match="at least one panel"):
        line_plot(tmp_path / "q.png", [])

"""Evaluation of continual runs: fixed-mask loss, forgetting, probe, storage, plot, and the CLI."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from invcoss.cli import main
from invcoss.continual import run_continual, stage_dir
from invcoss.continual.config import ContinualConfig
from invcoss.continual.eval import (
    BACKGROUND_STD,
    background_patches,
    evaluate_run,
    reconstruction_loss,
    reconstruction_scores,
    storage_report,
)
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.probe import (
    LabelledSet,
    linear_probe,
    probe_accuracy,
    read_labelled_csv,
    write_labelled_csv,
)
from invcoss.data import Preprocessor, Volume, ct_phantom, get_config, write_phantoms
from invcoss.data.phantoms import phantom_label_rows
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


def _regions_volume(g: torch.Generator) -> torch.Tensor:
    """``(1, 1, 16, 32, 32)``: four 16^3 patches of CT air, flat tissue, an edge and a gradient.

    Air and tissue carry white noise of std 0.0044 (4.5 HU, model units HU / 1024), as real air.
    """
    x = torch.empty(1, 1, 16, 32, 32)
    air, tissue = -1000 / 1024, 40 / 1024
    x[..., :16, :16] = air
    x[..., :16, 16:] = tissue
    x[..., 16:, :16] = torch.where(torch.arange(16) < 8, air, tissue)[None, :, None]  # an edge
    x[..., 16:, 16:] = torch.linspace(-0.2, 0.3, 16)[None, None, :]  # a gradient
    return x + 0.0044 * torch.randn(x.shape, generator=g)


def test_background_rule_separates_noise_from_structure():
    model = create_model("vit_nano", img_size_3d=(16, 32, 32))
    x = _regions_volume(torch.Generator().manual_seed(0))
    # Raster order: (0, 0) air, (0, 1) tissue, (1, 0) edge, (1, 1) gradient. A flat noisy patch is
    # background whatever its level: under the normalised target both are unit-variance noise.
    assert background_patches(model, x, BACKGROUND_STD["ct"]).tolist() == [[True, True, False, False]]
    assert background_patches(model, x, 0.004).tolist() == [[False, False, False, False]]
    # The phantoms' real air: every patch whose voxels all lie below -900 HU is background.
    model = create_model("vit_nano", img_size_3d=(16, 64, 64))
    hu = ct_phantom(0, 0, (24, 64, 64), (2.5, 4.0, 4.0))  # a 256 mm field of view
    pre = Preprocessor(get_config("ct", "quick", size=(16, 64, 64)))
    volume = Volume(hu, (2.5, 4.0, 4.0), torch.eye(4).numpy())
    samples = torch.stack([torch.from_numpy(s.array) for s in pre(volume)])
    air = model.patchify(samples).amax(-1) < -900 / 1024
    flagged = background_patches(model, samples, BACKGROUND_STD["ct"])
    assert bool(air.any()) and bool(flagged[air].all())
    assert float(flagged.float().mean()) < float(air.float().mean()) + 0.1  # little else


def _patch_losses_ref(model, x, pred, norm: bool) -> torch.Tensor:
    """Per-patch MSE in float64 from the formula: against the standardised patches of ``x``, or
    against its raw patches with the (standardised) prediction mapped back by each patch's own
    mean and standard deviation."""
    t = model.patchify(x).double()
    mean, sd = t.mean(-1, keepdim=True), (t.var(-1, keepdim=True) + 1e-6).sqrt()
    if norm:
        return (pred.double() - (t - mean) / sd).pow(2).mean(-1)
    return (pred.double() * sd + mean - t).pow(2).mean(-1)


def test_region_and_raw_losses_match_the_formula_and_weight_to_the_overall_loss():
    model = create_model("vit_nano", img_size_3d=(16, 32, 32)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([_regions_volume(g) for _ in range(3)])  # 3 samples x 4 patches, 2 background each
    s = reconstruction_scores(model, x, repeats=2, seed=5, batch_size=2, background_std=0.01)
    # 4 tokens, 3 masked per sample (mask 0.75), 3 samples, 2 repeats.
    assert s.background_patches + s.structured_patches == 2 * 3 * 3
    assert 0 < s.background_patches < 18 and s.background_fraction == s.background_patches / 18
    for prefix in ("", "raw_"):
        whole, bg, st = (getattr(s, f"{prefix}loss{k}") for k in ("", "_background", "_structured"))
        weighted = (s.background_patches * bg + s.structured_patches * st) / 18
        assert whole == pytest.approx(weighted, rel=1e-9)
    # Independently: every masked patch of every repeat, from the formula.
    noise = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5))
    background = background_patches(model, x, 0.01)
    got = {True: [[], []], False: [[], []]}
    with torch.no_grad():
        for r in range(2):
            _, pred, mask = model(x, 0.75, noise=noise[r])
            for norm in (True, False):
                per = _patch_losses_ref(model, x, pred, norm)
                got[norm][0].append(per[mask.bool() & background])
                got[norm][1].append(per[mask.bool() & ~background])
    for norm, prefix in ((True, ""), (False, "raw_")):
        bg, st = torch.cat(got[norm][0]), torch.cat(got[norm][1])
        assert getattr(s, f"{prefix}loss_background") == pytest.approx(float(bg.mean()), rel=1e-5)
        assert getattr(s, f"{prefix}loss_structured") == pytest.approx(float(st.mean()), rel=1e-5)
        assert getattr(s, f"{prefix}loss") == pytest.approx(float(torch.cat([bg, st]).mean()), rel=1e-5)
    assert s.loss == pytest.approx(reconstruction_loss(model, x, repeats=2, seed=5, batch_size=2), rel=1e-12)
    # The raw error weighs each patch by its variance: the background (near-flat) patches count
    # for almost nothing, where the normalised target scores them like any other patch.
    assert s.raw_loss_background < 1e-3 * s.loss_background
    # A model trained on raw pixels predicts raw pixels: it defaults to the raw target, unmapped.
    raw_model = create_model("vit_nano", img_size_3d=(16, 32, 32), norm_pix_loss=False).eval()
    raw_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, pred, mask = raw_model(x, 0.75, noise=noise[0])
    direct = ((pred.double() - raw_model.patchify(x).double()).pow(2).mean(-1) * mask).sum() / mask.sum()
    assert float(raw_model.forward_loss(x, pred, mask)) == pytest.approx(float(direct), rel=1e-6)
    with pytest.raises(ValueError, match="background_std must be >= 0"):
        reconstruction_scores(model, x, background_std=-1.0)


def test_probe_is_scored_at_every_stage_with_its_drop(runs):
    root, test = runs
    g = torch.Generator().manual_seed(2)
    labelled = {
        "ct": LabelledSet(
            "ct", root / "ct.csv", ["a", "b"], torch.rand(8, 1, 16, 32, 32, generator=g) * 2 - 1,
            torch.tensor([0, 1] * 4), torch.tensor([False] * 6 + [True] * 2),
        ),
        "xray": LabelledSet(
            "xray", root / "xray.csv", ["a", "b"], torch.rand(8, 3, 32, 32, generator=g),
            torch.tensor([0, 0, 1, 1] * 2), torch.tensor([False, True] * 4),
        ),
    }  # fmt: skip
    table = evaluate_run(root / "er", test, labelled, repeats=1, device="cpu")
    assert [(r.stage, r.modality) for r in table.rows] == [(1, "ct"), (2, "ct"), (2, "xray")]
    for r in table.rows:
        model = MAE.from_pretrained(stage_dir(root / "er", r.stage - 1, r.stage_modality))
        assert r.probe_accuracy == probe_accuracy(model, labelled[r.modality])
    first, end = table.rows[0], table.rows[1]
    assert end.probe_accuracy_after_own_stage == first.probe_accuracy
    assert end.probe_forgetting == pytest.approx(first.probe_accuracy - end.probe_accuracy)
    assert table.rows[2].probe_forgetting == 0.0
    assert table.settings["probe_classes"]["ct"] == {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}
    assert table.mean_forgetting("probe_forgetting") == end.probe_forgetting


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
    assert saved["settings"].pop("compute")["threads"] == torch.get_num_threads()  # the count it ran at
    assert saved["settings"] == {
        "mask_ratio": 0.75,
        "repeats": 1,
        "seed": 0,
        "samples": {"ct": 5, "xray": 5},
        "background_std": {"ct": BACKGROUND_STD["ct"], "xray": BACKGROUND_STD["xray"]},
        "background_fraction": {"ct": 0.0, "xray": 0.0},  # uniform noise over the full range
        "probe": {},
        "probe_classes": {},
    }
    # No background patch: that region's losses are NaN in the rows and null in the JSON.
    assert math.isnan(ct_end.loss_background) and saved["rows"][0]["loss_background"] is None
    assert ct_end.loss_structured == ct_end.loss and ct_end.forgetting_structured == ct_end.forgetting
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


def test_labelled_csv_with_sample_rows_from_phantom_anatomy(tmp_path):
    files = write_phantoms(tmp_path / "ct", "ct", 3, size=(24, 48, 48))
    rows = phantom_label_rows(tmp_path / "ct", "ct", 3, size=(24, 48, 48))
    path = write_labelled_csv(
        tmp_path / "labels.csv", [(f, k, label, "test" if f == files[2] else "train") for f, k, label in rows]
    )
    assert path.read_text().splitlines()[1] == f"ct/ct_0000.nii.gz,0,{rows[0][2]},train"
    s = read_labelled_csv(path, "ct", (16, 32, 32))
    assert s.samples.shape == (12, 1, 16, 32, 32)  # 4 windows per file
    assert [s.classes[t] for t in s.targets] == [label for _, _, label in rows]
    assert s.test.tolist() == [False] * 8 + [True] * 4
    counts = s.class_counts()
    assert sum(counts["train"].values()) == 8 and sum(counts["test"].values()) == 4
    # Each sample row picks its window: the same tensor as the file's preprocessing gives.
    whole = read_labelled_csv(write_labelled_csv(tmp_path / "w.csv", [(files[0], None, "a", "train"),
                                                                     (files[1], None, "b", "test")]),
                              "ct", (16, 32, 32))  # fmt: skip
    assert torch.equal(whole.samples[:8], s.samples[:8])
    # Without a split column the held-out files keep all their windows on one side.
    write_labelled_csv(tmp_path / "nosplit.csv", [(f, k, label, None) for f, k, label in rows])
    s = read_labelled_csv(tmp_path / "nosplit.csv", "ct", (16, 32, 32), test_fraction=0.4)
    assert [s.test[4 * i : 4 * i + 4].tolist() for i in range(3)].count([True] * 4) == 1
    assert int(s.test.sum()) == 4
    write_labelled_csv(tmp_path / "bad.csv", [(files[0], 4, "a", "train"), (files[1], 0, "b", "test")])
    with pytest.raises(ValueError, match=r"sample must be an index in 0..3 for ct/ct_0000.nii.gz, got '4'"):
        read_labelled_csv(tmp_path / "bad.csv", "ct", (16, 32, 32))


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
    assert "(background n/a in 0 patches, structured " in r.stdout and "; raw pixels " in r.stdout
    assert r.stdout.splitlines()[-1].startswith(
        "evaluated 2 checkpoints of er on 2 modalities: mean forgetting"
    )
    assert (run / "eval" / "retention.png").is_file()
    rows = list(csv.DictReader((run / "eval" / "retention.csv").open()))
    assert [row["probe_accuracy"] != "" for row in rows] == [False, False, True]
    assert float(rows[1]["raw_forgetting"]) == pytest.approx(
        float(rows[1]["raw_loss"]) - float(rows[0]["raw_loss"]), abs=1e-6
    )
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

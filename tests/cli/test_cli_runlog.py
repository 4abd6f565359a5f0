"""Run logs and replays of the long commands: metrics.jsonl as a run goes (appended on --resume),
`plot`, --tensorboard, --config, and preprocess -> pretrain with both commands' defaults."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from invcoss.cli import main
from invcoss.runlog import METRICS_NAME, read_metrics, tensorboard_available

pytestmark = pytest.mark.usefixtures("one_thread")


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def lines(folder):
    return read_metrics(folder)


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    """Two X-ray phantoms preprocessed with preprocess's defaults (the paper's 224x224)."""
    root = tmp_path_factory.mktemp("xray")
    runner = CliRunner()
    ok(runner.invoke(main, ["phantoms", "--modality", "xray", "--count", "2", "--size", "32x32",
                            "--out", str(root / "scans")]))  # fmt: skip
    ok(runner.invoke(main, ["preprocess", "--modality", "xray", "--data", str(root / "scans"),
                            "--out", str(root / "cache"), "--threads", "1"]))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def pretrained(xray):
    """pretrain with its defaults on that cache (1 epoch, then --resume to 2)."""
    run = xray / "run"
    argv = ["pretrain", "--data", str(xray / "cache"), "--out", str(run), "--batch-size", "1",
            "--threads", "1", "--device", "cpu"]  # fmt: skip
    first = ok(CliRunner().invoke(main, [*argv, "--epochs", "1"]))
    after_first = (run / METRICS_NAME).read_text()
    ok(CliRunner().invoke(main, [*argv, "--epochs", "2", "--resume"]))
    return run, argv, first, after_first


def test_preprocess_and_pretrain_defaults_fit_together(xray, pretrained):
    run, _, first, _ = pretrained
    cache = json.loads((xray / "cache" / "manifest.json").read_text())
    assert cache["sample_shape"] == [3, 224, 224]  # preprocess's default profile
    model = json.loads((run / "config.json").read_text())["config"]
    assert model["name"] == "vit_nano" and model["img_size_2d"] == [224, 224]
    assert first.stdout.strip().endswith("(input 224x224)")


def test_metrics_are_written_per_step_and_epoch_and_appended_on_resume(pretrained):
    run, _, _, after_first = pretrained
    records = lines(run)
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 2 samples at batch 1, 2 epochs
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert (run / METRICS_NAME).read_text().startswith(after_first)  # the resume appended
    for r in steps:
        assert set(r) >= {"time", "elapsed_s", "lr", "samples_per_s", "losses", "phase"}
        assert r["samples_per_s"] > 0 and r["phase"] == "train"
    # The epoch lines agree with the epoch losses pretrain.json records (same steps, batch 1).
    saved = json.loads((run / "pretrain.json").read_text())["losses"]
    assert [r["losses"]["mae"] for r in epochs] == pytest.approx(saved, rel=1e-6)
    assert all(a["time"] <= b["time"] for a, b in zip(records, records[1:]))


def test_plot_draws_the_loss_curve_and_keeps_earlier_pictures(pretrained, tmp_path):
    run = pretrained[0]
    out = tmp_path / "plots"
    result = ok(CliRunner().invoke(main, ["plot", str(run), "--out", str(out)]))
    assert "plotted 4 steps" in result.stdout
    with Image.open(out / "loss.png") as img:
        assert img.format == "PNG" and img.width >= 400
    again = CliRunner().invoke(main, ["plot", str(run), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    missing = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert missing.exit_code == 2 and f"has no {METRICS_NAME}" in missing.output


def test_pretrain_config_replays_the_saved_run_and_options_override_it(xray, pretrained, tmp_path):
    run, argv, _, _ = pretrained
    saved = json.loads((run / "pretrain.json").read_text())
    base = [
        "pretrain",
        "--config",
        str(run / "pretrain.json"),
        "--data",
        str(xray / "cache"),
        "--device",
        "cpu",
    ]
    ok(CliRunner().invoke(main, [*base, "--out", str(tmp_path / "same")]))
    replay = json.loads((tmp_path / "same" / "pretrain.json").read_text())
    for key in ("model", "pretrain", "modality", "samples"):
        assert replay[key] == saved[key], key
    assert replay["compute"]["threads"] == saved["compute"]["threads"]
    # A folder instead of the file, and an explicit option over the file's value.
    ok(
        CliRunner().invoke(
            main, [*base, "--config", str(run), "--epochs", "1", "--out", str(tmp_path / "one")]
        )
    )
    one = json.loads((tmp_path / "one" / "pretrain.json").read_text())
    assert one["pretrain"] == saved["pretrain"] | {"epochs": 1}
    assert one["losses"] == saved["losses"][:1]  # the first run had --epochs 1: the same numbers


@pytest.mark.parametrize(
    ("config", "message"),
    [("missing.json", "cannot read"), ("other.json", "is not a configuration pretrain saved")],
)
def test_a_config_that_is_not_a_saved_run_is_a_user_error(tmp_path, config, message):
    (tmp_path / "other.json").write_text(json.dumps({"format": "invcoss-continual/1", "config": {}}))
    result = CliRunner().invoke(
        main, ["pretrain", "--config", str(tmp_path / config), "--data", "d", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--config" in result.output and message in result.output


def test_tensorboard_without_the_package_is_a_user_error(xray, tmp_path, monkeypatch):
    from invcoss import runlog

    monkeypatch.setattr(runlog, "tensorboard_available", lambda: False)  # as on a machine without it
    result = CliRunner().invoke(
        main, ["pretrain", "--data", str(xray / "cache"), "--out", str(tmp_path / "r"), "--tensorboard"]
    )
    assert (
        result.exit_code == 2
        and "--tensorboard" in result.output
        and "pip install tensorboard" in result.output
    )
    assert not (tmp_path / "r" / "model.safetensors").exists()


@pytest.mark.skipif(not tensorboard_available(), reason="needs the tensorboard package (the dev extra)")
def test_tensorboard_writes_event_files(xray, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["pretrain", "--data", str(xray / "cache"), "--out", str(tmp_path / "r"), "--epochs", "1",
            "--batch-size", "2", "--threads", "1", "--device", "cpu", "--tensorboard"]  # fmt: skip
    ok(CliRunner().invoke(main, argv))
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # Read back as TensorBoard reads it: the same scalars as metrics.jsonl's step lines, step by step.
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    steps = [m for m in read_metrics(tmp_path / "r") if m["event"] == "step"]
    assert steps
    assert {"step/mae", "step/lr", "epoch/mae"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("step/mae")
    assert [e.step for e in logged] == [m["step"] for m in steps]
    assert [e.value for e in logged] == pytest.approx([m["losses"]["mae"] for m in steps], rel=1e-6)


@pytest.mark.slow  # two inversions of the packaged model, a few seconds
def test_invert_logs_steps_and_batches_and_replays_its_manifest(tmp_path):
    argv = ["invert", "--modality", "xray", "--steps", "1", "--warmup-steps", "2", "--batch-size", "4",
            "--num-samples", "8", "--threads", "1", "--device", "cpu"]  # fmt: skip
    ok(CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "a")]))
    records = lines(tmp_path / "a")
    steps = [r for r in records if r["event"] == "step"]
    assert [(r["batch"], r["step"]) for r in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert [r["batch"] for r in records if r["event"] == "batch"] == [1, 2]
    assert set(steps[0]["losses"]) == {"task", "norm", "img", "rep", "total"} and steps[0]["lr"] > 0
    saved = json.loads((tmp_path / "a" / "manifest.json").read_text())
    replay = ["invert", "--config", str(tmp_path / "a" / "manifest.json"), "--device", "cpu"]
    ok(CliRunner().invoke(main, [*replay, "--set", "alpha_rep=0.5", "--out", str(tmp_path / "b")]))
    again = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert again["identity"]["config"] == saved["identity"]["config"] | {"alpha_rep": 0.5}
    for key in ("num_samples", "model", "stats_sha256"):
        assert again["identity"][key] == saved["identity"][key], key
    assert again["compute"]["threads"] == 1 and again["sample_format"] == saved["sample_format"]


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    runner = CliRunner()
    for m, size, count in (("xray", "48x48", 4), ("ct", "24x48x48", 1)):
        ok(runner.invoke(main, ["phantoms", "--modality", m, "--count", str(count), "--size", size,
                                "--out", str(root / m)]))  # fmt: skip
    data = f"xray={root / 'xray'},ct={root / 'ct'}"
    argv = ["continual", "--order", "xray,ct", "--method", "invcoss", "--out", str(root / "run"), "--epochs", "1",
            "--batch-size", "2", "--threads", "1", "--img-size-2d", "32x32", "--img-size-3d", "16x32x32",
            "--inversion-steps", "1", "--inversion-warmup-steps", "1", "--inversion-batch-size", "2",
            "--data", data, "--device", "cpu"]  # fmt: skip
    ok(runner.invoke(main, argv))
    return root, data


def test_continual_logs_training_and_inversion_steps_per_stage(continual_run):
    run = continual_run[0] / "run"
    records = lines(run)
    train = {(r["stage"], r["modality"]) for r in records if r["event"] == "step" and r["phase"] == "train"}
    invert = [r for r in records if r["event"] == "step" and r["phase"] == "invert"]
    assert train == {(1, "xray"), (2, "ct")}
    assert invert and {r["stage"] for r in invert} == {2} and all(r["source"] == "xray" for r in invert)
    assert [r["modality"] for r in records if r["event"] == "stage"] == ["xray", "ct"]


def test_storage_and_evaluate_json_and_the_retention_plot(continual_run, tmp_path):
    root, data = continual_run
    run = root / "run"
    storage = json.loads(ok(CliRunner().invoke(main, ["storage", str(run), "--json"])).stdout)
    assert storage["method"] == "invcoss" and [s["modality"] for s in storage["stages"]] == ["xray", "ct"]
    assert storage["replay_bytes"] == sum(s["replay_bytes"] for s in storage["stages"]) > 0
    assert storage["stages"][0]["kept_after"] == "statistics"
    argv = [
        "evaluate",
        "--checkpoints",
        str(run),
        "--data",
        data,
        "--threads",
        "1",
        "--device",
        "cpu",
        "--json",
    ]
    scores = json.loads(ok(CliRunner().invoke(main, argv)).stdout)
    assert [(r["stage"], r["modality"]) for r in scores["rows"]] == [(1, "xray"), (2, "xray"), (2, "ct")]
    first = [r for r in scores["rows"] if r["modality"] == "xray"]
    assert first[1]["forgetting"] == pytest.approx(first[1]["loss"] - first[0]["loss"], abs=1e-6)
    assert scores["mean_forgetting"]["forgetting"] == pytest.approx(first[1]["forgetting"])
    assert scores["order"] == ["xray", "ct"] and scores["files"]["json"].endswith("retention.json")
    result = ok(CliRunner().invoke(main, ["plot", str(run), "--out", str(tmp_path)]))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["inversion_stage2_ct.png", "loss_stage1_xray.png", "loss_stage2_ct.png", "retention.png"]
    assert "4 pictures" in result.stdout


def test_continual_config_replays_the_saved_configuration(continual_run):
    root, data = continual_run
    saved = json.loads((root / "run" / "continual.json").read_text())
    argv = ["continual", "--config", str(root / "run"), "--data", data, "--out", str(root / "again"),
            "--epochs", "2", "--device", "cpu"]  # fmt: skip
    ok(CliRunner().invoke(main, argv))
    again = json.loads((root / "again" / "continual.json").read_text())
    assert again["config"] == saved["config"] | {"epochs": 2}
    assert again["compute"]["threads"] == saved["compute"]["threads"]


def test_tensorboard_scalars_are_tagged_per_method_modality_and_loss(tmp_path, monkeypatch):
    """The scalars MetricsLog hands to TensorBoard's SummaryWriter (a stand-in records them)."""
    import sys
    import types

    from invcoss import runlog

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def add_scalar(self, tag, value, step, walltime=None):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setattr(runlog, "tensorboard_available", lambda: True)
    with runlog.MetricsLog(tmp_path, tensorboard=True) as log:
        log.write("step", step=7, method="er", modality="ct", lr=0.5, losses={"mae": 1.5, "distill": None})
    assert calls == [
        ("open", str(tmp_path / "tensorboard")),
        ("er/ct/step/mae", 1.5, 7),
        ("er/ct/step/lr", 0.5, 7),
        ("close",),
    ]


def test_only_rank_0_writes_the_run_log(tmp_path, monkeypatch):
    import torch.distributed as dist

    from invcoss.runlog import MetricsLog

    log = MetricsLog(tmp_path / "r1")  # made before the process group exists, as the CLI does
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with log:
        log.write("step", step=1, losses={"mae": 1.0})
    assert not (tmp_path / "r1").exists()
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with MetricsLog(tmp_path / "r0") as log:
        log.write("step", step=1, losses={"mae": 1.0})
    assert len(lines(tmp_path / "r0")) == 1

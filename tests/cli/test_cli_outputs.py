"""No command deletes or replaces a file it did not make in this run without being asked.

Each writer refuses an existing output with exit 2, naming the path and the flag that replaces it
(--overwrite) or continues it (--resume), before any long work; the file is left as it was.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from invcoss.cli import main
from invcoss.continual.config import ContinualConfig
from invcoss.continual.layout import RUN_FORMAT, RUN_NAME
from invcoss.models import create_model
from invcoss.pretrain import PretrainConfig, pretrain

MINE = b"a file of the user's"


@pytest.fixture
def runner():
    return CliRunner()


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_phantoms_keep_their_own_identical_files_and_refuse_other_bytes(runner, tmp_path):
    out = tmp_path / "scans"
    argv = ["phantoms", "--modality", "xray", "--count", "2", "--size", "24x24", "--out", str(out)]
    assert runner.invoke(main, argv).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    r = runner.invoke(main, argv)  # the same phantoms again: the same bytes, nothing refused
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    r = runner.invoke(main, [*argv, "--seed", "1"])  # other phantoms under the same names
    refused(r, str(out / "xray_0000.png"), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    (out / "xray_0001.png").write_bytes(MINE)
    refused(runner.invoke(main, argv), str(out / "xray_0001.png"), "--overwrite")
    assert (out / "xray_0001.png").read_bytes() == MINE
    r = runner.invoke(main, [*argv, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def _tiny_pretrain(out, **kwargs):
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32)
    data = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    config = PretrainConfig(epochs=1, batch_size=4, warmup_epochs=1)
    return pretrain(model, data, out, config, modality="xray", device="cpu", **kwargs)


def test_pretrain_never_replaces_a_model_it_cannot_resume(runner, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(MINE)  # e.g. a finished run whose training state was removed
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"already holds a model .*model.safetensors.*--overwrite"):
            _tiny_pretrain(out, resume=resume)
    assert (out / "model.safetensors").read_bytes() == MINE
    scans = tmp_path / "scans"
    assert runner.invoke(main, ["phantoms", "--modality", "xray", "--count", "2", "--size", "24x24",
                                "--out", str(scans)]).exit_code == 0  # fmt: skip
    argv = ["pretrain", "--modality", "xray", "--data", str(scans), "--epochs", "1", "--out", str(out)]
    refused(runner.invoke(main, argv), str(out), "model.safetensors", "--overwrite")
    refused(runner.invoke(main, [*argv, "--resume"]), str(out), "--overwrite")
    assert (out / "model.safetensors").read_bytes() == MINE
    assert _tiny_pretrain(out, overwrite=True).epochs_run == 1
    assert (out / "model.safetensors").read_bytes() != MINE
    # Its own finished run: refused without --resume, continued (nothing to do) with it.
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        _tiny_pretrain(out)
    assert _tiny_pretrain(out, resume=True).epochs_run == 0


def test_continual_refuses_stage_folders_without_a_run(runner, tmp_path):
    out = tmp_path / "run"
    (out / "stage1_xray").mkdir(parents=True)
    (out / "stage1_xray" / "model.safetensors").write_bytes(MINE)
    scans = tmp_path / "scans"
    for resume in ([], ["--resume"]):
        r = runner.invoke(
            main,
            ["continual", "--order", "xray,pathology", "--method", "seq", "--out", str(out),
             "--data", f"xray={scans},pathology={scans}", *resume],
        )  # fmt: skip
        refused(r, str(out / "stage1_xray"), f"has no {RUN_NAME}", "use a new folder")
    assert sorted(p.name for p in out.iterdir()) == ["stage1_xray"]
    assert (out / "stage1_xray" / "model.safetensors").read_bytes() == MINE


def test_evaluate_keeps_earlier_tables_unless_overwrite(runner, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = ContinualConfig.from_profile("quick", method="seq", order=("xray", "pathology"))
    (run / RUN_NAME).write_text(json.dumps({"format": RUN_FORMAT, "config": config.to_dict()}))
    argv = ["evaluate", "--checkpoints", str(run), "--data", f"xray={tmp_path / 'none'}"]
    for out in (run / "eval", tmp_path / "tables"):  # the default folder, and --out
        out.mkdir()
        (out / "retention.json").write_bytes(MINE)
        where = [] if out == run / "eval" else ["--out", str(out)]
        refused(runner.invoke(main, [*argv, *where]), str(out / "retention.json"), "--overwrite")
        assert (out / "retention.json").read_bytes() == MINE
        # --overwrite lets it past the check, to the next error (no data there).
        refused(runner.invoke(main, [*argv, *where, "--overwrite"]), "does not exist")


def test_experiment_forgetting_keeps_earlier_tables_unless_resumed(runner, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "forgetting.md").write_bytes(MINE)
    r = runner.invoke(main, ["experiment", "forgetting", "--out", str(out), "--methods", "seq"])
    refused(r, str(out / "forgetting.md"), "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["forgetting.md"]
    assert (out / "forgetting.md").read_bytes() == MINE


def test_bench_keeps_an_existing_out_unless_overwrite(runner, tmp_path):
    out = tmp_path / "bench"
    (tmp_path / "bench.md").write_bytes(MINE)
    argv = ["bench", "--family", "tv", "--quick", "--reps", "1", "--out", str(out)]
    refused(runner.invoke(main, argv), str(tmp_path / "bench.md"), "--overwrite")
    assert (tmp_path / "bench.md").read_bytes() == MINE
    assert not (tmp_path / "bench.json").exists()


def test_inversion_step_script_keeps_an_existing_out_unless_overwrite(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "inversion_step.py"
    spec = importlib.util.spec_from_file_location("inversion_step", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.md"
    out.with_suffix(".json").write_bytes(MINE)
    with pytest.raises(SystemExit) as stop:  # before any timing
        module.main(["--out", str(out), "--steps", "1"])
    assert stop.value.code == 2
    assert f"{out.with_suffix('.json')} exists; pass --overwrite" in capsys.readouterr().err
    assert out.with_suffix(".json").read_bytes() == MINE and not out.exists()


def test_asset_build_keeps_models_in_another_out_unless_overwrite(tmp_path, capsys):
    from invcoss.assets import build

    (tmp_path / "xray").mkdir()
    (tmp_path / "xray" / "model.safetensors").write_bytes(MINE)
    with pytest.raises(SystemExit) as stop:  # before any phantom is written or step trained
        build.main(
            ["--modality", "xray", "--epochs", "1", "--out", str(tmp_path), "--work", str(tmp_path / "w")]
        )
    assert stop.value.code == 2
    assert f"{tmp_path / 'xray' / 'model.safetensors'} exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "xray" / "model.safetensors").read_bytes() == MINE and not (tmp_path / "w").exists()

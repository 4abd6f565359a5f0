"""The options every command shares (invcoss/cli/options.py): one validation, one behaviour."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from invcoss.cli import main
from invcoss.continual.eval import RetentionRow, RetentionTable


def _commands_with(option: str) -> dict[str, list[str]]:
    """``{command path: its argv prefix}`` of every command that declares ``option``."""
    found = {}
    for name, command in main.commands.items():
        subs = getattr(command, "commands", None)
        for sub_name, sub in (subs or {name: command}).items():
            path = [name, sub_name] if subs else [name]
            if any(option in p.opts for p in sub.params):
                found[" ".join(path)] = path
    return found


def test_device_is_declared_by_every_command_that_computes():
    assert set(_commands_with("--device")) == {
        "invert", "pretrain", "stats", "continual", "evaluate", "experiment forgetting", "bench", "audit",
    }  # fmt: skip


def test_threads_is_declared_by_every_command_that_computes():
    assert set(_commands_with("--threads")) == {
        "phantoms", "preprocess", "pretrain", "stats", "invert", "continual", "evaluate",
        "experiment forgetting", "bench", "audit",
    }  # fmt: skip


def test_experiment_forgetting_runs_at_one_thread_unless_told(tmp_path):
    threads = torch.get_num_threads()
    try:
        for argv, expected in (([], 1), (["--threads", "3"], 3)):
            torch.set_num_threads(2)
            r = CliRunner().invoke(
                main, ["experiment", "forgetting", "--out", str(tmp_path / "x"), "--methods", "sgd", *argv]
            )
            assert r.exit_code == 2 and "methods must be" in r.output  # stops before any work
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("command", sorted(_commands_with("--device")))
def test_every_device_option_rejects_an_unknown_device_the_same_way(command):
    argv = _commands_with("--device")[command]
    result = CliRunner().invoke(main, [*argv, "--device", "tpu9"])
    assert result.exit_code == 2, result.output
    assert "--device expects cpu, cuda or cuda:N, got 'tpu9'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["invert", "bench", "evaluate"])
def test_cuda_where_there_is_none_is_a_user_error(command):
    result = CliRunner().invoke(main, [*_commands_with("--device")[command], "--device", "cuda"])
    assert result.exit_code == 2 and "--device cuda: torch sees no CUDA device here" in result.output


def test_verbose_prints_the_resolved_device_and_threads(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(
            main,
            ["-v", "invert", "--modality", "ct", "--device", "cpu", "--threads", "1",
             "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        )  # fmt: skip
        assert torch.get_num_threads() == 1  # --threads reached torch before the command ran
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 2  # the missing checkpoint
    assert "INFO invcoss.cli.invert: device cpu" in result.stderr
    assert "INFO invcoss.cli.invert: 1 CPU thread(s)" in result.stderr
    quiet = CliRunner().invoke(main, ["invert", "--modality", "ct", "--device", "cpu",
                                      "--checkpoint", str(tmp_path / "missing")])  # fmt: skip
    assert "device cpu" not in quiet.output


def test_modality_aliases_reach_the_command_canonical(tmp_path):
    result = CliRunner().invoke(
        main, ["phantoms", "--modality", "PATH", "--count", "1", "--out", str(tmp_path), "--size", "64x64"]
    )
    assert result.exit_code == 0, result.output
    assert "1 pathology phantoms" in result.output and any(Path(tmp_path).iterdir())


def test_mean_forgetting_leaves_out_the_last_stage_modality():
    def row(stage, stage_modality, modality, forgetting):
        return RetentionRow(stage, stage_modality, modality, 1.0, 1.0, forgetting)

    table = RetentionTable(
        Path("run"), "er", ("ct", "mri", "xray"),
        [row(1, "ct", "ct", 0.0), row(2, "mri", "ct", 0.2), row(2, "mri", "mri", 0.0),
         row(3, "xray", "ct", 0.3), row(3, "xray", "mri", 0.1), row(3, "xray", "xray", 0.0)],
    )  # fmt: skip
    assert table.mean_forgetting() == pytest.approx(0.2)  # ct 0.3 and mri 0.1 at stage 3
    assert RetentionTable(Path("run"), "er", ("ct",), [row(1, "ct", "ct", 0.0)]).mean_forgetting() is None


def test_an_output_file_is_never_replaced_unasked(tmp_path):
    from invcoss.cli.options import UserError, check_output_file

    out = tmp_path / "a" / "b" / "stats.safetensors"
    check_output_file(out, overwrite=False)  # creates the folder
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []
    out.write_bytes(b"an earlier result")
    with pytest.raises(UserError, match="--out .*stats.safetensors exists; pass --overwrite"):
        check_output_file(out, overwrite=False)
    check_output_file(out, overwrite=True)
    assert out.read_bytes() == b"an earlier result"  # checking writes nothing
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(out.parent, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to"):
        check_output_file(blocker / "stats.safetensors", overwrite=False)


def test_output_folders_are_checked_before_the_work(tmp_path):
    from invcoss.cli.options import UserError, check_output_folder

    check_output_folder(tmp_path / "x" / "y")
    assert (tmp_path / "x" / "y").is_dir() and list((tmp_path / "x" / "y").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--out .*file is a file; give a folder"):
        check_output_folder(blocker)
    with pytest.raises(UserError, match="--cache .*cannot write there"):
        check_output_folder(blocker / "below", option="--cache")
    # The commands that write a folder refuse it with exit 2 before any work.
    for args in (
        ["phantoms", "--modality", "ct", "--count", "1", "--out", str(blocker)],
        ["preprocess", "--modality", "ct", "--data", str(tmp_path), "--out", str(blocker / "c")],
        ["pretrain", "--data", str(tmp_path), "--modality", "ct", "--out", str(blocker / "k")],
    ):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "--out" in r.output and str(blocker) in r.output, (args, r.output)

"""How the CLI talks: -v/-q on the invcoss logger, INVCOSS_ environment variables, --preset
choices, progress bars only on a terminal, and --json documents that hold nothing else."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from invcoss import ops
from invcoss.cli import main
from invcoss.cli.options import PRESETS
from invcoss.models.mae_config import list_presets


@pytest.fixture(autouse=True)
def _restore_logging():
    logger = logging.getLogger("invcoss")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def _phantoms(out, *extra, env=None):
    argv = ["phantoms", "--modality", "xray", "--size", "24x24", "--out", str(out), *extra]
    return CliRunner().invoke(main, argv, env=env)


def test_preset_choices_are_the_library_presets_and_listed_in_help():
    assert PRESETS == tuple(list_presets())
    for command in ("pretrain", "continual"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert "[vit_base|vit_nano|vit_small|vit_tiny]" in result.output, command
    result = CliRunner().invoke(main, ["pretrain", "--preset", "vit_huge", "--data", "d", "--out", "o"])
    assert result.exit_code == 2 and "'vit_huge' is not one of" in result.output


def test_an_environment_variable_sets_an_option_and_the_command_line_wins(tmp_path):
    result = _phantoms(tmp_path / "a", env={"INVCOSS_PHANTOMS_COUNT": "3"})
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "a").iterdir())) == 3
    result = _phantoms(tmp_path / "b", "--count", "2", env={"INVCOSS_PHANTOMS_COUNT": "3"})
    assert result.exit_code == 0 and len(list((tmp_path / "b").iterdir())) == 2
    bad = _phantoms(tmp_path / "c", env={"INVCOSS_PHANTOMS_COUNT": "zero"})
    assert bad.exit_code == 2 and "--count" in bad.output and "zero" in bad.output
    assert "INVCOSS_PHANTOMS_COUNT" in CliRunner().invoke(main, ["phantoms", "--help"]).output


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG), (["-q"], logging.ERROR)],
)
def test_verbosity_sets_the_invcoss_logger(flags, level):
    result = CliRunner().invoke(main, [*flags, "info", "--json"])
    assert result.exit_code == 0, result.output
    assert logging.getLogger("invcoss").level == level


def test_log_records_go_to_stderr_and_quiet_drops_warnings():
    from invcoss.cli.output import configure_logging

    runner = CliRunner()
    for flags, shown in (([], True), (["-q"], False)):

        @main.command(f"_warn{len(flags)}")
        def _warn() -> None:
            logging.getLogger("invcoss.models.mae").warning("freshly initialised: decoder")

        try:
            result = runner.invoke(main, [*flags, f"_warn{len(flags)}"])
        finally:
            main.commands.pop(f"_warn{len(flags)}")
        assert result.exit_code == 0
        assert result.stdout == ""
        assert ("WARNING invcoss.models.mae: freshly initialised: decoder" in result.stderr) is shown
    configure_logging(0)


def test_progress_bars_leave_nothing_when_stderr_is_not_a_terminal(tmp_path):
    result = _phantoms(tmp_path / "p", "--count", "2")
    assert result.exit_code == 0
    assert result.stderr == ""  # no bar frames, not even the blank line a finished bar leaves


def test_info_json_is_the_whole_stdout_with_snake_case_keys():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["torch"] == torch.__version__
    assert data["extension"]["built"] is True and "cpu_kernels" in data["extension"]
    assert {n for n, b in data["backends"].items() if b["available"]} == set(ops.available_backends())
    assert data["default_backend"]["cpu"] == ops.default_backend(torch.device("cpu"))
    assert "cuda_torch_build" in data and "devices" in data

    def walk(d):
        for k, v in d.items():
            assert k == k.lower() and " " not in k and "(" not in k, k
            if isinstance(v, dict):
                walk(v)

    walk(data)


def test_bench_json_holds_the_rows_and_nothing_else(monkeypatch):
    from invcoss import benchmark as bm
    from invcoss.benchmark.suite import Row

    row = Row(
        case="tv[2x3x8x8]", family="tv", shape="2x3x8x8", dtype="float32", mode="fwd", provider="cpu",
        device="cpu", median_ms=0.5, p20_ms=0.4, p80_ms=0.6, nbytes=1536.0, gbps=3.0, ratio_eager=2.0,
    )  # fmt: skip
    monkeypatch.setattr(bm, "run_suite", lambda dev, cases, reps, progress: [row])
    result = CliRunner().invoke(main, ["bench", "--family", "tv", "--quick", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["inversion"] == []
    assert data["rows"][0]["ratio_eager"] == 2.0 and data["rows"][0]["provider"] == "cpu"
    assert data["compute"]["threads"] == 1

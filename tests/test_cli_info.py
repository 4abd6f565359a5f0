"""invcoss-cli info and the argument errors of invcoss-cli bench."""

import json

from click.testing import CliRunner

from invcoss.cli import main


def test_info_lists_versions_and_every_backend():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    for word in ("torch", "triton", "extension invcoss._C", "backends", "cpu", "cuda"):
        assert word in result.output
    assert "backends available" in result.output.splitlines()[-1]


def test_version_and_help():
    runner = CliRunner()
    assert "invcoss-cli, version" in runner.invoke(main, ["--version"]).output
    assert runner.invoke(main, ["-h"]).exit_code == 0


def test_bench_rejects_unknown_family_with_exit_code_2():
    result = CliRunner().invoke(main, ["bench", "--family", "softmax"])
    assert result.exit_code == 2
    assert "--family expects some of" in result.output and "softmax" in result.output
    assert "Traceback" not in result.output


def test_bench_inversion_step_table_and_files(tmp_path):
    result = CliRunner().invoke(
        main, ["bench", "--family", "inversion", "--steps", "1", "--out", str(tmp_path / "inv")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "### inversion step" in result.output
        and "| 2d-reduced | vit_nano | 8 | 112x112 | torch |" in result.output
    )
    assert "0 op rows and" in result.output.splitlines()[-1]
    payload = json.loads((tmp_path / "inv.json").read_text())
    assert payload["rows"] == [] and {r["profile"] for r in payload["inversion"]} == {
        "3d-reduced",
        "2d-reduced",
    }
    assert (tmp_path / "inv.md").read_text().startswith("### inversion step")

"""invcoss-cli info and --version against the library, and the argument errors of invcoss-cli bench."""

import json
import re
from importlib.metadata import version

import pytest
import torch
from click.testing import CliRunner

from invcoss import ops
from invcoss.cli import main


def test_info_reports_the_backends_that_run_here():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    reported, default = {}, None
    for line in result.output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 3 and cells[0] in ops.BACKEND_NAMES:  # backend | available | why (wrapped)
            reported[cells[0]] = cells[1]
        if len(cells) == 2 and cells[0] == "default backend (cpu tensors)":
            default = cells[1]
    available = ops.available_backends()
    assert reported == {name: "yes" if name in available else "no" for name in ops.BACKEND_NAMES}
    assert default == ops.default_backend(torch.device("cpu"))
    n = len(ops.BACKEND_NAMES)
    assert (
        result.output.splitlines()[-1]
        == f"invcoss {version('invcoss')}: {len(available)}/{n} backends available"
    )


def test_version_is_the_distribution_version_and_help_exits_0():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output == f"invcoss-cli, version {version('invcoss')}\n"
    result = runner.invoke(main, ["-h"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_bench_rejects_unknown_family_with_exit_code_2():
    result = CliRunner().invoke(main, ["bench", "--family", "softmax"])
    assert result.exit_code == 2
    assert "--family expects some of" in result.output and "softmax" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow  # the reduced inversion profiles, the smallest the CLI offers
def test_bench_inversion_step_table_and_files(tmp_path):
    result = CliRunner().invoke(
        main, ["bench", "--family", "inversion", "--steps", "1", "--out", str(tmp_path / "inv")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "### inversion step" in result.output
        and "| 2d-reduced | vit_nano | 8 | 112x112 | reference | torch |" in result.output
    )
    assert "0 op rows and" in result.output.splitlines()[-1]
    payload = json.loads((tmp_path / "inv.json").read_text())
    assert payload["rows"] == [] and {r["profile"] for r in payload["inversion"]} == {
        "3d-reduced",
        "2d-reduced",
    }
    assert (tmp_path / "inv.md").read_text().startswith("### inversion step")


def test_info_kernels_prints_the_triton_and_cuda_tables(monkeypatch):
    from invcoss.kernels import aot, sass

    from invcoss.cli import info as info_mod

    monkeypatch.setattr(
        aot, "kernel_table", lambda: [aot.KernelRow("tv_fwd", "fp32", "W=512 w4 s2", 40, 0, 0, 4, 0)]
    )
    monkeypatch.setattr(
        sass, "extension_table", lambda: [sass.CudaKernelRow("col_kernel", "fp32", 38, 0, 0, 6, 0, 0)]
    )
    data = info_mod.collect_info()
    data["extension"]["cuda kernels"] = True
    monkeypatch.setattr(info_mod, "collect_info", lambda: data)
    result = CliRunner().invoke(main, ["info", "--kernels"])
    assert result.exit_code == 0, result.output
    assert "Triton kernels compiled for sm_90 (1 configs)" in result.output and "tv_fwd" in result.output
    assert (
        "CUDA kernels of invcoss._C for sm_90 (1 instantiations)" in result.output
        and "col_kernel" in result.output
    )

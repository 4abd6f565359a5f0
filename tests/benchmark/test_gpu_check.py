"""The GPU check (benchmarks/gpu_check.sh), rehearsed on this CPU so it cannot rot before a GPU comes.

The rehearsal (about two minutes on two cores) runs in ``make test-slow``, which CI runs on every
change: it is what keeps the script working between the rare GPU runs.

``--rehearse`` runs every step's mechanics here: the warm-up's parallel jobs, the device tests on
CPU tensors (Triton through the interpreter, the extension's cpu backend in place of cuda), the
roofs, the sweep in fp32 and bf16, the torch.compile rows, the inversion step and the report, each
appending JSON-lines records. The other tests check the loud failures and the rendering of a
folder left by a killed run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invcoss.benchmark import check, records, report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
EXPECTED_FILES = {"gpu_check.log", "report.md", *records.FILES.values()}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "JOBS": "2"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    return proc, out


@pytest.mark.slow  # the whole rehearsal: about two minutes
def test_rehearsal_passes_every_step(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: 0 step(s) failed" in proc.stdout
    # A lent machine gives back at most eight files: the check writes seven, and nothing else.
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    exits = {r["name"]: r["rc"] for r in records.records_of(out, "meta", step="exit")}
    assert exits == dict.fromkeys(
        ("install", "env", "warm", "tests", "roofs", "sweep", "compile", "inversion", "report"), 0
    )


@pytest.mark.slow  # the whole rehearsal: about two minutes
def test_rehearsal_records_every_row(rehearsal):
    _, out = rehearsal
    tests = records.records_of(out, "tests", step="tests")
    assert len(tests) > 20 and {r["outcome"] for r in tests} <= {"passed", "skipped"}
    assert any(
        r["test"].endswith("[triton]") or "-triton]" in r["test"] for r in tests if r["outcome"] == "passed"
    )
    warm = [r for r in records.records_of(out, "tests", step="warm") if "job" in r]
    assert warm and all(r["rc"] == 0 and r["ok"] for r in warm)
    roofs = {r["roof"]: r["value"] for r in records.read_records(out / "roofs.jsonl")}
    assert set(roofs) == {"copy_gbps", "bf16_tflops"}
    rate = roofs["bf16_tflops"]
    rows = records.read_records(out / "bench.jsonl")
    measured = {(r["case"], r["mode"], r["dtype"], r["provider"]) for r in rows}
    for case in check.check_cases(rehearse=True):
        for mode in case.modes:
            for dtype in check.DTYPES:
                for provider in ("eager", "cpu", "triton"):
                    assert (case.name, mode, dtype, provider) in measured
    first = check.compile_cases(rehearse=True)[0]
    assert {(r["case"], r["provider"]) for r in rows if r["step"] == "compile"} == {(first.name, "compile")}
    for r in rows:  # the minimum traffic of the row, and the rate it implies
        assert r["nbytes"] and abs(r["gbps"] - r["nbytes"] / r["median_ms"] / 1e6) < 1e-6 * r["gbps"]
    inversion = records.read_records(out / "inversion.jsonl")
    assert [(r["backend"], r["ops"]) for r in inversion] == [
        ("reference", "torch"),
        ("fused", "cpu"),
        ("default", "cpu"),
        ("triton", "triton"),
    ]
    for r in inversion:  # samples/h from the step time; MFU against the roofs step's matmul rate
        assert r["samples_per_h"] > 0 and r["compile_s"] > 0 and r["flops"] > 0
        assert abs(r["mfu"] - r["tflops"] / rate) < 1e-9 * r["mfu"]


@pytest.mark.slow  # the whole rehearsal: about two minutes
def test_report_renders_again_from_what_came_back(rehearsal, tmp_path):
    _, out = rehearsal
    text = (out / "report.md").read_text()
    assert "| tests | " in text and "### Ops" in text and "### Inversion step" in text
    assert "% copy | % bf16 |" in text
    again = tmp_path / "again.md"
    assert report.main([str(out), "--out", str(again)]) == 0
    # The same report, now with the report step's own exit line (written after the first render).
    lines = again.read_text().splitlines(keepends=True)
    assert [x for x in lines if not x.startswith("| report | 0 |")] == text.splitlines(keepends=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    # An existing --out is kept unless --overwrite (the folder's own report.md is re-rendered).
    again.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        report.main([str(out), "--out", str(again), "--readme", str(readme)])
    assert stop.value.code == 2 and again.read_text() == "mine" and "old" in readme.read_text()
    report.main([str(out), "--out", str(again), "--readme", str(readme), "--overwrite"])
    assert again.read_text() != "mine"
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("outro\n") and "old" not in body
    assert "#### GPU check: CPU rehearsal" in body


def test_report_of_a_killed_run(tmp_path):
    # A run killed inside the sweep: one complete row, the next cut off mid-line, no inversion.
    records.append_record(tmp_path / "roofs.jsonl", {"roof": "copy_gbps", "value": 4000.0})
    row = {
        "step": "sweep", "case": "tv[2x3]", "family": "tv", "shape": "2x3", "provider": "eager",
        "mode": "fwd", "device": "cuda", "dtype": "float32", "median_ms": 1.0, "p20_ms": 1.0,
        "p80_ms": 1.0, "gbps": 2000.0, "tflops": None, "nbytes": 2e9, "flops": None,
    }  # fmt: skip
    records.append_record(tmp_path / "bench.jsonl", row)
    with open(tmp_path / "bench.jsonl", "a") as f:
        f.write(json.dumps(row)[:40])
    assert len(records.read_records(tmp_path / "bench.jsonl")) == 1
    text = report.render(tmp_path)
    assert "No records for: tests, inversion." in text
    assert "| tv[2x3] | fwd | float32 | eager | 1.000 | 2000.0 |" in text
    assert "bf16 matmul" not in text  # one roof only: no percentages invented


@pytest.mark.slow
def test_concurrent_appends_keep_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    code = (
        "import sys; from invcoss.benchmark.records import append_record\n"
        "for i in range(200): append_record(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'x' * 300})"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)]) for w in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    got = records.read_records(path)
    assert len(got) == 600 and len(path.read_text().splitlines()) == 600


def _pytest(*args, env=None):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "invcoss.benchmark.pytest_records",
    ]
    return subprocess.run(
        [*cmd, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without the cuda backend")
def test_a_missing_backend_stops_the_tests_with_one_line(tmp_path):
    proc = _pytest(
        "--require-backends", "triton,cuda", "--records", str(tmp_path / "t.jsonl"), *check.DEVICE_TESTS
    )
    assert proc.returncode == 3
    line = [s for s in proc.stdout.splitlines() + proc.stderr.splitlines() if "gpu_check: FAILED" in s]
    assert len(line) == 1 and "backend(s) missing: cuda:" in line[0]
    assert records.read_records(tmp_path / "t.jsonl")[0]["outcome"] == "error"


@pytest.mark.slow
def test_a_step_that_ran_no_test_fails(tmp_path):
    # Every test skipped (as the device tests would be if their device went missing): no pass.
    (tmp_path / "test_skipped.py").write_text(
        "import pytest\n\n\n@pytest.mark.parametrize('i', [1, 2])\ndef test_x(i):\n    pytest.skip('no device')\n"
    )
    proc = _pytest(
        "--require-tests", "--records", str(tmp_path / "t.jsonl"), str(tmp_path / "test_skipped.py")
    )
    assert proc.returncode == 1
    assert "gpu_check: FAILED: step tests ran no test" in proc.stdout
    got = records.read_records(tmp_path / "t.jsonl")
    assert len(got) == 2 and {r["outcome"] for r in got} == {"skipped"}


@pytest.mark.slow
def test_a_missing_backend_device_backend_is_a_failing_test_not_an_empty_set(tmp_path):
    # On CPU tensors with the Triton interpreter, the device tests ask for "triton" and "cpu"; with
    # the extension hidden, the cpu tests fail, naming the reason, instead of vanishing.
    env = {"INVCOSS_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1", "INVCOSS_DISABLE_EXTENSION": "1"}
    proc = _pytest(
        "-k",
        "test_tv_matches_reference and cpu",
        "--records",
        str(tmp_path / "t.jsonl"),
        *check.DEVICE_TESTS,
        env=env,
    )
    got = records.read_records(tmp_path / "t.jsonl")
    assert proc.returncode == 1 and got and all(r["outcome"] == "error" for r in got)
    assert "backend 'cpu' is missing on cpu" in got[0]["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_env_step_fails_loudly_without_the_device(tmp_path, capsys):
    assert check.main(["env", "--out", str(tmp_path)]) == 4
    assert "gpu_check: FAILED: torch sees no CUDA device" in capsys.readouterr().out
    assert records.read_records(tmp_path / "meta.jsonl")[0]["error"] == "no CUDA device"


def test_sweep_past_its_deadline_measures_nothing_and_fails(tmp_path, capsys):
    assert check.main(["sweep", "--rehearse", "--out", str(tmp_path), "--deadline", "0"]) == 1
    assert "gpu_check: FAILED: step sweep measured no row" in capsys.readouterr().out
    assert not (tmp_path / "bench.jsonl").exists()


@pytest.mark.slow
def test_the_check_needs_no_nibabel(tmp_path):
    # The device image has no nibabel: the steps must not import it (NIfTI I/O imports it lazily).
    code = (
        "import sys; sys.modules['nibabel'] = None\n"
        "from invcoss.benchmark import check, report\n"
        "assert check.main(['roofs', '--rehearse', '--out', sys.argv[1]]) == 0\n"
        "assert check.main(['inversion', '--rehearse', '--steps', '1', '--out', sys.argv[1]]) == 0\n"
        "assert report.main([sys.argv[1]]) == 0\n"
        "assert 'nibabel' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records.read_records(tmp_path / "inversion.jsonl")) == 4

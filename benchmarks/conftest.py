"""pytest-benchmark suites: every provider of every case, side by side in one run.

Each ``bench_<family>.py`` names its op family (``FAMILY``, a key of
:data:`invcoss.benchmark.FAMILIES`) and gets one test per case, mode and provider of that family in
the device's sweep (:func:`invcoss.benchmark.cases_for`), or one per inversion profile. A test first
checks that its provider computes the eager reference's value (:meth:`BenchRow.assert_matches_reference`),
then times it.

Options: ``--bench-device cpu|cuda`` (default cpu), ``--bench-quick`` (drops the paper-size cases
on CPU), ``--bench-rounds N``. (A time-limited GPU run uses benchmarks/gpu_check.sh, which
records each row as it is measured.) At the end of the session the rows, with their speed-ups against the
eager reference and torch.compile, are written to ``benchmarks/results/<machine>-<date>.{json,md}``
and printed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from invcoss import benchmark as bm

RESULTS = Path(__file__).parent / "results"
_ROWS: list[bm.Row] = []
_INVERSION_ROWS: list[dict] = []


@pytest.fixture
def inversion_rows() -> list[dict]:
    """Rows of :func:`invcoss.benchmark.time_inversion`, written with the op tables at the end."""
    return _INVERSION_ROWS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("invcoss benchmarks")
    group.addoption("--bench-device", default="cpu", help="cpu or cuda")
    group.addoption("--bench-quick", action="store_true", help="skip the paper-size cases on CPU")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per row")
    group.addoption("--bench-results", default=str(RESULTS), help="folder for the JSON and Markdown tables")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    family = getattr(metafunc.module, "FAMILY", None)
    if family is None:
        return
    device = torch.device(metafunc.config.getoption("--bench-device"))
    if "bench_case" in metafunc.fixturenames:
        params, ids = [], []
        for case in bm.cases_for(device, quick=metafunc.config.getoption("--bench-quick")):
            if case.family != family:
                continue
            for mode in case.modes:
                for provider in bm.providers_for(device):
                    params.append((case, mode, provider))
                    ids.append(f"{case.name}-{mode}-{provider}")
        metafunc.parametrize("bench_case", params, ids=ids)
    if "profile_name" in metafunc.fixturenames:
        metafunc.parametrize("profile_name", bm.FAMILIES[family].profiles_for(device))


DTYPE = torch.float32
# One case at a time: its inputs (shared by every provider and mode) and the reference's value per mode.
_CURRENT: dict = {"key": None, "inputs": None, "reference": {}}


def _case_inputs(case: bm.Case, device: torch.device) -> dict:
    key = (case, str(device))
    if _CURRENT["key"] != key:
        _CURRENT.update(key=None, inputs=None, reference={})  # drop the previous case's tensors first
        _CURRENT.update(key=key, inputs=bm.make_inputs(case, device, DTYPE))
    return _CURRENT["inputs"]


class BenchRow:
    """One (case, mode, provider) of a suite: checked against the eager reference, then timed."""

    def __init__(self, case: bm.Case, mode: str, provider: str, device: torch.device, rounds: int, benchmark):
        self.case, self.mode, self.provider, self.device = case, mode, provider, device
        self.rounds, self.benchmark = rounds, benchmark
        self.inputs = _case_inputs(case, device)
        self.fn = bm.build(case, provider, mode, self.inputs)

    def assert_matches_reference(self) -> None:
        """The provider's first call computes the eager reference's value (within the harness's
        tolerance for the dtype); the eager row's first call is that value."""
        value = self.fn()
        references = _CURRENT["reference"]
        if self.mode not in references:
            is_reference = self.provider == "eager"
            references[self.mode] = (
                value if is_reference else bm.build(self.case, "eager", self.mode, self.inputs)()
            )
        bm.assert_agrees(value, references[self.mode], DTYPE, f"{self.case.name} {self.mode} {self.provider}")

    def time(self) -> bm.Row:
        """Time the provider with pytest-benchmark and record its row for the session's tables."""
        fn = self.fn
        if self.device.type == "cuda":

            def fn() -> None:
                self.fn()
                torch.cuda.synchronize()

        warmup = 2 if self.provider == "compile" else 1
        self.benchmark.pedantic(fn, rounds=self.rounds, iterations=1, warmup_rounds=warmup)
        times_ms = [t * 1e3 for t in self.benchmark.stats.stats.data]
        row = bm.make_row(self.case, self.provider, self.mode, self.device, DTYPE, times_ms)
        self.benchmark.extra_info.update(
            {k: v for k, v in (("gbps", row.gbps), ("tflops", row.tflops)) if v is not None}
        )
        self.benchmark.extra_info.update(case=row.case, provider=self.provider, mode=self.mode)
        _ROWS.append(row)
        return row


@pytest.fixture
def bench_row(bench_case, benchmark, request) -> BenchRow:
    """The :class:`BenchRow` of this test's (case, mode, provider)."""
    device = torch.device(request.config.getoption("--bench-device"))
    return BenchRow(*bench_case, device, request.config.getoption("--bench-rounds"), benchmark)


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    ratios = {(r.case, r.mode, r.provider): r for r in bm.add_ratios(list(_ROWS))}
    for entry in output_json.get("benchmarks", []):
        info = entry.get("extra_info", {})
        row = ratios.get((info.get("case"), info.get("mode"), info.get("provider")))
        if row is not None:
            info["ratio_eager"], info["ratio_compile"] = row.ratio_eager, row.ratio_compile


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not (_ROWS or _INVERSION_ROWS):
        return
    rows = bm.add_ratios(list(_ROWS))
    device = session.config.getoption("--bench-device")
    machine = _machine_name(device)
    stamp = time.strftime("%Y-%m-%d")
    results = Path(session.config.getoption("--bench-results"))
    results.mkdir(parents=True, exist_ok=True)
    base = results / f"{machine}-{device}-{stamp}"
    # On a GPU the rows are also set against the roofs measured here (copy bandwidth, bf16 matmul).
    peaks = bm.measure_peaks(device) if device == "cuda" else None
    meta = {
        "peaks": peaks,
        "machine": machine,
        "device": device,
        "date": stamp,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None,
    }
    base.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": bm.rows_to_dicts(rows), "inversion": _INVERSION_ROWS}, indent=1)
    )
    title = f"{machine} ({device}, {meta['gpu'] or str(meta['cpu_threads']) + ' threads'}), torch {torch.__version__}, {stamp}"
    md = bm.to_markdown(rows, title, peaks) if rows else ""
    if _INVERSION_ROWS:
        md += "\n" + bm.inversion_markdown(_INVERSION_ROWS, "inversion step")
    base.with_suffix(".md").write_text(md)
    print("\n" + md + f"\nwritten: {base}.json, {base}.md")


def _machine_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return os.environ.get("INVCOSS_MACHINE", f"{platform.machine()}-{os.cpu_count()}cpu")

"""The throughput targets: how rows are judged, and that the runs measure what the targets name."""

import pytest

from invcoss.benchmark import Case
from invcoss.benchmark.check import check_cases
from invcoss.benchmark.suite import Row, add_ratios
from invcoss.benchmark.targets import (
    CPU_TARGETS,
    GPU_TARGETS,
    Target,
    judge,
    measure_round_robin,
    target_cases,
    verdict_markdown,
)


def _row(case: Case, mode: str, provider: str, ms: float, gbps=None, tflops=None, dtype="float32") -> Row:
    return Row(
        case.name,
        case.op,
        "x".join(map(str, case.shape)),
        provider,
        mode,
        "cuda:0",
        dtype,
        ms,
        ms,
        ms,
        gbps=gbps,
        tflops=tflops,
    )


CASE = Case("tv", (8, 1, 4, 16, 16))
PEAKS = {"copy_gbps": 4000.0, "bf16_tflops": 800.0}


def test_a_target_holds_only_when_every_bound_holds():
    t = Target(CASE, "fwd+bwd", min_x_compile=1.5, min_copy_pct=85.0)
    fast = add_ratios(
        [_row(CASE, "fwd+bwd", "compile", 3.0), _row(CASE, "fwd+bwd", "triton", 1.5, gbps=3600.0)]
    )
    (v,) = judge([t], fast, PEAKS, ["triton"])
    assert v.passed and v.x_compile == pytest.approx(2.0) and v.copy_pct == pytest.approx(90.0)
    # 84% of the copy roof misses, although the speed-up holds.
    slow_bw = add_ratios(
        [_row(CASE, "fwd+bwd", "compile", 3.0), _row(CASE, "fwd+bwd", "triton", 1.5, gbps=3360.0)]
    )
    assert not judge([t], slow_bw, PEAKS, ["triton"])[0].passed
    # 1.4x compile misses, although the bandwidth holds.
    slow_x = add_ratios(
        [_row(CASE, "fwd+bwd", "compile", 2.1), _row(CASE, "fwd+bwd", "triton", 1.5, gbps=3600.0)]
    )
    assert not judge([t], slow_x, PEAKS, ["triton"])[0].passed


def test_a_row_is_judged_against_the_copy_roof_measured_around_it():
    t = Target(CASE, "fwd", min_copy_pct=85.0)
    rows = add_ratios([_row(CASE, "fwd", "triton", 1.0, gbps=3600.0)])
    (v,) = judge([t], rows, PEAKS, ["triton"], {(CASE.name, "fwd", "float32"): 4500.0})
    assert v.copy_pct == pytest.approx(80.0) and not v.passed  # 90% of PEAKS, 80% of its own roof
    (other,) = judge([t], rows, PEAKS, ["triton"], {(CASE.name, "fwd+bwd", "float32"): 4500.0})
    assert other.copy_pct == pytest.approx(90.0) and other.passed  # no roof of its own: PEAKS'


def test_round_robin_rows_cover_every_mode_and_provider_with_a_roof_each():
    import torch

    case = Case("tv", (2, 1, 3, 8, 8))
    calls = []
    rows, roofs = measure_round_robin(
        [case], ["eager", "cpu"], torch.device("cpu"), torch.float32, reps=3, progress=calls.append,
        roof_numel=1 << 16,
    )  # fmt: skip
    assert [(r.mode, r.provider) for r in rows] == [(m, p) for m in case.modes for p in ("eager", "cpu")]
    assert all(r.median_ms > 0 and r.device == "cpu" for r in rows)
    assert set(roofs) == {(case.name, m, "float32") for m in case.modes} and min(roofs.values()) > 0
    assert calls == [f"{case.name} {m}: eager, cpu in turn" for m in case.modes]


def test_what_was_not_measured_misses_and_says_why():
    t = Target(CASE, "fwd", min_x_compile=1.5, min_matmul_pct=50.0)
    (none,) = judge([t], [], PEAKS, ["cuda"])
    assert not none.passed and none.missing == "not measured"
    (partial,) = judge([t], add_ratios([_row(CASE, "fwd", "cuda", 1.0, tflops=500.0)]), None, ["cuda"])
    assert not partial.passed and partial.missing == "no compile row; no roofs"
    text = verdict_markdown([none, partial], None, "Targets")
    assert "no: not measured" in text and "0 of 2 targets met." in text


def test_the_gpu_check_measures_every_gpu_target_case():
    measured = {c.name for c in check_cases(rehearse=False)}
    assert {c.name for c in target_cases(GPU_TARGETS)} <= measured


def test_gpu_targets_use_inputs_at_least_four_times_the_l2():
    # fp32 inputs of 240 MB and more (an H200 has 50-60 MB of L2), except the matmul-bound rows.
    for t in GPU_TARGETS:
        if t.min_copy_pct is None:
            continue
        numel = 1
        for n in t.case.shape:
            numel *= n
        assert numel * 4 >= 4 * 60e6, t.label


def test_cpu_targets_cover_every_memory_bound_op_in_both_modes():
    covered = {(t.case.op, t.mode) for t in CPU_TARGETS if t.min_copy_pct is not None}
    assert covered == {
        ("tv", "fwd"),
        ("tv", "fwd+bwd"),
        ("stat_matching", "fwd"),
        ("stat_matching", "fwd+bwd"),
        ("welford", "fwd"),
    }
    assert {t.case.tag for t in CPU_TARGETS} >= {"paper"}


def test_the_gpu_report_judges_cuda_rows_only():
    from invcoss.benchmark.report import targets_section

    case = Case("repulsive_direct", (320, 16384, 768))
    rows = add_ratios([_row(case, "fwd", "triton", 1.0, tflops=450.0, dtype="bfloat16")])
    text = targets_section(rows, PEAKS)
    assert "| repulsive_direct[320x16384x768] | fwd | bfloat16 | triton |" in text and "| yes |" in text
    cpu = [Row(**{**r.__dict__, "device": "cpu"}) for r in rows]
    assert targets_section(cpu, PEAKS) == ""

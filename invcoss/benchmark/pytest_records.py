"""A pytest plugin for time-limited device runs: records as they happen, loud failure when empty.

Load it with ``-p invcoss.benchmark.pytest_records``. Options:

- ``--records FILE``: append one JSON line per test outcome (node id, outcome, seconds, the first
  line of a failure) to FILE as soon as the test ends (:func:`invcoss.benchmark.records.append_record`),
  so a run killed at its time limit keeps every outcome it reached.
- ``--records-step NAME``: the ``step`` field of those lines (default ``tests``).
- ``--require-backends a,b``: stop before the first test, with one clear line and exit status 3,
  when one of these :mod:`invcoss.ops` backends is not available (so a failed extension build or a
  broken Triton import cannot pass as a green run of skipped tests).
- ``--require-tests``: fail the session (exit status 1, one clear line) when no test passed.
"""

from __future__ import annotations

import pytest

from invcoss.benchmark.records import append_record

_PASSED = "invcoss_records_passed"
_CONFIG: list[pytest.Config] = []  # the session's config, for the report hook (which gets none)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("invcoss records")
    group.addoption("--records", default=None, help="append one JSON line per test outcome to FILE")
    group.addoption("--records-step", default="tests", help="the step field of the records")
    group.addoption(
        "--require-backends",
        default="",
        help="comma-separated invcoss.ops backends that must be available, else exit 3",
    )
    group.addoption("--require-tests", action="store_true", help="fail when no test passed")


def pytest_configure(config: pytest.Config) -> None:
    setattr(config, _PASSED, 0)
    _CONFIG[:] = [config]


def pytest_sessionstart(session: pytest.Session) -> None:
    wanted = [b for b in session.config.getoption("--require-backends").split(",") if b]
    if not wanted:
        return
    from invcoss import ops
    from invcoss.ops.dispatch import unavailable_reason

    missing = [b for b in wanted if b not in ops.available_backends()]
    if missing:
        why = "; ".join(f"{b}: {unavailable_reason(b)}" for b in missing)
        step = session.config.getoption("--records-step")
        _record(session.config, {"test": "<backends>", "outcome": "error", "message": why})
        # One line of ours (pytest's own exit message would repeat it twice).
        print(f"\ngpu_check: FAILED: step {step}: backend(s) missing: {why}", flush=True)
        pytest.exit("required backends missing", returncode=3)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One record per test: its call, or the setup/teardown phase that failed or skipped it.
    if report.when != "call" and report.outcome == "passed":
        return
    if report.when == "teardown" and report.outcome == "skipped":
        return
    config = _CONFIG[0]
    if report.when == "call" and report.outcome == "passed":
        setattr(config, _PASSED, getattr(config, _PASSED) + 1)
    message = ""
    if report.outcome != "passed":
        message = _first_error_line(report.longreprtext)
    outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    _record(
        config,
        {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 4), "message": message},
    )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if config.getoption("--require-tests") and getattr(config, _PASSED) == 0 and exitstatus in (0, 5):
        step = config.getoption("--records-step")
        print(f"\ngpu_check: FAILED: step {step} ran no test (none passed; every one skipped or deselected)")
        session.exitstatus = 1


def _first_error_line(text: str) -> str:
    """The exception line of a pytest failure report (``E   ...``), else its last line."""
    lines = text.strip().splitlines()
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1] if lines else "")[:500]


def _record(config: pytest.Config, fields: dict) -> None:
    path = config.getoption("--records")
    if path:
        append_record(path, {"step": config.getoption("--records-step"), **fields})

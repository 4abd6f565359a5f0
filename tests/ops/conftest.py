"""Fixtures of the op tests: the backend under test and the test device (see backends.py)."""

from __future__ import annotations

import pytest
import torch

from invcoss import ops
from invcoss.ops.dispatch import unavailable_reason
from tests.ops.backends import BACKENDS, DEVICE, interpreted


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of Triton through the interpreter ``interpret`` (``-m interpret`` runs them)."""
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        if backend and interpreted(backend):
            item.add_marker(pytest.mark.interpret)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """A backend name; a missing one fails the test with the reason (never a silent skip).

    Parametrise with ``pytest.mark.parametrize("backend", [...], indirect=True)`` for a subset.
    """
    name = request.param
    if name not in ops.available_backends():
        pytest.fail(f"backend {name!r} is missing on {DEVICE}: {unavailable_reason(name)}")
    return name


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def kernel_rows(request):
    """Every Triton kernel in every config, compiled for sm_90 once per session (kernels/aot.py);
    the compile was started in the background when collection finished (tests/conftest.py)."""
    from invcoss.kernels import aot

    started = getattr(request.config, "_invcoss_aot", None)
    return aot.finish_kernel_table(started) if started is not None else aot.kernel_table()

"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, first: on this
CPU-only CI the Triton kernels run on CPU tensors through the interpreter. A GPU run sets
TRITON_INTERPRET=0 explicitly to compile them for the device instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (use with ``pytestmark = pytest.mark.usefixtures(...)``).

    Small models gain nothing from a second thread, and two threads on a busy 2-core runner are many
    times slower (OpenMP oversubscription). Results are bitwise reproducible only for a given thread
    count, so the CLI tests run their subprocesses with one thread too.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the sm_90 compile of the Triton kernels in the background when a test needs its table.

    It takes a minute and one core: started now, with one worker, it overlaps the tests that run
    before the first user of the ``kernel_rows`` fixture (tests/ops/conftest.py) collects it.
    """
    if any("kernel_rows" in getattr(item, "fixturenames", ()) for item in session.items):
        from invcoss.kernels import aot

        session.config._invcoss_aot = aot.start_kernel_table(workers=1)

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

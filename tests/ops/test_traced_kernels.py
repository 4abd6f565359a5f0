"""The compiled Triton ops trace as ``torch.compile`` traces them, checked without a GPU.

``trace_compiled.py`` defines the kernels for the GPU (``TRITON_INTERPRET=0``) in a fresh process
and exports every op on fake CUDA tensors through the functionalising trace, so each ``triton_op``
decomposes into its kernel launches. This is the path a GPU run under ``torch.compile`` takes and
the interpreter tests do not (under the interpreter the ops are plain custom ops): a launcher that
reads a data pointer or asks the device for its properties fails here, as it would on the GPU.
The kernels torch's analysis says each launch writes are checked too: outputs only, never an input.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("trace_compiled.py")

# Per op: the kernels launched in order, each with the arguments it writes.
PARTIALS = ["welford_partial_kernel", ["m2_ptr", "mean_ptr"]]
ROW_SUM = ["row_sum_kernel", ["out_ptr"]]
INV_NORM = ["inv_norm_kernel", ["out_ptr"]]
EXPECTED = {
    "tv": [["tv_forward_kernel", ["partial_ptr"]], ROW_SUM],
    "tv_backward": [["tv_backward_kernel", ["grad_ptr"]]],
    "batch_mean_var": [PARTIALS, ["welford_merge_kernel", ["out_a_ptr", "out_b_ptr"]]],
    "batch_mean_var_backward": [["batch_mean_var_backward_kernel", ["grad_ptr"]]],
    "welford_update": [PARTIALS, ["welford_merge_kernel", ["out_a_ptr", "out_b_ptr"]]],
    "stat_matching": [
        PARTIALS,
        ["welford_merge_kernel", ["out_a_ptr", "out_b_ptr", "out_c_ptr", "sq_ptr"]],
        ["stat_norms_kernel", ["inv_ptr", "loss_ptr"]],
    ],
    "repulsive_gram": [
        ["gram_forward_kernel", ["hsq_ptr", "quad_ptr", "t_ptr"]],
        ["gram_finish_kernel", ["grad_ptr", "rowloss_ptr"]],
        ROW_SUM,
    ],
    "gram_update": [["gram_update_kernel", ["gram_ptr"]]],
}


def _direct(dtype: str, with_grad: bool) -> list:
    # 16-bit features run the tensor-core kernel; the gradient pass writes the per-chunk sums.
    kernel = "repulsive_direct_kernel " + ("mma" if dtype == "bfloat16" else "fp32")
    return [
        INV_NORM,
        INV_NORM,
        [kernel, ["partsq_ptr", "party_ptr"] if with_grad else ["partsq_ptr"]],
        ["repulsive_direct_finish_kernel", ["grad_ptr", "rowloss_ptr"] if with_grad else ["rowloss_ptr"]],
        ROW_SUM,
    ]


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_the_kernels_are_defined_for_the_gpu(report):
    assert report["interpret"] is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", [*EXPECTED, "repulsive_direct", "repulsive_direct_loss"])
def test_every_op_traces_into_its_kernels(report, op, dtype):
    got = report[f"{op} {dtype}"]
    assert "error" not in got, got.get("traceback", got)
    expected = EXPECTED.get(op) or _direct(dtype, with_grad=op == "repulsive_direct")
    assert got["launches"] == expected
    assert got["left"] == []  # no op left undecomposed
    # Only gram_update writes one of its inputs (the Gram matrix, in place).
    assert got["mutated"] == (["arg0_1"] if op == "gram_update" else [])

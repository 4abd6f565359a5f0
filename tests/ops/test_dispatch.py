"""Backend selection and its errors (SPEC 2)."""

import pytest
import torch

from invcoss import ops
from invcoss.ops import dispatch


def test_status_lists_every_backend_and_torch_runs_everywhere():
    status = ops.backend_status()
    assert set(status) == set(ops.BACKEND_NAMES)
    assert status["torch"] == (True, "available")
    for ok, reason in status.values():
        assert isinstance(ok, bool) and reason
    assert "torch" in ops.available_backends()


def test_default_backend_prefers_the_extension_on_cpu(monkeypatch):
    monkeypatch.delenv("INVCOSS_BACKEND", raising=False)
    expected = "cpu" if dispatch.unavailable_reason("cpu") is None else "torch"
    assert ops.default_backend(torch.device("cpu")) == expected


def test_env_overrides_default(monkeypatch):
    monkeypatch.setenv("INVCOSS_BACKEND", "torch")
    assert ops.default_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("INVCOSS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown INVCOSS_BACKEND 'fastest'"):
        ops.total_variation(torch.zeros(1, 1, 2, 2))


def test_unknown_backend_names_the_argument():
    with pytest.raises(
        ValueError, match=r"unknown backend 'cudnn'; expected one of torch, triton, cpu, cuda"
    ):
        ops.total_variation(torch.zeros(1, 1, 2, 2), backend="cudnn")


def test_unavailable_backend_says_why_and_how(monkeypatch):
    monkeypatch.setitem(dispatch._status_cache, "cpu", "the extension invcoss._C is not available: not built")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available: .*not built\. To get it: build"):
        ops.batch_mean_var(torch.zeros(2, 3), backend="cpu")


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [
        ("3.6.0", "2.5.5", True),
        ("3.6.0", "2.4.0", True),
        ("3.5.1+git1234", "2.4.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.5.5", False),
        ("3.8.0", "3.0.0", False),
    ],
)
def test_interpreter_versions_that_cannot_run_the_kernels(triton_version, numpy_version, refused):
    # Triton's interpreter before 3.7 calls int() on one-element arrays, which NumPy 2.4 refuses.
    reason = dispatch.interpreter_incompatibility(triton_version, numpy_version)
    if refused:
        assert reason is not None and "numpy<2.4" in reason and triton_version in reason
        assert numpy_version in reason
    else:
        assert reason is None


def test_triton_backend_reports_an_interpreter_mismatch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "interpreter_incompatibility", lambda t, n: f"numpy<2.4 with triton {t}")
    reason = dispatch._probe_triton()
    assert reason is not None and reason.startswith("numpy<2.4 with triton")


def test_backend_on_the_wrong_device(monkeypatch):
    # The cuda backend, made to look available, asked to run on CPU tensors.
    monkeypatch.setitem(dispatch._status_cache, "cuda", None)
    monkeypatch.setitem(dispatch._modules, "cuda", dispatch._modules.get("cuda", object()))
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda/meta tensors, got tensors on cpu"):
        ops.stat_matching_loss(torch.zeros(2, 3), torch.zeros(3), torch.zeros(3), backend="cuda")


def test_device_mix_names_the_argument():
    h = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"pool on the same device as h \(cpu\), got meta"):
        ops.repulsive_cosine_loss(h, torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"var on the same device as x"):
        ops.stat_matching_loss(h, torch.zeros(3), torch.zeros(3, device="meta"))


def test_every_available_backend_runs_on_meta_tensors():
    x = torch.zeros(2, 1, 4, 4, device="meta")
    for name in ops.available_backends():
        assert ops.total_variation(x, backend=name).device.type == "meta"

"""Launch plumbing of the Triton kernels: the device a launch runs on, and the autotune keys."""

import pytest
import torch
import triton
import triton.language as tl
from invcoss.kernels import launch as launch_mod
from torch._subclasses.fake_tensor import FakeTensorMode


def test_launch_runs_under_the_device_of_its_tensors(monkeypatch):
    # Triton launches on the current device: a tensor on cuda:1 needs cuda:1 made current first.
    entered, launched = [], []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(launch_mod, "INTERPRET", False)  # the compiled path, whatever runs the tests
    monkeypatch.setattr(launch_mod, "is_fake", lambda t: False)  # a fake tensor stands in for a real one
    monkeypatch.setattr(
        launch_mod, "wrap_triton", lambda k: {(1,): lambda *a, **kw: launched.append(list(entered))}
    )
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")
    launch_mod.launch("kernel", (1,), 3, x, flag=True)
    assert launched == [[torch.device("cuda:1")]] and entered[-1] == "exit"


def test_traced_launches_switch_no_device():
    # Fake tensors (a trace, possibly on a machine without a GPU): nothing runs, no device is touched.
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")
    assert launch_mod.launch_device([3, x]) is None
    assert launch_mod.sm_count(torch.device("meta")) == launch_mod.HOPPER_SMS
    if not torch.cuda.is_available():  # a trace for CUDA with no GPU sizes its grid for Hopper
        assert launch_mod.sm_count(torch.device("cuda:1")) == launch_mod.HOPPER_SMS


def test_cpu_tensors_launch_without_a_device_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda d: pytest.fail(f"switched to {d}"))
    monkeypatch.setattr(launch_mod, "INTERPRET", False)
    calls = []
    monkeypatch.setattr(launch_mod, "wrap_triton", lambda k: {(2,): lambda *a, **kw: calls.append(a)})
    launch_mod.launch("kernel", (2,), torch.zeros(2), 5)
    assert len(calls) == 1
    assert launch_mod.launch_device([1, "a", torch.zeros(1)]) is None


def test_interpreted_kernels_launch_directly(monkeypatch):
    # Under the interpreter the op is a plain custom op: the kernel is called as it is, not through
    # wrap_triton (which refuses the interpreter's kernel objects on some torch releases).
    monkeypatch.setattr(launch_mod, "INTERPRET", True)
    monkeypatch.setattr(launch_mod, "wrap_triton", lambda k: pytest.fail("wrapped under the interpreter"))
    calls = []
    launch_mod.launch({(3,): lambda *a, **kw: calls.append((a, kw))}, (3,), torch.zeros(2), 7, BLOCK=4)
    assert len(calls) == 1 and calls[0][0][1] == 7 and calls[0][1] == {"BLOCK": 4}


@triton.jit
def _variant_kernel(x_ptr, n, HAS_GRAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    pass


def test_variant_key_adds_every_constexpr_the_configs_leave_free():
    configs = [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})]
    assert launch_mod.variant_key(_variant_kernel, ["n"], configs) == ["n", "HAS_GRAD", "PRECISION"]
    # Idempotent when the caller already names them.
    assert launch_mod.variant_key(_variant_kernel, ["HAS_GRAD", "n"], configs) == [
        "HAS_GRAD",
        "n",
        "PRECISION",
    ]


def test_every_autotuned_kernel_keys_on_its_variants():
    # A config tuned for one compiled variant (HAS_GRAD, PRECISION, ...) is never reused for another.
    import importlib

    from triton.runtime.autotuner import Autotuner

    for name in ("tv", "stats", "repulsive", "reduce"):
        module = importlib.import_module(f"invcoss.kernels.{name}")
        for attr, obj in vars(module).items():
            if not isinstance(obj, Autotuner):
                continue
            tuned = {k for cfg in obj.hopper_configs for k in cfg.kwargs}
            free = set(launch_mod.constexpr_names(obj)) - tuned
            assert free <= set(obj.keys), (
                f"{name}.{attr}: key {obj.keys} misses {sorted(free - set(obj.keys))}"
            )

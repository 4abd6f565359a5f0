"""A run is a function of its settings: the invcoss path twice, one of them in a fresh process,
gives bit-identical checkpoints, losses, statistics and synthetic samples; the thread count is
recorded, and resuming at another count is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from invcoss.continual import run_continual
from invcoss.continual.config import ContinualConfig
from invcoss.continual.experiment import ForgettingExperiment
from invcoss.rng import pinned_compute, resolve_threads

pytestmark = pytest.mark.usefixtures("one_thread")

ORDER = ("ct", "xray")


def tiny_invcoss_run(out: str | os.PathLike, threads: int) -> None:
    """The experiment's tiny invcoss path (CT then X-ray, replaying inverted CT) on fixed tensors."""
    g = torch.Generator().manual_seed(0)
    data = {
        "ct": torch.rand(4, 1, 16, 32, 32, generator=g) * 2 - 1,
        "xray": torch.rand(4, 3, 32, 32, generator=g),
    }
    config = ForgettingExperiment.from_size("tiny").base.replace(method="invcoss", epochs=1)
    run_continual(data, out, config, device="cpu", threads=threads)


def tensors_and_meta(run: Path) -> dict[str, tuple[dict, dict]]:
    """Every safetensors file of a run: its tensors and its metadata."""
    out = {}
    for path in sorted(run.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.relative_to(run).as_posix()] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def losses(run: Path) -> list:
    return [json.loads(p.read_text())["history"] for p in sorted(run.glob("stage*/stage.json"))]


def assert_identical(a_run: Path, b_run: Path) -> None:
    a_files, b_files = tensors_and_meta(a_run), tensors_and_meta(b_run)
    # Checkpoints, statistics and the inverted CT replayed in stage 2, bit for bit.
    assert {"stage1_ct/model.safetensors", "stage1_ct/stats.safetensors",
            "stage2_xray/model.safetensors", "stage2_xray/replay/ct.safetensors"} <= set(a_files)  # fmt: skip
    assert a_files.keys() == b_files.keys()
    for name, (a, meta) in a_files.items():
        b, other_meta = b_files[name]
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
        assert meta == other_meta, name
    assert losses(a_run) == losses(b_run)


def assert_records_one_thread(run: Path) -> None:
    header = json.loads((run / "continual.json").read_text())
    assert header["compute"]["threads"] == 1 and header["compute"]["deterministic_algorithms"]
    stages = sorted(run.glob("stage*/stage.json"))
    assert len(stages) == 2 and all(json.loads(p.read_text())["compute"]["threads"] == 1 for p in stages)
    with safe_open(str(run / "stage1_ct" / "stats.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["compute"])["threads"] == 1


def test_two_runs_are_bit_identical_and_resume_keeps_the_thread_count(tmp_path):
    tiny_invcoss_run(tmp_path / "a", threads=1)
    tiny_invcoss_run(tmp_path / "b", threads=1)
    assert_identical(tmp_path / "a", tmp_path / "b")
    assert_records_one_thread(tmp_path / "a")
    run = tmp_path / "a"
    cfg = ContinualConfig.from_dict(json.loads((run / "continual.json").read_text())["config"])
    with pytest.raises(ValueError, match=r"at 2 CPU threads: it was made with 1.*--threads 1"):
        run_continual({}, run, cfg, resume=True, device="cpu", threads=2)
    # Without a count the recorded one is used, and the caller's count is restored after the call.
    torch.set_num_threads(2)
    try:
        result = run_continual({}, run, cfg, resume=True, device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert [s.epochs_run for s in result.stages] == [0, 0]
    assert_records_one_thread(run)


@pytest.mark.slow
def test_the_invcoss_path_is_bit_identical_in_a_fresh_process(tmp_path):
    tiny_invcoss_run(tmp_path / "here", threads=1)
    # Another interpreter, another string-hash seed, another default thread count: only the
    # settings may matter.
    script = f"import runpy; runpy.run_path({__file__!r})['tiny_invcoss_run']({str(tmp_path / 'there')!r}, 1)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert_identical(tmp_path / "here", tmp_path / "there")
    assert_records_one_thread(tmp_path / "there")


def test_pinned_compute_restores_the_settings_and_checks_the_count():
    torch.use_deterministic_algorithms(False)
    with pytest.raises(KeyError):
        with pinned_compute(2) as record:
            assert record["threads"] == torch.get_num_threads() == 2
            assert torch.are_deterministic_algorithms_enabled()
            raise KeyError("the block fails")
    assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            pinned_compute(bad).__enter__()
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            resolve_threads(bad, None, "a run")
    assert resolve_threads(None, None, "a run") == torch.get_num_threads()

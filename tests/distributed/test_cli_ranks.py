"""The commands under torchrun on CPU (gloo): ``stats`` on two ranks writes one process's file; ``pretrain``
on two ranks writes one checkpoint that one process resumes.

The command-line runs start two Python processes each (tens of seconds on a busy 2-core machine), so
they are marked slow; tests/distributed/test_distributed.py checks the library call on two ranks fast.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from invcoss.cli import main
from invcoss.models import create_model
from tests.distributed.launch import WORKER, launch, torchrun


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    """A cache of 7 X-ray samples (uneven over 2 ranks) and a vit_nano checkpoint that takes them."""
    root = tmp_path_factory.mktemp("xray")
    runner = CliRunner()
    r = runner.invoke(main, ["phantoms", "--modality", "xray", "--count", "7", "--out", str(root / "scans")])
    assert r.exit_code == 0, r.output
    args = ["preprocess", "--modality", "xray", "--data", str(root / "scans"), "--out", str(root / "cache")]
    r = runner.invoke(main, [*args, "--profile", "quick"])
    assert r.exit_code == 0, r.output
    torch.manual_seed(3)
    create_model("vit_nano").save_pretrained(root / "ckpt")
    return root


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def stats_args(root, out, batch_size):
    return [
        "stats", "--checkpoint", str(root / "ckpt"), "--data", str(root / "cache"), "--out", str(out),
        "--device", "cpu", "--threads", "1", "--batch-size", str(batch_size),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "batch_size, launcher",
    # batch 2 splits the data into the same batches on 1 and 2 ranks, batch 3 into other ones.
    [(2, "env"), (3, "torchrun")],
)
@pytest.mark.slow
def test_stats_on_two_ranks_equal_one_process(xray, tmp_path, batch_size, launcher):
    one = tmp_path / "one.safetensors"
    r = CliRunner().invoke(main, stats_args(xray, one, batch_size))
    assert r.exit_code == 0, r.output
    two = tmp_path / "two.safetensors"
    args = ["-m", "invcoss.cli", *stats_args(xray, two, batch_size)]
    if launcher == "torchrun":
        runs = [torchrun(args)]
    else:
        runs = launch(args)
    assert all(run.returncode == 0 for run in runs), [run.err for run in runs]
    said = "".join(run.out for run in runs)
    assert said.count("statistics of 4 blocks over 7 xray samples on 2 ranks") == 1  # rank 0 only
    (a, meta_a), (b, meta_b) = read(one), read(two)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
    assert meta_b["count"] == meta_a["count"] == "7"
    assert meta_b["sources"] == meta_a["sources"] == "7"
    assert json.loads(meta_b["compute"])["threads"] == json.loads(meta_a["compute"])["threads"] == 1
    assert json.loads(meta_b["compute"])["ranks"] == 2 and "ranks" not in json.loads(meta_a["compute"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


def test_a_bad_launch_is_a_user_error(xray, tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("INVCOSS_DIST_TIMEOUT", "soon")
    r = CliRunner().invoke(main, stats_args(xray, out, 2))
    assert (
        r.exit_code == 2
        and "INVCOSS_DIST_TIMEOUT expects a positive number of seconds, got 'soon'" in r.output
    )
    monkeypatch.delenv("INVCOSS_DIST_TIMEOUT")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    r = CliRunner().invoke(main, stats_args(xray, out, 2))
    assert r.exit_code == 2 and "MASTER_ADDR, MASTER_PORT not set; launch with torchrun" in r.output
    assert not out.exists()


@pytest.mark.slow
def test_a_rank_that_leaves_makes_the_command_exit_1_with_a_message(xray, tmp_path):
    out = tmp_path / "s.safetensors"
    ranks = launch(
        ["-m", "invcoss.cli", *stats_args(xray, out, 2)],
        env={"INVCOSS_DIST_TIMEOUT": "60"},
        rank_args={1: [str(WORKER), "leave", "-"]},
    )
    assert ranks[1].returncode == 9
    assert ranks[0].returncode == 1, ranks[0].err
    err = ranks[0].err
    assert "Error: rank 0 of 2:" in err and "another rank stopped" in err and "--resume" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_pretrain_on_two_ranks_then_resume_in_one_process(xray, tmp_path):
    from invcoss.pretrain import STATE_NAME, SUMMARY_NAME

    out = tmp_path / "ckpt"
    args = ["pretrain", "--data", str(xray / "cache"), "--out", str(out), "--batch-size", "4"]
    args += ["--lr", "1e-3", "--warmup-epochs", "1", "--device", "cpu", "--threads", "1"]
    run = torchrun(["-m", "invcoss.cli", *args, "--epochs", "1"])
    assert run.returncode == 0, run.err
    assert run.out.count("trained vit_nano on 7 xray samples for 1 epochs on 2 ranks") == 1  # rank 0 only
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "model.safetensors", STATE_NAME, SUMMARY_NAME]
    )  # rank 0's files only
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["epochs_done"] == 1 and summary["ranks"] == 2
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "epoch" for e in epochs) == 1  # one line, not one per rank
    r = CliRunner().invoke(main, [*args, "--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "for 1 epochs in" in r.stdout and "on 2 ranks" not in r.stdout
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["epochs_done"] == 2 and len(summary["losses"]) == 2

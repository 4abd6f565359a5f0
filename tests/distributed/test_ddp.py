"""pretrain under DistributedDataParallel: two gloo ranks on CPU against one process on the same global batches.

The global batch (5 samples) is split into parts of 3 and 2; each sample's mask depends on its index
only, and the loss is scaled by the part's share, so DDP's averaged gradient is the global batch's.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from invcoss import distributed
from invcoss.continual.layout import REPLAY_DIR
from invcoss.continual.replay import load_samples
from invcoss.pretrain import STATE_NAME, SUMMARY_NAME
from tests.distributed.launch import WORKER, launch
from tests.distributed.worker import tiny_continual, tiny_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32 sums grouped per rank, through a few Adam steps


def two_ranks(out, epochs, *flags, env=None):
    ranks = launch([str(WORKER), "train", str(out), str(epochs), *flags], env=env)
    return ranks


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias adds the same number to every logit of a query, which softmax ignores: its
            # true gradient is zero, so it holds rounding noise that AdamW normalises into lr-sized
            # steps. Compare the query and value biases only.
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_two_ranks_train_the_single_process_model(tmp_path):
    ranks = two_ranks(tmp_path / "two", 1)
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    w0, w1 = (load_file(str(tmp_path / f"two.rank.{r}")) for r in range(2))
    assert_same_weights(w0, w1, rtol=0, atol=0)  # DDP keeps the ranks identical, bit for bit
    model, result = tiny_pretrain(tmp_path / "one", 1)
    one = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert_same_weights(w0, one, **TOL)
    losses = json.loads((tmp_path / "two.losses.0").read_text())
    assert losses == pytest.approx(result.losses, rel=1e-5)  # the global batch's loss, not rank 0's part
    summary = json.loads((tmp_path / "two" / SUMMARY_NAME).read_text())
    assert summary["ranks"] == 2 and summary["epochs_done"] == 1
    assert "ranks" not in json.loads((tmp_path / "one" / SUMMARY_NAME).read_text())


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_continues_on_one_process(tmp_path):
    start = time.monotonic()
    ranks = two_ranks(tmp_path / "run", 3, "kill", env={distributed.TIMEOUT_ENV: "30"})
    assert time.monotonic() - start < 90
    assert ranks[1].returncode == 9
    assert ranks[0].returncode == 3, ranks[0].err
    assert "rank 0 of 2: pretrain failed: another rank stopped" in ranks[0].err and "--resume" in ranks[0].err
    assert json.loads((tmp_path / "run" / SUMMARY_NAME).read_text())["epochs_done"] == 1  # epoch 1 kept
    assert (tmp_path / "run" / STATE_NAME).exists()
    model, result = tiny_pretrain(tmp_path / "run", 3, resume=True)  # one process resumes a 2-rank run
    assert result.epochs_run == 2
    straight, expected = tiny_pretrain(tmp_path / "straight", 3)
    assert_same_weights(model.state_dict(), straight.state_dict(), **TOL)
    assert result.losses == pytest.approx(expected.losses, rel=1e-4)


@pytest.mark.slow
def test_two_ranks_run_the_single_process_continual_stages(tmp_path):
    ranks = launch([str(WORKER), "continual", str(tmp_path / "two")])
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    one = tiny_continual(tmp_path / "one")
    for s in one.stages:
        folder = s.dir.name
        a = load_file(str(tmp_path / "one" / folder / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / folder / "model.safetensors"))
        assert_same_weights(b, a, **TOL)
        sa = json.loads((tmp_path / "one" / folder / "stage.json").read_text())
        sb = json.loads((tmp_path / "two" / folder / "stage.json").read_text())
        assert sb["kept"] == sa["kept"] == 2 and sb["buffer"] == sa["buffer"]
        # 8 to train, 8 for statistics, 2 kept, spread over the ranks; each rank reads one sample to check its shape
        assert sa["reads"] == 19 and sb["reads"] == 20
        for ha, hb in zip(sa["history"], sb["history"]):
            assert hb.keys() == ha.keys() and hb["steps"] == ha["steps"]
            for k in ha:
                assert hb[k] == pytest.approx(ha[k], rel=1e-4)
    files = sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))


@pytest.mark.slow
def test_two_ranks_share_the_inversion_of_the_synthetic_buffer(tmp_path):
    """--method invcoss: each rank inverts half the buffer's batches; without repulsion the buffer
    and the stage equal one process's."""
    ranks = launch([str(WORKER), "continual", str(tmp_path / "two"), "invcoss"])
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    one = tiny_continual(tmp_path / "one", "invcoss")
    folder = one.stages[1].dir.name
    (a, meta_a), (b, meta_b) = (
        load_samples(tmp_path / run / folder / REPLAY_DIR / "xray.safetensors") for run in ("one", "two")
    )
    assert a.shape[0] == 4
    # the same samples; the stage 0 models they are inverted from agree within float tolerance
    assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    # two batches of 2, one per rank; the same quality record either way
    assert [q["samples"] for q in meta_b["quality"]] == [2, 2]
    for qa, qb in zip(meta_a["quality"], meta_b["quality"]):
        assert qb == pytest.approx(qa, rel=1e-4)
    assert_same_weights(
        load_file(str(tmp_path / "two" / folder / "model.safetensors")),
        load_file(str(tmp_path / "one" / folder / "model.safetensors")),
        rtol=1e-3, atol=1e-4,  # trained on buffers that agree within 1e-4
    )  # fmt: skip

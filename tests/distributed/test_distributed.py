"""invcoss.distributed: sharding, the timeout setting, and two gloo ranks on CPU (collectives, a dead peer).

The two-rank tests start real processes (tests/distributed/launch.py) and take a few seconds each.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from invcoss import distributed
from invcoss.feature_stats import SmallCohortWarning, collect_feature_stats, load_feature_stats
from invcoss.models import create_model
from tests.distributed.launch import WORKER, launch


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("n", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_index_once(n, world, strided):
    shards = [list(distributed.shard_indices(n, r, world, strided=strided)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if not strided:
        assert [i for s in shards for i in s] == list(range(n))  # contiguous blocks in rank order


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, 0, 1), "n >= 0"),
        ((3, 2, 2), r"rank in \[0, 2\)"),
        ((3, 0, 0), "world >= 1"),
        ((3.0, 0, 1), "n to be"),
    ],
)
def test_shard_arguments_are_checked(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        distributed.shard_indices(*args)


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_from_env() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{distributed.TIMEOUT_ENV} expects a positive number"):
            distributed.timeout_from_env()


def test_one_process_joins_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is None
    assert not distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is None
    assert not distributed.is_initialized()


def test_an_incomplete_launch_names_the_missing_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env("cpu")


def test_two_gloo_ranks_gather_broadcast_and_merge_statistics(tmp_path):
    out = tmp_path / "rank"
    ranks = launch([str(WORKER), "gather", str(out)])
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    seen = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    data = np.arange(33, dtype=np.float64).reshape(11, 3) ** 1.5
    for r, s in enumerate(seen):
        assert s["ctx"] == [r, 2, r, "gloo", "cpu"]
        assert (s["rank"], s["world"], s["main"]) == (r, 2, r == 0)
        assert s["parts"] == [[[0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]
        assert s["objs"] == [{"rank": 0}, {"rank": 1}]
        assert s["sent"] == "from 0"
        assert s["sum"] == 1.0
        assert s["count"] == 11
        np.testing.assert_allclose(s["mean"], data.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s["var"], data.var(0), rtol=1e-12)
    assert seen[0]["mean"] == seen[1]["mean"] and seen[0]["var"] == seen[1]["var"]  # same bits


def test_feature_stats_of_two_shards_equal_one_pass(tmp_path, one_thread):
    ranks = launch([str(WORKER), "stats", str(tmp_path / "two.safetensors")])
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    torch.manual_seed(3)
    model = create_model("vit_nano", img_size_2d=32)
    data = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with pytest.warns(SmallCohortWarning):
        collect_feature_stats(model, data, modality="xray", batch_size=3, out=tmp_path / "one.safetensors")
    one = load_feature_stats(tmp_path / "one.safetensors", model)
    two = load_feature_stats(tmp_path / "two.safetensors", model)
    assert two.count == one.count == 7 and two.compute["ranks"] == 2
    for a, b in zip(one.mean + one.var, two.mean + two.var):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    assert two.data.intensity == one.data.intensity  # the values of both shards, merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


def test_a_dead_rank_makes_the_other_exit_with_a_message(tmp_path):
    start = time.monotonic()
    ranks = launch([str(WORKER), "die", str(tmp_path / "x")], env={distributed.TIMEOUT_ENV: "20"}, timeout=60)
    elapsed = time.monotonic() - start
    assert ranks[1].returncode == 9
    assert ranks[0].returncode == 3, ranks[0].err
    assert "rank 0 of 2" in ranks[0].err and "failed: another rank stopped" in ranks[0].err
    assert "--resume" in ranks[0].err and distributed.TIMEOUT_ENV in ranks[0].err
    assert elapsed < 40

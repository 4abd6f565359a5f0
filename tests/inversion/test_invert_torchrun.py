"""invert under torchrun: two gloo ranks on CPU share one run (invcoss/inversion/shards.py).

The launches start real processes (tests/distributed/launch.py), one thread each, at tiny sizes.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from invcoss import distributed
from invcoss.cli import main
from invcoss.feature_stats import collect_feature_stats, load_feature_stats
from invcoss.inversion import InversionConfig, Inverter
from invcoss.inversion.shards import progress_path, shard_batches, state_name
from invcoss.models import MAE, create_model
from tests.distributed.launch import ROOT, WORKER, base_env, free_port, launch, torchrun
from tests.inversion.test_inversion_io import files_of

pytestmark = pytest.mark.usefixtures("one_thread")

# 18 samples in 9 batches of 2, a generator per 2 batches: groups {0, 1}, {2, 3}, ..., {8}, so rank 0
# inverts batches 0, 1, 4, 5, 8 and rank 1 batches 2, 3, 6, 7, sitting the fifth round out.
SETTINGS = dict(
    batch_size=2, steps=2, warmup_steps=3, latent_dim=8, generator_channels=(8, 8, 4), min_batch_size=1,
    generator_every=2,
)  # fmt: skip
NUM_SAMPLES, NUM_BATCHES = 18, 9


def invert_args(checkpoint, out) -> list[str]:
    return [
        "-m", "invcoss.cli", "invert", "--modality", "xray", "--checkpoint", str(checkpoint),
        "--num-samples", str(NUM_SAMPLES), "--batch-size", "2", "--steps", "2", "--warmup-steps", "3",
        "--threads", "1", "--set", "latent_dim=8", "--set", "generator_channels=8,8,4",
        "--set", "min_batch_size=1", "--set", "generator_every=2", "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny X-ray model (input 32x32) with its statistics beside it."""
    folder = tmp_path_factory.mktemp("xray")
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
    model.save_pretrained(folder)
    data = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning):  # a small cohort
        collect_feature_stats(model, data, modality="xray", out=folder / "stats.safetensors")
    return folder


@pytest.fixture(scope="module")
def two_rank_run(checkpoint, tmp_path_factory):
    """An uninterrupted run on two ranks: its folder and torchrun's result."""
    out = tmp_path_factory.mktemp("run") / "two"
    return out, torchrun(invert_args(checkpoint, out))


@pytest.mark.parametrize("group", [1, 3, 10])
@pytest.mark.parametrize("num_batches", [0, 1, 7, 20])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_deal_whole_generator_groups_round_robin(num_batches, group, world):
    shards = shard_batches(num_batches, group, world)
    assert sorted(b for s in shards for b in s) == list(range(num_batches))
    for r, s in enumerate(shards):
        assert s == sorted(s)
        assert all((b // group) % world == r for b in s)  # the group's rank, round robin
    with pytest.raises(ValueError, match="group >= 1"):
        shard_batches(4, 0, 2)


def tiny_engine(checkpoint, **overrides) -> Inverter:
    """The engine of the runs below (``overrides``: config fields), before its start."""
    model = MAE.from_pretrained(checkpoint).float()
    stats = load_feature_stats(Path(checkpoint) / "stats.safetensors", model, "xray")
    config = InversionConfig.from_profile("quick", "xray", seed=0, **(SETTINGS | overrides))
    return Inverter(model, stats, config, device="cpu")


def _engine(checkpoint) -> Inverter:
    inv = tiny_engine(checkpoint)
    inv.start(NUM_SAMPLES)
    return inv


@pytest.mark.parametrize("alpha_rep", [0.0, pytest.param(0.1, marks=pytest.mark.slow)])
def test_generate_shared_gives_every_rank_the_whole_run(checkpoint, tmp_path, alpha_rep):
    from safetensors.torch import load_file

    ranks = launch([str(WORKER), "generate", str(tmp_path / "r"), str(checkpoint), str(alpha_rep)])
    assert [r.returncode for r in ranks] == [0, 0], [r.err for r in ranks]
    got = [load_file(str(tmp_path / f"r.{q}")) for q in range(2)]
    for q, g in enumerate(got):  # each rank ran its share, and returns every batch in order
        assert g["ran"].tolist() == shard_batches(NUM_BATCHES, 2, 2)[q]
        assert g["index"].tolist() == list(range(NUM_BATCHES)) and g["images"].shape[0] == NUM_SAMPLES
    for key in ("images", "embeddings", "pool"):  # the same on both ranks, bit for bit
        assert torch.equal(got[0][key], got[1][key]), key
    inv = tiny_engine(checkpoint, alpha_rep=alpha_rep)
    one = inv.generate(NUM_SAMPLES)
    assert torch.unique(one.images.flatten(1), dim=0).shape[0] == NUM_SAMPLES
    if alpha_rep == 0:  # each batch's seeds are its own: one process's samples, bit for bit
        assert torch.equal(got[0]["images"], one.images)
    else:  # within a round the batches do not repel each other; the pool holds the same batches
        assert not torch.equal(got[0]["images"], one.images)
        assert got[0]["pool"].shape == inv.pool.features().shape


def _samples(out, first: int, count: int) -> np.ndarray:
    return np.stack([np.load(out / "samples" / f"xray_{i:05d}.npy") for i in range(first, first + count)])


def test_two_ranks_write_every_sample_once_and_one_manifest(two_rank_run, checkpoint):
    out, r = two_rank_run
    assert r.returncode == 0, r.err
    assert r.out.count("wrote 18 synthetic xray images") == 1  # rank 0 reports, once
    assert f"wrote 18 synthetic xray images to {out} (9 batches on 2 ranks" in r.out
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["world_size"] == 2 and m["resume_state"] is None
    assert [b["index"] for b in m["batches"]] == list(range(NUM_BATCHES))
    assert [b["rank"] for b in m["batches"]] == [0, 0, 1, 1, 0, 0, 1, 1, 0]
    assert [b["fresh_generator"] for b in m["batches"]] == [True, False] * 4 + [True]
    names = [n for b in m["batches"] for n in b["samples"]]
    assert names == [f"samples/xray_{i:05d}.npy" for i in range(NUM_SAMPLES)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [n.split("/")[1] for n in names]
    assert len(list((out / "png").iterdir())) == NUM_SAMPLES
    x = _samples(out, 0, NUM_SAMPLES).reshape(NUM_SAMPLES, -1)
    assert len({row.tobytes() for row in x}) == NUM_SAMPLES  # all distinct
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "metrics.jsonl",
        "png",
        "preview.png",
        "samples",
    ]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 alone writes the log: the lines of its own batches (1, 2, 5, 6, 9), steps counted over the run.
    assert [e["batch"] for e in logged if e["event"] == "batch"] == [1, 2, 5, 6, 9]
    assert m["quality"]["num_samples"] == NUM_SAMPLES

    # A batch's seeds come from its global index: rank 1's first batch (2) is what one process makes
    # of batch 2 with an empty pool. Its second (3) continues that generator against the pool of
    # round 0: batches 0 and 2 pushed in that order, so rank 0's features reached rank 1's pool.
    b0 = _engine(checkpoint).invert_batch(0, 2)
    np.testing.assert_array_equal(_samples(out, 0, 2), b0.images.numpy())
    inv = _engine(checkpoint)
    empty = copy.deepcopy(inv.pool)
    b2 = inv.invert_batch(2, 2)
    np.testing.assert_array_equal(_samples(out, 4, 2), b2.images.numpy())
    alone = copy.deepcopy(inv)  # its pool holds batch 2 only
    inv.pool = empty
    for result in (b0, b2):
        inv.pool.push(result.embeddings)
    np.testing.assert_array_equal(_samples(out, 6, 2), inv.invert_batch(3, 2).images.numpy())
    assert not np.array_equal(_samples(out, 6, 2), alone.invert_batch(3, 2).images.numpy())


def _launch_ranks(args: list[str], env: dict) -> list[subprocess.Popen]:
    """Two ranks started without torchrun's agent, so the survivor of a kill stops by itself."""
    port = free_port()
    procs = []
    for r in range(2):
        e = base_env(env) | {
            "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=e,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def batch_losses(log: bytes) -> dict[int, dict]:
    """Batch number -> final losses, from a ``metrics.jsonl`` (the last line of a batch run twice)."""
    lines = [json.loads(line) for line in log.decode().splitlines()]
    return {e["batch"]: e["losses"] for e in lines if e["event"] == "batch"}


@pytest.mark.slow
def test_a_folder_error_stops_both_ranks_with_code_2(checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    procs = _launch_ranks(invert_args(checkpoint, out), {})
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    for _, err in results:
        assert "is not empty; choose an empty or new folder for --out" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_resume_after_a_rank_is_killed_gives_the_uninterrupted_files(checkpoint, two_rank_run, tmp_path):
    whole, r = two_rank_run
    assert r.returncode == 0, r.err
    cut = tmp_path / "cut"
    procs = _launch_ranks(invert_args(checkpoint, cut), {distributed.TIMEOUT_ENV: "30"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and procs[1].poll() is None:
        p = progress_path(cut, 1)
        if p.is_file() and json.loads(p.read_text())["rounds"] >= 2:
            break
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGSTOP)  # frozen at once: no round can finish after this check
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert procs[0].returncode == 1, err
    assert "rank 0 of 2" in err and "another rank stopped" in err and "--resume" in err
    assert "Traceback" not in err and time.monotonic() - killed < 60
    assert not json.loads((cut / "manifest.json").read_text())["complete"]

    # The kill can fall between a round's exchange and a rank's record of it: rewind the rank that
    # is ahead by one round, as if it had died there; the other then redoes that round.
    progress = [json.loads(progress_path(cut, q).read_text()) for q in range(2)]
    ahead = 1 if progress[1]["rounds"] >= progress[0]["rounds"] else 0
    p = progress[ahead]
    assert p["rounds"] >= 2
    rewound = p | {
        "rounds": p["rounds"] - 1,
        "batches": [b for b in p["batches"] if b["round"] < p["rounds"] - 1],
        "states": p["states"][:-1],
    }
    progress_path(cut, ahead).write_text(json.dumps(rewound))
    start = min(rewound["rounds"], progress[1 - ahead]["rounds"])

    # One process cannot continue a two-rank run.
    single = CliRunner().invoke(main, [*invert_args(checkpoint, cut)[2:], "--resume"])
    assert single.exit_code == 2 and "made by 2 process(es) and this launch has 1" in single.output
    # A rank without the state it needs stops both ranks with exit 2, and nothing changes.
    need = cut / state_name(0, start - 1)
    need.rename(need.with_name("aside"))
    before = {k: v for k, v in files_of(cut).items() if not k.endswith(".tmp")}  # a killed write's
    procs = _launch_ranks([*invert_args(checkpoint, cut), "--resume"], {})
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    assert all(f"its state file {state_name(0, start - 1)} is missing" in err for _, err in results)
    assert files_of(cut) == before  # only the temporary files of the killed writes are gone
    need.with_name("aside").rename(need)

    r = torchrun([*invert_args(checkpoint, cut), "--resume"])
    assert r.returncode == 0, r.err
    redone = sum(len(s[start:]) for s in shard_batches(NUM_BATCHES, 2, 2))
    assert f"{redone} of {NUM_BATCHES} batches run on 2 ranks" in r.out
    # Every file equal byte for byte; the run log's times differ, its losses per batch do not.
    cut_files, whole_files = files_of(cut), files_of(whole)
    cut_log, whole_log = (batch_losses(f.pop("metrics.jsonl")) for f in (cut_files, whole_files))
    assert cut_files == whole_files
    m, w = (json.loads((o / "manifest.json").read_text()) for o in (cut, whole))
    assert cut_log == whole_log  # rank 0 writes the log, with its own batches
    assert sorted(whole_log) == sorted(b["index"] + 1 for b in w["batches"] if b["rank"] == 0)
    assert m["complete"] and [(b["index"], b["rank"]) for b in m["batches"]] == [
        (b["index"], b["rank"]) for b in w["batches"]
    ]
    assert not (cut / "ranks").exists() and not (cut / "state").exists() and not list(cut.rglob("*.tmp"))

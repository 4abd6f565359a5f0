"""What one rank does in tests/distributed/test_distributed.py: ``python worker.py TASK OUT_JSON``.

Tasks:
- ``gather``: join the group, gather tensors of uneven length and objects, broadcast, barrier, merge
  ``RunningStats`` of this rank's shard with ``all_reduce``; write what it saw to ``OUT_JSON.RANK``.
- ``stats``: :func:`collect_feature_stats` of a tiny model over a shard each; rank 0 writes ``OUT_JSON``.
- ``die``: rank 1 exits abruptly after joining; rank 0 then enters a collective, which must fail with
  :class:`DistributedError` (exit code 3 and its message on stderr) instead of hanging.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from invcoss import distributed
from invcoss.ops import RunningStats


def gather(out: str) -> None:
    ctx = distributed.init_from_env("cpu")
    r, w = ctx.rank, ctx.world_size
    parts = distributed.all_gather_tensors(torch.full((r + 1, 2), float(r)))
    objs = distributed.all_gather_object({"rank": r})
    sent = distributed.broadcast_object(f"from {r}")
    distributed.barrier()
    data = torch.arange(11 * 3, dtype=torch.float64).reshape(11, 3) ** 1.5
    rs = RunningStats((3,))
    rs.update(data[list(distributed.shard_indices(11, r, w))])
    rs.all_reduce()
    total = distributed.all_reduce_sum(torch.tensor([float(r)]))
    record = {
        "ctx": [ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, str(ctx.device)],
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "main": distributed.is_main(),
        "parts": [p.tolist() for p in parts],
        "objs": objs,
        "sent": sent,
        "count": rs.count,
        "mean": rs.mean.tolist(),
        "var": rs.var.tolist(),
        "sum": total.item(),
    }
    distributed.destroy(ctx)
    with open(f"{out}.{r}", "w") as f:
        json.dump(record, f)


def stats(out: str) -> None:
    """collect_feature_stats on this rank's shard of 7 samples in batches of 3; rank 0 writes OUT."""
    from invcoss.feature_stats import collect_feature_stats
    from invcoss.models import create_model

    ctx = distributed.init_from_env("cpu")
    torch.manual_seed(3)
    model = create_model("vit_nano", img_size_2d=32)
    data = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    result = collect_feature_stats(model, data, modality="xray", batch_size=3, out=out)
    assert result.count == 7 and os.path.exists(out)  # every rank returns the whole and sees the file
    distributed.destroy(ctx)


def tiny_pretrain(out, epochs: int, resume: bool = False, on_step=None):
    """The run every pretrain test compares: 10 samples in global batches of 5 (parts of 3 and 2 on 2 ranks)."""
    from invcoss.models import create_model
    from invcoss.pretrain import PretrainConfig, pretrain

    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32)
    data = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    cfg = PretrainConfig(epochs=epochs, batch_size=5, lr=1e-3, warmup_epochs=1)
    result = pretrain(model, data, out, cfg, modality="xray", resume=resume, device="cpu", on_step=on_step)
    return model, result


def train(out: str) -> None:
    """``train OUT EPOCHS [resume] [kill]``: tiny_pretrain on this rank; writes its weights to OUT.rank.RANK.

    ``kill``: rank 1 exits abruptly at the first step of epoch 2; rank 0 must then stop with
    :class:`DistributedError` (exit 3) and leave epoch 1's checkpoint.
    """
    from safetensors.torch import save_file

    epochs, flags = int(sys.argv[3]), sys.argv[4:]
    ctx = distributed.init_from_env("cpu")

    def on_step(step) -> None:
        if "kill" in flags and ctx.rank == 1 and step.epoch == 2:
            os._exit(9)

    try:
        with distributed.failures_explained("pretrain"):
            model, result = tiny_pretrain(out, epochs, "resume" in flags, on_step)
    except distributed.DistributedError as e:
        print(e, file=sys.stderr)
        distributed.destroy(ctx)
        sys.exit(3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.rank.{ctx.rank}")
    with open(f"{out}.losses.{ctx.rank}", "w") as f:
        json.dump(result.losses, f)
    distributed.destroy(ctx)


# The tiny inversion of tiny_continual's invcoss runs: 4 samples in batches of 2, a generator each,
# no repulsion (so the buffer does not depend on the number of ranks).
TINY_INVERSION = dict(
    buffer_fraction=0.5, inversion_batch_size=2, inversion_steps=2, inversion_warmup_steps=2,
    inversion_overrides=(
        ("alpha_rep", 0.0), ("generator_every", 1), ("min_batch_size", 1), ("latent_dim", 8),
        ("generator_channels", (8, 8, 4)),
    ),
)  # fmt: skip


def tiny_continual(out, method: str = "er"):
    """The continual run the tests compare: xray then pathology, 8 samples each, global batches of 4."""
    from invcoss.continual import ContinualConfig, run_continual

    cfg = ContinualConfig.from_profile(
        "quick", method=method, order=("xray", "pathology"), img_size_2d=32, epochs=1, batch_size=4,
        stats_batch_size=4, buffer_fraction=0.25,
    )  # fmt: skip
    if method == "invcoss":
        cfg = cfg.replace(**TINY_INVERSION)
    g = torch.Generator().manual_seed(11)
    data = {"xray": torch.rand(8, 3, 32, 32, generator=g), "pathology": torch.rand(8, 3, 32, 32, generator=g)}
    return run_continual(data, out, cfg, device="cpu")


def continual(out: str) -> None:
    """``continual OUT [METHOD]``: tiny_continual on this rank (rank 0 writes OUT)."""
    ctx = distributed.init_from_env("cpu")
    tiny_continual(out, *sys.argv[3:4])
    distributed.destroy(ctx)


def generate(out: str) -> None:
    """``generate OUT CHECKPOINT ALPHA_REP``: generate_shared of the tiny X-ray engine of
    tests/inversion/test_invert_torchrun.py; each rank saves what it returns and the batches it ran
    to OUT.RANK."""
    from safetensors.torch import save_file

    from invcoss.inversion.shards import generate_shared
    from tests.inversion.test_invert_torchrun import NUM_SAMPLES, tiny_engine

    ctx = distributed.init_from_env("cpu")
    inv = tiny_engine(sys.argv[3], alpha_rep=float(sys.argv[4]))
    ran = set()
    result = generate_shared(inv, NUM_SAMPLES, on_step=lambda info: ran.add(info.batch))
    save_file(
        {
            "images": result.images,
            "embeddings": result.embeddings,
            "index": torch.tensor([b.index for b in result.batches]),
            "ran": torch.tensor(sorted(ran)),
            "pool": inv.pool.features().contiguous(),
        },
        f"{out}.{ctx.rank}",
    )
    distributed.destroy(ctx)


def leave(out: str) -> None:
    """``leave -``: join the group, then exit abruptly (code 9) without a word to the others."""
    distributed.init_from_env("cpu")
    os._exit(9)


def die(out: str) -> None:
    ctx = distributed.init_from_env("cpu")
    distributed.barrier()
    if ctx.rank == 1:
        os._exit(9)
    try:
        distributed.all_gather_tensors(torch.zeros(1000, 10))
        distributed.barrier()
    except distributed.DistributedError as e:
        print(e, file=sys.stderr)
        distributed.destroy(ctx)
        sys.exit(3)


if __name__ == "__main__":
    {
        "gather": gather,
        "stats": stats,
        "train": train,
        "continual": continual,
        "generate": generate,
        "leave": leave,
        "die": die,
    }[sys.argv[1]](sys.argv[2])

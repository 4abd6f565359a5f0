"""What one rank does in tests/distributed/test_distributed.py: ``python worker.py TASK OUT_JSON``.

Tasks:
- ``gather``: join the group, gather tensors of uneven length and objects, broadcast, barrier, merge
  ``RunningStats`` of this rank's shard with ``all_reduce``; write what it saw to ``OUT_JSON.RANK``.
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
    {"gather": gather, "die": die}[sys.argv[1]](sys.argv[2])

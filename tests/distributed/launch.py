"""Start a command as the ranks of a multi-process run on this machine, with the gloo backend.

:func:`launch` sets the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and starts one subprocess per rank, without torchrun's agent, so
that a test sees what a rank does on its own when a peer dies (torchrun's agent would kill it).
:func:`torchrun` starts the real launcher (``python -m torch.distributed.run``). Both pin one
thread per rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


@dataclass
class Rank:
    returncode: int
    out: str
    err: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    env.update(extra or {})
    return env


def launch(
    args: list[str],
    world: int = 2,
    env: dict | None = None,
    timeout: float = 120,
    rank_args: dict | None = None,
) -> list[Rank]:
    """Run ``python ARGS`` as ranks 0..world-1 of one group; returns each rank's exit code and output.

    ``rank_args``: ``{rank: ARGS}`` for ranks that run something else.
    """
    port = free_port()
    procs = []
    for r in range(world):
        e = base_env(env)
        e.update(
            RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *(rank_args or {}).get(r, args)],
                env=e,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    ranks = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            ranks.append(Rank(p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ranks


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 180) -> Rank:
    """``python -m torch.distributed.run --nproc-per-node NPROC ARGS`` on a free port."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        *args,
    ]
    p = subprocess.run(cmd, env=base_env(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return Rank(p.returncode, p.stdout, p.stderr)

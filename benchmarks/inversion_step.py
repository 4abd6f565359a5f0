"""Steps per second of an inversion step: reference ops, fused ops, the default and the compiled step.

Usage::

    python benchmarks/inversion_step.py [--device cpu|cuda] [--profile NAME ...] [--steps N]
                                        [--no-compiled] [--out FILE.md [--overwrite]]
                                        [--deadline SECONDS]

The measurement is the harness's (:mod:`invcoss.benchmark.inversion`: one step of
:meth:`invcoss.inversion.Inverter.step_async` per step variant, round-robin, with samples per hour
and the compile time apart); this script only adds the options. ``--no-compiled`` leaves out the
CPU's compiled row (minutes of compilation per profile when inductor's cache is cold).
Profiles (``invcoss.benchmark.INVERSION_PROFILES``): on CPU the reduced ones by default, on CUDA the
paper's (vit_base; 3D batch 48 at 16x192x192, 2D batch 320 at 224x224). ``--deadline`` stops
starting new rows after that many seconds, so a time-limited GPU session still writes what it
measured. An existing ``--out`` file (or its ``.json``) is kept, with exit 2 before any timing,
unless ``--overwrite``. ``invcoss-cli bench --family inversion`` times the default profiles through the same
harness (with torch's default matmul precision on CUDA, where this script allows tf32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from invcoss import benchmark as bm
from invcoss.data.atomic import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--profile", action="append", choices=sorted(bm.INVERSION_PROFILES), help="repeatable"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row (default 2)")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the CPU's compiled row")
    parser.add_argument("--out", type=Path, help="write the table to OUT (Markdown) and OUT with .json")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new row starts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json")
    args = parser.parse_args(argv)
    if args.out is not None and not args.overwrite:
        for target in (args.out, args.out.with_suffix(".json")):
            if target.exists():
                parser.error(f"{target} exists; pass --overwrite to replace it, or choose another --out")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda asked for, but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True  # the same for every row
        torch.backends.cudnn.allow_tf32 = True
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    names = args.profile or bm.INVERSION.profiles_for(device)
    backends = bm.INVERSION.variants(device, compiled=False if args.no_compiled else None)
    t0 = time.monotonic()
    rows = []
    for name in names:
        if args.deadline is not None and time.monotonic() - t0 > args.deadline:
            print(f"deadline of {args.deadline:.0f} s reached: {name} not measured", file=sys.stderr)
            break
        rows += bm.time_inversion(
            bm.INVERSION_PROFILES[name],
            device,
            backends,
            steps=args.steps,
            warmup=args.warmup,
            progress=lambda s: print(f"timing {s}", file=sys.stderr, flush=True),
        )
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    md = bm.inversion_markdown(rows, f"inversion step ({where}), torch {torch.__version__}")
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, md.encode())
        atomic_write_bytes(args.out.with_suffix(".json"), json.dumps(rows, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The steps of the GPU check (``benchmarks/gpu_check.sh``), one command each, records as they go.

Usage::

    python -m invcoss.benchmark.check STEP --out DIR [--rehearse] [--deadline S] [--jobs N]

Steps, in the order the script runs them (most valuable first):

- ``env``: the machine, versions and backends, one line in ``meta.jsonl``; exits 3 with one clear
  line when a backend the device should have (``cuda`` and ``triton`` on a GPU) is missing, and 4
  when there is no CUDA device at all (the script then stops).
- ``warm``: compiles, in parallel on every core, every Triton kernel specialisation and autotune
  configuration the later steps use, by running them once in worker processes: the device tests
  (sharded), every benchmark case in each dtype and mode, the torch.compile rows and the inversion
  step. Compiled kernels (and, with ``TRITON_CACHE_AUTOTUNING=1``, the autotuner's choices) land
  in the on-disk caches the later steps read, so nothing is compiled on their clock. The trade-off:
  the autotuner times its candidates while other warm-up processes share the GPU, so between
  configurations within a few percent of each other it may keep one that is not the fastest on a
  quiet device (tuning again on the clock would cost about a minute of the sweep's budget).
- ``roofs``: the device-to-device copy bandwidth and the bf16 matmul rate, one line each.
- ``sweep``: every op case in fp32 and bf16, forward and forward+backward, for the eager reference
  and every kernel backend; timed with CUDA events after an L2 flush (:func:`invcoss.benchmark.time_cuda`).
- ``compile``: the same rows for ``torch.compile`` of the reference.
- ``inversion``: the whole inversion step at the paper's profile: eager fp32 on the reference ops
  and on the fused ops, the default step (compiled, bf16) and, in the rehearsal, the Triton ops;
  steps/s, samples/h, the compile time apart and the model FLOP utilisation against the bf16
  matmul rate of ``roofs``.

``--rehearse`` runs the same mechanics on this CPU: Triton under the interpreter, tiny cases, the
``cpu`` backend in place of ``cuda``. ``--deadline`` (default: ``INVCOSS_STEP_DEADLINE`` from the
script) stops starting new rows after that many seconds; each row is appended to its JSON-lines
file (:mod:`invcoss.benchmark.records`) the moment it is measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from invcoss.benchmark.records import FILES, append_record

STEPS = ("env", "warm", "roofs", "sweep", "compile", "inversion")
DTYPES = ("float32", "bfloat16")
# The device tests: the op tests marked `device`, on the tensors of INVCOSS_TEST_DEVICE (which the
# script sets: cuda on the GPU, cpu in the rehearsal). The rehearsal keeps to a subset the
# interpreter runs in seconds: every op in fp32, bf16 and fp16 in the contiguous layout, determinism,
# NaN propagation and the build. benchmarks/gpu_check.sh selects the same for its tests step.
DEVICE_TESTS = ("tests/ops", "-m", "device")
REHEARSAL_TESTS = "contiguous and not fp64 or deterministic or nonfinite or build"


def check_cases(rehearse: bool):
    """The op cases of the sweep: the paper's shapes and larger, most valuable first.

    On a GPU every fp32 input but one is several times the 50-60 MB L2 of an H200 (and each timed
    call starts after an L2 flush anyway); the rehearsal uses tiny shapes the interpreter runs fast.
    """
    from invcoss.benchmark import Case, tiny_cases

    if rehearse:
        return tiny_cases()
    return [
        # The cases of the GPU targets (invcoss.benchmark.targets) first: at least 4x the L2.
        Case("tv", (128, 1, 16, 192, 192), "large"),  # 302 MB fp32
        Case("stat_matching", (512, 197, 768), "large"),  # 310 MB
        Case("welford", (512, 197, 768)),
        Case("repulsive_direct", (320, 16384, 768)),
        Case("repulsive_direct", (320, 100_000, 768)),  # pool 307 MB
        Case("tv", (512, 3, 224, 224), "large"),  # 308 MB
        # The paper's shapes.
        Case("tv", (48, 1, 16, 192, 192), "paper"),  # 113 MB
        Case("stat_matching", (320, 197, 768), "paper"),  # 194 MB
        Case("repulsive_pool", (320, 100_000, 768)),
        Case("tv", (320, 3, 224, 224), "paper"),  # 193 MB
        Case("stat_matching", (48, 145, 768), "paper"),  # 21 MB: L2-sized, flushed before each call
    ]


def compile_cases(rehearse: bool):
    """The cases of the torch.compile rows: all of them, or one in the rehearsal (inductor's C++
    compile of each graph takes seconds on a CPU)."""
    cases = check_cases(rehearse)
    return cases[:1] if rehearse else cases


def device_for(rehearse: bool):
    import torch

    return torch.device("cpu" if rehearse else "cuda")


def required_backends(rehearse: bool) -> list[str]:
    """The fused backends the check's device must have (the rehearsal's stand-ins on CPU)."""
    return ["cpu", "triton"] if rehearse else ["cuda", "triton"]


class Clock:
    """Seconds left before ``deadline`` (None: no limit); steps stop starting rows when it runs out."""

    def __init__(self, deadline: float | None) -> None:
        self.t0 = time.monotonic()
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - (time.monotonic() - self.t0)

    def expired(self) -> bool:
        return self.left() <= 0


# ---- env -------------------------------------------------------------------------------------------


def step_env(args: argparse.Namespace) -> int:
    import torch

    from invcoss.cli.info import collect_info
    from invcoss.ops.dispatch import unavailable_reason

    info = collect_info()
    device = device_for(args.rehearse)
    record = {"step": "env", "rehearse": args.rehearse, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
    record["commit"] = _git_commit()
    if device.type == "cuda":
        if not torch.cuda.is_available():  # fatal: the script stops here (exit status 4)
            print("gpu_check: FAILED: torch sees no CUDA device", flush=True)
            append_record(args.out / FILES["meta"], {**record, "error": "no CUDA device"})
            return 4
        props = torch.cuda.get_device_properties(device)
        record["gpu"] = {
            "name": props.name,
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "capability": f"{props.major}.{props.minor}",
        }
    wanted = required_backends(args.rehearse)
    if args.skip_extension:  # the first env step runs while the extension is still to be built
        wanted = [b for b in wanted if b == "triton"]
    missing = {b: unavailable_reason(b) for b in wanted}
    missing = {b: why for b, why in missing.items() if why is not None}
    record["missing_backends"] = missing
    append_record(args.out / FILES["meta"], record)
    print(f"{info['torch']=} {info['triton']=} backends={info['backends']}", flush=True)
    if missing:
        why = "; ".join(f"{b}: {w}" for b, w in missing.items())
        print(f"gpu_check: FAILED: backend(s) missing on {device.type}: {why}", flush=True)
        return 3
    return 0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---- warm ------------------------------------------------------------------------------------------


def warm_jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(label, command)`` of every warm-up job, in the order they start.

    The timed steps' kernels first (the sweep's Triton rows and the inversion step), beside the
    device tests in half as many shards as workers; the torch.compile graphs last (the step after
    the timed sweep, and the longest compiles). The extension may still be building meanwhile, so
    only the Triton tests warm up (the CUDA kernels are compiled already once it exists).
    """
    py = sys.executable
    base = [py, "-m", "invcoss.benchmark.check"]
    common = ["--out", str(args.out)] + (["--rehearse"] if args.rehearse else [])
    cases = check_cases(args.rehearse)
    timed = [
        (f"sweep {case.name} triton", base + ["warm-case", case.name, "--providers", "triton"] + common)
        for case in cases
    ]
    timed.append(("inversion triton", base + ["warm-inversion", "all"] + common))
    ids = collect_test_ids("triton")
    n_shards = max(1, min(args.jobs // 2 or 1, len(ids)))
    shards = []
    for i in range(n_shards):
        part = ids[i::n_shards]
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "invcoss.benchmark.pytest_records"]
        cmd += ["--records", str(args.out / FILES["tests"]), "--records-step", "warm", *part]
        shards.append((f"tests shard {i + 1}/{n_shards} ({len(part)} tests)", cmd))
    jobs = []
    for i in range(max(len(timed), len(shards))):  # interleaved: both kinds start at once
        jobs += timed[i : i + 1] + shards[i : i + 1]
    for case in compile_cases(args.rehearse):
        jobs.append(
            (f"sweep {case.name} compile", base + ["warm-case", case.name, "--providers", "compile"] + common)
        )
    return jobs


def collect_test_ids(keyword: str) -> list[str]:
    """Node ids of the device tests matching the pytest ``-k`` expression ``keyword``."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    if os.environ.get("INVCOSS_TEST_DEVICE") == "cpu":  # the rehearsal
        keyword = f"({keyword}) and ({REHEARSAL_TESTS})"
    proc = subprocess.run([*cmd, *DEVICE_TESTS, "-k", keyword], capture_output=True, text=True)
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def step_warm(args: argparse.Namespace) -> int:
    clock = Clock(args.deadline)
    jobs = warm_jobs(args)
    print(f"warm: {len(jobs)} jobs on {args.jobs} workers", flush=True)

    # Several compiling processes share the cores: inductor's own worker pools stay small. The
    # extension may be half-written by the build running beside this step, and no warm job needs
    # it: they leave it unloaded.
    env = {
        **os.environ,
        "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "2"),
        "INVCOSS_DISABLE_EXTENSION": "1",
    }

    def run(job: tuple[str, list[str]]) -> bool:
        label, cmd = job
        # A test shard has done its warming when its tests ran, failing ones included (exit 1:
        # failures are the tests step's to report); any other job only when it exits 0.
        ok_codes = (0, 1) if label.startswith("tests shard") else (0,)
        left = clock.left()
        if left <= 1:
            record = {"step": "warm", "job": label, "rc": None, "ok": False, "seconds": 0}
            append_record(args.out / FILES["tests"], record)
            return False
        t0 = time.monotonic()
        try:
            timeout = None if left == float("inf") else left
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            rc, tail = -9, ["killed at the step's deadline"]
        seconds = round(time.monotonic() - t0, 1)
        append_record(
            args.out / FILES["tests"],
            {"step": "warm", "job": label, "rc": rc, "ok": rc in ok_codes, "seconds": seconds, "tail": tail},
        )
        print(f"warm: {label}: exit {rc} after {seconds} s", flush=True)
        return rc in ok_codes

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(run, jobs))
    broken = [label for (label, _), ok in zip(jobs, done) if not ok]
    if broken:
        print(f"warm: {len(broken)} job(s) did not complete: {', '.join(broken)}", flush=True)
    return 1 if broken else 0


def step_warm_case(args: argparse.Namespace) -> int:
    """Run one case once for each provider, dtype and mode (compiles and autotunes its kernels)."""
    import torch

    from invcoss import benchmark as bm

    cases = {c.name: c for c in check_cases(args.rehearse)}
    if args.name not in cases:
        print(f"warm-case: unknown case {args.name!r}; expected one of {', '.join(cases)}", flush=True)
        return 2
    case = cases[args.name]
    device = device_for(args.rehearse)
    for dtype in args.dtypes:
        inputs = bm.make_inputs(case, device, getattr(torch, dtype))
        for mode in case.modes:
            for provider in args.providers:
                fn = bm.build(case, provider, mode, inputs)
                fn(), fn()
    return 0


def step_warm_inversion(args: argparse.Namespace) -> int:
    """Two steps of the Triton and of the default (compiled on a GPU) inversion step of every
    profile the inversion step times, one after another: the compiled step lands in inductor's
    on-disk cache, so the timed step loads it instead of compiling on its clock."""
    import torch

    from invcoss import benchmark as bm

    device = device_for(args.rehearse)
    default = next(v for v in bm.INVERSION.variants(device, compiled=False) if v.name == "default")
    for name in inversion_profiles(args.rehearse):
        for backend, overrides in (("triton", bm.PLAIN_STEP), (default.backend, default.overrides)):
            inv, step = bm.inversion_setup(bm.INVERSION_PROFILES[name], device, backend, overrides=overrides)
            step(), step()
            del inv, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


# ---- roofs, sweep, compile, inversion -----------------------------------------------------------


def step_roofs(args: argparse.Namespace) -> int:
    """Measure the copy bandwidth and the bf16 matmul rate; one record each."""
    import torch

    from invcoss import benchmark as bm

    device = device_for(args.rehearse)
    # 1 GiB copied (2 GiB moved) on a GPU, far beyond its L2; 64 MB in the rehearsal.
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    append_record(args.out / FILES["roofs"], bm.copy_roof(device, n, reps=20, warmup=3))
    m, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    append_record(args.out / FILES["roofs"], bm.matmul_roof(device, m, dtype, reps=10, warmup=3))
    return 0


def step_sweep(args: argparse.Namespace) -> int:
    """Time every (case, dtype, mode, provider) and append each row the moment it is measured."""
    import torch

    from invcoss import benchmark as bm

    clock = Clock(args.deadline)
    device = device_for(args.rehearse)
    providers = args.providers or ["eager"] + [b for b in required_backends(args.rehearse)]
    from invcoss import ops

    available = set(ops.available_backends()) | {"eager", "compile"}
    unknown = [p for p in providers if p not in available]
    if unknown:
        print(f"gpu_check: FAILED: provider(s) {unknown} not available on {device}", flush=True)
        return 3
    reps = args.reps or (20 if device.type == "cuda" else 3)
    cases = compile_cases(args.rehearse) if args.step == "compile" else check_cases(args.rehearse)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    done = 0
    for row, times in bm.measure_rows(cases, providers, device, dtypes, reps, stop=clock.expired):
        append_record(args.out / FILES["bench"], {"step": args.step, **asdict(row), "times_ms": times})
        done += 1
        print(f"{row.case} {row.mode} {row.dtype} {row.provider}: {row.median_ms:.3f} ms", flush=True)
    skipped = sum(len(case.modes) for case in cases) * len(dtypes) * len(providers) - done
    if skipped:
        print(f"{args.step}: deadline reached, {skipped} row(s) not measured", flush=True)
    if done == 0:
        print(f"gpu_check: FAILED: step {args.step} measured no row", flush=True)
        return 1
    return 0


def inversion_profiles(rehearse: bool) -> list[str]:
    """The profiles of the inversion step: the tiny one in the rehearsal (the interpreter steps
    through it in seconds), the paper's on the GPU."""
    from invcoss import benchmark as bm

    return ["tiny"] if rehearse else bm.inversion_profiles_for("cuda")


def inversion_variants(rehearse: bool):
    """The rows of the inversion step: eager fp32 on the reference and the fused ops, then the
    default step (compiled bf16 on a GPU); the rehearsal adds the Triton ops (the interpreter)."""
    from invcoss import benchmark as bm

    device = device_for(rehearse)
    rows = bm.INVERSION.variants(device, compiled=False)
    if rehearse:
        rows.append(bm.StepVariant("triton", "triton", bm.PLAIN_STEP))
    return rows


def bf16_rate(out: Path, device) -> float:
    """The bf16 matmul rate (TFLOP/s) the roofs step recorded in ``out``, or measured now."""
    from invcoss import benchmark as bm
    from invcoss.benchmark.records import read_records

    roofs = [r for r in read_records(out / FILES["roofs"]) if r.get("roof") == "bf16_tflops"]
    if roofs:
        return float(roofs[-1]["value"])
    import torch

    m, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    return float(bm.matmul_roof(device, m, dtype, reps=10, warmup=3)["value"])


def step_inversion(args: argparse.Namespace) -> int:
    import torch

    from invcoss import benchmark as bm

    clock = Clock(args.deadline)
    device = device_for(args.rehearse)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the same for every row
        torch.backends.cudnn.allow_tf32 = True
    backends = inversion_variants(args.rehearse)
    rate = bf16_rate(args.out, device)
    done = 0
    for name in inversion_profiles(args.rehearse):
        if clock.expired():
            print(f"inversion: deadline reached, {name} not measured", flush=True)
            continue
        rows = bm.time_inversion(
            bm.INVERSION_PROFILES[name],
            device,
            backends,
            steps=args.steps,
            warmup=1 if args.rehearse else 2,  # the interpreter's Triton steps are slow
            progress=lambda s: print(f"timing {s}", flush=True),
            flops=True,
            bf16_tflops=rate,
        )
        for row in rows:
            append_record(args.out / FILES["inversion"], {"step": "inversion", **row})
        done += len(rows)
    if done == 0:
        print("gpu_check: FAILED: step inversion measured no row", flush=True)
        return 1
    return 0


# ---- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=(*STEPS, "warm-case", "warm-inversion"))
    parser.add_argument("name", nargs="?", help="the case (warm-case) or profile (warm-inversion)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the JSON-lines records")
    parser.add_argument("--rehearse", action="store_true", help="the same mechanics on CPU, tiny sizes")
    parser.add_argument(
        "--deadline", type=float, default=_env_deadline(), help="seconds before no new row starts"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="warm: parallel processes")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES))
    parser.add_argument("--providers", type=lambda s: s.split(","), default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed calls per row")
    parser.add_argument("--steps", type=int, default=3, help="inversion: timed steps per backend")
    parser.add_argument(
        "--skip-extension", action="store_true", help="env: do not require the extension's backend yet"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "compile":
        args.providers = ["compile"]
    if args.step in ("warm-case", "warm-inversion") and not args.name:
        parser.error(f"{args.step} needs a name")
    if args.step == "warm-case" and not args.providers:
        parser.error("warm-case needs --providers")
    handler = {
        "env": step_env,
        "warm": step_warm,
        "warm-case": step_warm_case,
        "warm-inversion": step_warm_inversion,
        "roofs": step_roofs,
        "sweep": step_sweep,
        "compile": step_sweep,
        "inversion": step_inversion,
    }[args.step]
    return handler(args)


def _env_deadline() -> float | None:
    value = os.environ.get("INVCOSS_STEP_DEADLINE")
    return float(value) if value else None


if __name__ == "__main__":
    sys.exit(main())

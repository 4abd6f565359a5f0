"""Render a GPU check folder (its JSON-lines records) into Markdown, and into the README.

Usage::

    python -m invcoss.benchmark.report DIR [--readme README.md] [--out FILE.md [--overwrite]]

Works on whatever a run left behind, a run killed half-way included: the tables show the records
that exist and say which steps are missing. The script runs it at the end of the check; run it
again here on the folder that came back (``--readme`` also replaces the README's section between
``<!-- gpu-check:begin -->`` and ``<!-- gpu-check:end -->``). The report goes to ``DIR/report.md``,
the folder's own rendering, rewritten on every call; an existing ``--out`` file elsewhere is kept
(exit 2) unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from invcoss.benchmark import Row, add_ratios, inversion_markdown, to_markdown
from invcoss.benchmark.inversion import inversion_verdicts
from invcoss.benchmark.records import FILES, read_records
from invcoss.data.atomic import atomic_write_bytes

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def load(folder: str | Path) -> dict[str, list[dict]]:
    """Every record of ``folder``, by kind (the keys of :data:`invcoss.benchmark.records.FILES`)."""
    return {kind: read_records(Path(folder) / name) for kind, name in FILES.items()}


def peaks_of(roofs: list[dict]) -> dict[str, float] | None:
    """``{"copy_gbps", "bf16_tflops"}`` from the roof records, or None when either is missing."""
    found = {r["roof"]: r["value"] for r in roofs if "roof" in r and "value" in r}
    if {"copy_gbps", "bf16_tflops"} <= set(found):
        return {k: found[k] for k in ("copy_gbps", "bf16_tflops")}
    return None


def bench_rows(records: list[dict]) -> list[Row]:
    """:class:`Row` objects of the benchmark records, with ratios across the sweep and compile steps."""
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in records if "case" in r]
    return add_ratios(rows)


def tests_summary(records: list[dict]) -> str:
    """Counts of test outcomes per step, the warm jobs, and every failure with its first line."""
    lines = ["| step | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    steps = sorted({r.get("step", "") for r in records if "test" in r})
    for step in steps:
        count = Counter(r["outcome"] for r in records if r.get("step") == step and "test" in r)
        lines.append(
            f"| {step} | {count['passed']} | {count['failed']} | {count['error']} | {count['skipped']} |"
        )
    jobs = [r for r in records if "job" in r]
    if jobs:
        ok = sum(1 for r in jobs if r.get("ok"))
        slow = max((r.get("seconds", 0) for r in jobs), default=0)
        lines += ["", f"Warm-up: {ok} of {len(jobs)} jobs completed (the longest took {slow:.0f} s)."]
    failed = [r for r in records if "test" in r and r["outcome"] in ("failed", "error")]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['test']}` ({r['step']}): {r.get('message', '')}" for r in failed[:40]]
        if len(failed) > 40:
            lines.append(f"- and {len(failed) - 40} more")
    return "\n".join(lines) + "\n"


def targets_section(rows: list[Row], peaks: dict[str, float] | None) -> str:
    """The GPU targets (:data:`~invcoss.benchmark.targets.GPU_TARGETS`) judged for every fused
    provider with rows on a CUDA device; empty for the CPU rehearsal (its cases are the tiny ones)."""
    from invcoss.benchmark.providers import REFERENCE_PROVIDERS
    from invcoss.benchmark.targets import GPU_TARGETS, judge, verdict_markdown

    rows = [r for r in rows if r.device.startswith("cuda")]
    if not rows:
        return ""
    providers = sorted({r.provider for r in rows} - set(REFERENCE_PROVIDERS))
    return verdict_markdown(judge(GPU_TARGETS, rows, peaks, providers), peaks, "Targets")


def render(folder: str | Path) -> str:
    """The Markdown report of one GPU check folder."""
    data = load(folder)
    envs = [r for r in data["meta"] if r.get("step") == "env"]
    env = envs[-1] if envs else {}  # the last one: after the extension was built
    gpu = env.get("gpu", {}).get("name") or ("CPU rehearsal" if env.get("rehearse") else "unknown device")
    title = (
        f"## GPU check: {gpu}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
        f"{env.get('date', '?')}"
    )
    out = [title, ""]
    if env.get("commit"):
        out += [f"Commit `{env['commit'][:12]}`.", ""]
    exits = [r for r in data["meta"] if r.get("step") == "exit"]
    if exits:
        out += ["| step | exit | seconds |", "|---|---:|---:|"]
        out += [f"| {r['name']} | {r['rc']} | {r.get('seconds', '')} |" for r in exits]
        out.append("")
    missing = [k for k in ("tests", "roofs", "bench", "inversion") if not data[k]]
    if missing:
        out += [f"No records for: {', '.join(missing)}.", ""]
    if data["tests"]:
        out += ["### Correctness on the device", "", tests_summary(data["tests"])]
    peaks = peaks_of(data["roofs"])
    if data["roofs"]:
        out += ["### Roofs", ""]
        out += [f"- {r['roof']}: {r['value']:.1f}" for r in data["roofs"] if "roof" in r]
        out.append("")
    rows = bench_rows(data["bench"])
    if rows:
        note = (
            "Minimum bytes and flops per call (`invcoss.benchmark.work`) over the CUDA-event time of "
            "the call after an L2 flush; % of the roofs measured in the same run."
        )
        out += [to_markdown(rows, "Ops", peaks), note, ""]
        out.append(targets_section(rows, peaks))
    if data["inversion"]:
        out.append(inversion_markdown(data["inversion"], "Inversion step"))
        out += [*inversion_verdicts(data["inversion"]), ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: str | Path, section: str) -> None:
    """Replace the text between the GPU-check markers of ``readme`` with ``section``."""
    path = Path(readme)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{section.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--readme", type=Path, help="also replace this README's GPU-check section")
    parser.add_argument("--out", type=Path, help="where to write the report (default FOLDER/report.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder {args.folder} does not exist")
    if args.out is not None and args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it, or choose another --out")
    md = render(args.folder)
    target = args.out or args.folder / "report.md"
    atomic_write_bytes(target, md.encode())
    if args.readme:
        update_readme(args.readme, md.replace("## GPU check", "#### GPU check", 1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

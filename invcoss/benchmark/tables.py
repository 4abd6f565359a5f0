"""Markdown tables of benchmark rows and inversion-step rows."""

from __future__ import annotations

from invcoss.benchmark.suite import Row


def to_markdown(rows: list[Row], title: str = "", peaks: dict[str, float] | None = None) -> str:
    """A Markdown table of rows (one line per case, mode, dtype and provider).

    With ``peaks`` (from :func:`~invcoss.benchmark.timing.measure_peaks`) it adds each row's minimum
    traffic as a fraction of the measured copy bandwidth, and its minimum flops as a fraction of the
    measured bf16 matmul rate.
    """
    lines = [f"### {title}", ""] if title else []
    if peaks:
        lines += [
            f"Measured roofs: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
            f"{peaks['bf16_tflops']:.1f} TFLOP/s.",
            "",
        ]
    head = "| case | mode | dtype | provider | median ms | GB/s | TFLOP/s | x eager | x compile |"
    rule = "|---|---|---|---|---:|---:|---:|---:|---:|"
    if peaks:
        head, rule = head + " % copy | % bf16 |", rule + "---:|---:|"
    lines += [head, rule]

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        line = (
            f"| {r.case} | {r.mode} | {r.dtype} | {r.provider} | {r.median_ms:.3f} | {fmt(r.gbps, '.1f')} | "
            f"{fmt(r.tflops, '.3f')} | {fmt(r.ratio_eager, '.2f')} | {fmt(r.ratio_compile, '.2f')} |"
        )
        if peaks:
            copy = None if r.gbps is None else 100 * r.gbps / peaks["copy_gbps"]
            mm = None if r.tflops is None else 100 * r.tflops / peaks["bf16_tflops"]
            line += f" {fmt(copy, '.0f')} | {fmt(mm, '.0f')} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def inversion_markdown(rows: list[dict], title: str = "") -> str:
    """A Markdown table of :func:`~invcoss.benchmark.inversion.time_inversion` rows."""
    lines = [f"### {title}", ""] if title else []
    mfu = any("mfu" in r for r in rows)
    head = (
        "| profile | model | batch | input | row | ops | step | median ms/step | steps/s | samples/h "
        "| compile s | x reference |"
    )
    rule = "|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|"
    if mfu:
        head, rule = head + " TFLOP/s | % bf16 (MFU) |", rule + "---:|---:|"
    lines += [head, rule]
    for r in rows:
        step = r.get("step") or {}
        how = ", ".join(
            v
            for v in (
                step.get("precision"),
                None if step.get("compile_mode") in (None, "off") else f"compiled ({step['compile_mode']})",
                "channels-last" if step.get("memory_format") == "channels_last" else None,
            )
            if v
        )
        samples = r.get("samples_per_h")
        line = (
            f"| {r['profile']} | {r['model']} | {r['batch']} | {r['input']} | {r['backend']} | "
            f"{r.get('ops', r['backend'])} | {how} | {r['median_ms']:.1f} | {r['steps_per_s']:.3f} | "
            f"{'' if samples is None else format(samples, '.4g')} | "
            f"{'' if 'compile_s' not in r else format(r['compile_s'], '.1f')} | {r['ratio']:.2f} |"
        )
        if mfu:
            tf, u = r.get("tflops"), r.get("mfu")
            line += f" {'' if tf is None else format(tf, '.1f')} | {'' if u is None else format(100 * u, '.0f')} |"
        lines.append(line)
    return "\n".join(lines) + "\n"

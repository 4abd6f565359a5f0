"""``invcoss-cli info``: versions, devices, backends and the extension build."""

from __future__ import annotations

import click

from invcoss.cli.output import echo_json, json_option


def collect_info() -> dict:
    """Everything ``info`` prints, as a dict (also saved next to outputs by other commands)."""
    import platform

    import torch

    from invcoss import __version__, _ext
    from invcoss.ops import backend_status

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - triton ships with CUDA builds of torch
        triton_version = f"not importable ({exc})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "invcoss": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "devices": devices,
        "extension": {
            "built": _ext.C is not None,
            "cpu kernels": _ext.C is not None,
            "cuda kernels": _ext.HAS_CUDA,
            "why not": _ext.IMPORT_ERROR or "",
            # What the build recorded ("" when unknown): the torch it must run with, OpenMP threads.
            "built against torch": _ext.BUILD_INFO.get("torch", ""),
            "openmp": _ext.BUILD_INFO.get("openmp", ""),
        },
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in backend_status().items()},
    }


def json_keys(value: object) -> object:
    """``value`` with every dict key in snake case (``"cuda (torch build)"`` -> ``"cuda_torch_build"``),
    the form ``--json`` prints so that jq paths need no quoting.

    Example:
        >>> json_keys({"cpu kernels": True, "why not": ""})
        {'cpu_kernels': True, 'why_not': ''}
    """
    import re

    if isinstance(value, dict):
        return {re.sub(r"[^0-9a-z]+", "_", str(k).lower()).strip("_"): json_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_keys(v) for v in value]
    return value


@click.command()
@json_option
@click.option(
    "--kernels",
    is_flag=True,
    help="Also compile every Triton kernel for sm_90 and print its resources, and those of the "
    "extension's sm_90 CUDA kernels.",
)
def info(kernels: bool, as_json: bool) -> None:
    """Print versions, devices, which backends run here (and why not), and the extension build.

    With --json: one JSON document of the same facts (keys: docs/cli.md), plus the default backend
    per device type; --kernels adds the kernel tables under ``kernels``.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from invcoss.ops import default_backend

    data = collect_info()
    if as_json:
        payload = json_keys(data)
        payload["default_backend"] = {
            "cpu": default_backend(torch.device("cpu")),
            "cuda": default_backend(torch.device("cuda")) if torch.cuda.is_available() else None,
        }
        if kernels:
            import dataclasses

            from invcoss.kernels.aot import kernel_table

            payload["kernels"] = {"triton": [dataclasses.asdict(r) for r in kernel_table()]}
            if data["extension"]["cuda kernels"]:
                from invcoss.kernels.sass import extension_table

                payload["kernels"]["cuda"] = [dataclasses.asdict(r) for r in extension_table()]
        echo_json(payload)
        return
    console = Console()
    head = Table(title="invcoss", show_header=False)
    for key in ("invcoss", "python", "torch", "triton", "cuda (torch build)"):
        head.add_row(key, str(data[key]))
    head.add_row("devices", ", ".join(data["devices"]))
    ext = data["extension"]
    built = "yes" if ext["built"] else f"no: {ext['why not']}"
    head.add_row("extension invcoss._C", built)
    if ext["built"]:
        head.add_row(
            "  cpu / cuda kernels",
            f"{'yes' if ext['cpu kernels'] else 'no'} / {'yes' if ext['cuda kernels'] else 'no'}",
        )
        head.add_row(
            "  OpenMP", {True: "yes", False: "no (single-threaded CPU kernels)"}.get(ext["openmp"], "unknown")
        )
    if ext["built against torch"]:
        fits = ext["built against torch"] == data["torch"]
        head.add_row(
            "  built against torch",
            ext["built against torch"] + ("" if fits else " (not this torch: rebuild)"),
        )
    head.add_row("default backend (cpu tensors)", default_backend(torch.device("cpu")))
    if torch.cuda.is_available():
        head.add_row("default backend (cuda tensors)", default_backend(torch.device("cuda")))
    console.print(head)
    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("why / why not")
    for name, row in data["backends"].items():
        table.add_row(name, "yes" if row["available"] else "no", row["reason"])
    console.print(table)
    if kernels:
        from invcoss.kernels.aot import format_kernel_table, kernel_table

        click.echo(format_kernel_table(kernel_table()))  # plain text: rich would wrap it when piped
        if data["extension"]["cuda kernels"]:
            from invcoss.kernels.sass import extension_table, format_extension_table

            click.echo("")
            click.echo(format_extension_table(extension_table()))
    n_ok = sum(r["available"] for r in data["backends"].values())
    click.echo(f"invcoss {data['invcoss']}: {n_ok}/{len(data['backends'])} backends available")

"""``invcoss-cli info``: versions, devices, backends and the extension build."""

from __future__ import annotations

import click


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


@click.command()
@click.option(
    "--kernels",
    is_flag=True,
    help="Also compile every Triton kernel for sm_90 and print its resources, and those of the "
    "extension's sm_90 CUDA kernels.",
)
def info(kernels: bool) -> None:
    """Print versions, devices, which backends run here (and why not), and the extension build."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from invcoss.ops import default_backend

    data = collect_info()
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

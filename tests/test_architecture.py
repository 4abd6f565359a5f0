"""The shape of the package: imports form a DAG, old paths still work (with a warning), one
modality registry, one atomic writer.

The import graph is built from the source with :mod:`ast` (every ``import`` and ``from ... import``
of an ``invcoss`` module, at the top of a file or inside a function alike) and searched for cycles
with Tarjan's strongly-connected-components algorithm: a function-local import that only hides a
cycle from Python's import machinery still closes a cycle here.
"""

from __future__ import annotations

import ast
import importlib
import os
import stat
import warnings
from pathlib import Path

import click
import pytest

from invcoss import modality

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the installed package (kernels/ is invcoss.kernels)."""
    out = {}
    for path in (ROOT / "invcoss").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        out["invcoss.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` within the package, from every import statement."""
    modules = package_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("invcoss"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("invcoss"):
                    deps.update(resolve(f"{base}.{a.name}") or resolve(base) for a in node.names)
                    # ``from pkg import submodule`` runs pkg/__init__.py first: an edge to pkg too.
                    deps.add(resolve(base))
        graph[name] = {d for d in deps if d and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["invcoss.inversion.config"] = graph["invcoss.inversion.config"] | {"invcoss.inversion.run"}
    assert any({"invcoss.inversion.config", "invcoss.inversion.run"} <= set(c) for c in cycles(graph))


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "invcoss.inversion" in graph["invcoss.cli.invert"]  # imported inside the command only


OLD_PATHS = [
    ("invcoss.inversion_config", "InversionConfig", "invcoss.inversion.config"),
    ("invcoss.inversion_config", "canonical_modality", "invcoss.modality"),
    ("invcoss.inversion_io", "read_samples", "invcoss.inversion.files"),
    ("invcoss.inversion_io", "run_inversion", "invcoss.inversion.run"),
    ("invcoss.inversion_report", "quality_report", "invcoss.inversion.report"),
    ("invcoss.continual_config", "ContinualConfig", "invcoss.continual.config"),
    ("invcoss.continual_buffer", "replay_loss", "invcoss.continual.replay"),
    ("invcoss.continual_train", "train_stage", "invcoss.continual.train"),
    ("invcoss.continual_eval", "evaluate_run", "invcoss.continual.eval"),
    ("invcoss.continual_probe", "probe_accuracy", "invcoss.continual.probe"),
    ("invcoss.continual_plot", "line_plot", "invcoss.continual.plot"),
    ("invcoss.experiment", "run_forgetting_experiment", "invcoss.continual.experiment"),
    ("invcoss.stats", "collect_feature_stats", "invcoss.feature_stats"),
]


@pytest.mark.parametrize("old, name, new", OLD_PATHS, ids=lambda v: v if isinstance(v, str) else None)
def test_old_import_paths_work_for_one_release_with_a_warning(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated .* import {name} from {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_old_paths_offer_only_public_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="has no attribute 'torch'"):
            _ = importlib.import_module("invcoss.stats").torch


def test_the_packages_keep_their_public_names():
    from invcoss import continual, inversion

    for name in ("Inverter", "InversionConfig", "NonFiniteLossError", "derive_seed", "run_inversion"):
        assert hasattr(inversion, name), name
    for name in ("run_continual", "read_run", "stage_dir", "ContinualConfig", "STATS_NAME"):
        assert hasattr(continual, name), name


def test_one_modality_registry():
    assert modality.modality_names() == ("ct", "mri", "xray", "pathology")
    assert modality.modality_names(ndim=2) == ("xray", "pathology")
    assert modality.canonical_modality("PATH") == "pathology" == modality.get_modality("Pathology").name
    assert {m: modality.get_modality(m).ndim for m in modality.modality_names()} == {
        "ct": 3, "mri": 3, "xray": 2, "pathology": 2,
    }  # fmt: skip
    assert modality.get_modality("mri").space.value_range == (-4.0, 4.0)
    with pytest.raises(
        ValueError, match="unknown modality 'pet'; choose one of ct, mri, xray, pathology, path"
    ):
        modality.canonical_modality("pet")


def test_every_command_takes_the_same_modalities():
    from invcoss.cli import main

    choices = {}
    for name, command in main.commands.items():
        for param in command.params:
            if param.name == "modality":
                assert isinstance(param.type, click.Choice), name
                choices[name] = list(param.type.choices)
    assert {"invert", "phantoms", "preprocess", "pretrain", "stats"} <= set(choices)
    assert all(c == modality.modality_choices() for c in choices.values()), choices
    assert choices["invert"][-1] == "path"


def test_checkpoints_are_written_by_the_shared_writer_with_normal_permissions(tmp_path):
    from invcoss.models import create_model

    old = os.umask(0o022)
    try:
        create_model("vit_nano", img_size_2d=32).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}

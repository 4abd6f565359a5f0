"""The build of ``invcoss._C``: what it reports, what it registers, and when it must exist.

A compiled module next to the package that fails to import (a stale build, a missing symbol) is a
failure, not a skip; without any compiled module the extension tests skip with the reason.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import invcoss
from invcoss import _build, _ext, ops

OPS = (
    "tv",
    "tv_backward",
    "scale_rows",
    "batch_mean_var",
    "batch_mean_var_backward",
    "welford_update",
    "stat_matching",
    "repulsive_direct",
    "repulsive_gram",
    "gram_update",
)
BUILT = list(Path(invcoss.__file__).parent.glob("_C.*"))
pytestmark = pytest.mark.device  # the GPU check runs these where the CUDA kernels must exist
ROOT = Path(__file__).resolve().parents[2]


def _setup_py():
    spec = importlib.util.spec_from_file_location("invcoss_setup", ROOT / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines functions only when not run as __main__
    return setup_py


def _cuda_missing(torch_cuda, cuda_home) -> str:
    """setup.py's own decision whether to build the CUDA kernels."""
    return _setup_py().cuda_missing(torch_cuda, cuda_home)


def test_no_extension_opt_out(monkeypatch):
    # The GPU check installs the package first without the extension, then builds it in place.
    monkeypatch.setenv("INVCOSS_NO_EXTENSION", "1")
    assert _setup_py().extension_modules() == ([], {})
    monkeypatch.setenv("INVCOSS_NO_EXTENSION", "0")
    modules, cmdclass = _setup_py().extension_modules()
    assert [m.name for m in modules] == ["invcoss._C"] and "build_ext" in cmdclass


def test_license_metadata_fits_the_setuptools_in_use(monkeypatch):
    # SPDX as License-Expression from setuptools 77 on; the older License field before it.
    import setuptools

    setup_py = _setup_py()
    monkeypatch.setattr(setuptools, "__version__", "75.8.0")
    assert setup_py.license_metadata() == {"license": "Apache-2.0"}
    monkeypatch.setattr(setuptools, "__version__", "84.2.1")
    assert setup_py.license_metadata() == {"license_expression": "Apache-2.0"}


def test_a_built_module_imports():
    if not BUILT:
        pytest.skip("invcoss._C is not built (pip install --no-build-isolation -e .)")
    assert _ext.C is not None, f"invcoss._C exists ({BUILT[0].name}) but does not import: {_ext.IMPORT_ERROR}"


needs_ext = pytest.mark.skipif(_ext.C is None, reason=f"invcoss._C is not built: {_ext.IMPORT_ERROR}")


@needs_ext
def test_has_cuda_is_reported_consistently():
    # What the module and `invcoss-cli info` say against what the module registered.
    from invcoss.cli.info import collect_info

    registered = torch._C._dispatch_has_kernel_for_dispatch_key("invcoss::tv", "CUDA")
    assert _ext.C.has_cuda() == registered
    ext = collect_info()["extension"]
    assert ext["built"] and ext["cpu kernels"] and ext["cuda kernels"] == registered


@needs_ext
def test_cuda_kernels_built_where_the_toolchain_exists():
    # setup.py adds the CUDA sources whenever torch is a CUDA build and nvcc exists (no GPU needed).
    from torch.utils.cpp_extension import CUDA_HOME

    why_not = _cuda_missing(torch.version.cuda, CUDA_HOME)
    if why_not:
        pytest.skip(f"setup.py builds no CUDA kernels here: {why_not}")
    assert _ext.HAS_CUDA, f"nvcc is at {CUDA_HOME} and torch is a CUDA build, but _C has no CUDA kernels"


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_kernels(op):
    name = f"invcoss::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if _ext.HAS_CUDA:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    else:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@needs_ext
def test_cpu_backend_is_the_default_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("INVCOSS_BACKEND", raising=False)
    ops.probe_all()
    assert "cpu" in ops.available_backends()
    assert ops.default_backend(torch.device("cpu")) == "cpu"


@needs_ext
def test_openmp_threads_follow_torch():
    # A build with a compiler without OpenMP runs its kernels on one thread, whatever torch says.
    saved = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _ext.C.omp_threads() == (n if _ext.BUILD_INFO["openmp"] else 1)
    finally:
        torch.set_num_threads(saved)


@needs_ext
def test_the_module_records_the_torch_it_was_built_against():
    # The record compiled into the module, the file beside it (read when the module cannot load) and
    # what `invcoss-cli info` shows agree, and this torch is the one it was built against.
    from invcoss.cli.info import collect_info

    assert hasattr(_ext.C, "build_info"), "invcoss._C is a stale build: rebuild it (make install)"
    compiled = json.loads(_ext.C.build_info())
    assert compiled == _ext.BUILD_INFO
    assert compiled["torch"] == torch.__version__ and compiled["torch_cuda"] == torch.version.cuda
    assert compiled["cuda_kernels"] == _ext.HAS_CUDA
    beside = Path(_ext.C.__file__).with_name(_ext.BUILD_INFO_FILE)
    if beside.exists():  # absent when only the module was copied in
        assert json.loads(beside.read_text()) == compiled
    ext = collect_info()["extension"]
    assert ext["built against torch"] == torch.__version__ and ext["openmp"] == compiled["openmp"]


def _load_with_torch_version(version: str) -> subprocess.CompletedProcess:
    code = (
        f"import warnings, torch; torch.__version__ = {version!r}; warnings.simplefilter('always');"
        "import invcoss._ext, invcoss.ops as ops; ops.probe_all(); import invcoss._ext; print('loaded')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@needs_ext
def test_another_torch_warns_once_with_the_fix():
    done = _load_with_torch_version("0.0.1+other")
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    warned = [line for line in done.stderr.splitlines() if "ExtensionBuildWarning: " in line]
    assert len(warned) == 1, done.stderr
    assert f"built against torch {torch.__version__}, but this is torch 0.0.1+other" in warned[0]
    assert "--no-build-isolation" in warned[0] and f"install torch {torch.__version__}" in warned[0]


def test_build_problem_messages():
    built = {"torch": "2.14.1+cu130"}
    assert _ext.build_problem(built, "2.14.1+cu130") == ""
    assert _ext.build_problem({}, "2.14.1+cu130") == ""  # unknown build, loaded: nothing to say
    failed = _ext.build_problem(built, "2.13.0+cpu", "ImportError: undefined symbol: _ZN3c10")
    assert "2.14.1+cu130, but this is torch 2.13.0+cpu and does not load (ImportError: undefined" in failed
    assert "slower torch and Triton backends" in failed and "--force-reinstall --no-binary invcoss" in failed
    stale = _ext.build_problem({}, "2.13.0+cpu", "ImportError: undefined symbol: _ZN3c10")
    assert stale.startswith("invcoss._C does not load (ImportError") and "install torch" not in stale


def test_the_installed_torch_version_is_read_without_importing_it():
    assert _build.installed_torch_version() == torch.__version__


def test_a_build_for_another_torch_warns_at_the_check_once(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "warned_for", "")
    (tmp_path / _build.BUILD_INFO_FILE).write_text(json.dumps({"torch": "0.0.1+other"}))
    assert _build.check_installed_torch(tmp_path) == ""  # no compiled module beside it: nothing to say
    (tmp_path / "_C.so").write_bytes(b"")
    why = re.escape(f"0.0.1+other, but this is torch {torch.__version__}")
    with pytest.warns(_build.ExtensionBuildWarning, match=why):
        assert _build.check_installed_torch(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.check_installed_torch(tmp_path)  # the same problem, not said twice
    (tmp_path / _build.BUILD_INFO_FILE).write_text(json.dumps({"torch": torch.__version__}))
    assert _build.check_installed_torch(tmp_path) == ""


@needs_ext
def test_import_invcoss_warns_about_another_installed_torch(tmp_path):
    # A stand-in torch whose version file names another version, found first on the path.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "torch" / "version.py").write_text("__version__ = '0.0.1+other'\ndebug = False\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "PYTHONWARNINGS": "always",
    }
    done = subprocess.run(
        [sys.executable, "-c", "import invcoss; print('imported')"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    warned = [line for line in done.stderr.splitlines() if "ExtensionBuildWarning: " in line]
    assert len(warned) == 1, done.stderr
    assert f"built against torch {torch.__version__}, but this is torch 0.0.1+other" in warned[0]
    env["INVCOSS_DISABLE_EXTENSION"] = "1"  # the extension left out: nothing to warn about
    quiet = subprocess.run([sys.executable, "-c", "import invcoss"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and "ExtensionBuildWarning" not in quiet.stderr

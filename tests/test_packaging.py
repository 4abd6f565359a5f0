"""Packaging: what setup.py does without torch, without a compiler and without OpenMP, and (slow) the
path of a user without the Makefile: sdist -> wheel in a clean venv -> install -> ``import invcoss._C``.

The slow test builds the CPU kernels only (``INVCOSS_NO_CUDA=1``): the CUDA sources are the same
files in the same sdist, and compiling them would triple CI's time; ``make install`` builds them.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from setuptools import Distribution
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.sysconfig import customize_compiler
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parents[1]


def _setup_py():
    spec = importlib.util.spec_from_file_location("invcoss_setup", ROOT / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines functions only when not run as __main__
    return setup_py


def _compiler(monkeypatch, cxx: str):
    """The distutils compiler a build gets with ``CXX=cxx`` (as setuptools' build_ext makes it)."""
    monkeypatch.setenv("CXX", cxx)
    compiler = new_compiler()
    customize_compiler(compiler)
    return compiler


def _without_openmp(tmp_path: Path) -> str:
    """A C++ compiler that rejects -fopenmp, as Apple clang does: the system one behind a wrapper."""
    wrapper = tmp_path / "cxx-without-openmp"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; exit 1; }; done\n'
        'exec c++ "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_without_torch_the_build_stops_with_the_fix(monkeypatch):
    # pip's build isolation hides the installed torch; the build must say so, not drop the extension.
    monkeypatch.delenv("INVCOSS_NO_EXTENSION", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    modules, cmdclass = _setup_py().extension_modules()
    assert [m.name for m in modules] == ["invcoss._C"]  # the wheel is not tagged pure Python
    command = cmdclass["build_ext"](Distribution({"name": "invcoss", "ext_modules": modules}))
    command.ensure_finalized()
    with pytest.raises(SetupError, match="torch is not importable") as err:
        command.run()
    assert "--no-build-isolation" in str(err.value) and "INVCOSS_NO_EXTENSION=1" in str(err.value)


def test_without_a_compiler_the_build_stops_with_the_fix(tmp_path):
    setup_py = _setup_py()
    setup_py.check_cxx_compiler(["c++"])  # this machine has one
    with pytest.raises(SetupError, match="no C.. compiler .*no-such-c.*INVCOSS_NO_EXTENSION=1"):
        setup_py.check_cxx_compiler(["c++", str(tmp_path / "no-such-c++")])


def test_openmp_is_probed_not_assumed(monkeypatch, tmp_path):
    setup_py = _setup_py()
    (tmp_path / "gcc").mkdir()
    (tmp_path / "no-omp").mkdir()
    assert setup_py.openmp_flags(_compiler(monkeypatch, "c++"), tmp_path / "gcc") == ["-fopenmp"]
    flags = setup_py.openmp_flags(_compiler(monkeypatch, _without_openmp(tmp_path)), tmp_path / "no-omp")
    assert "-fopenmp" not in flags and "-Wno-unknown-pragmas" in flags


def test_manifest_ships_every_build_source():
    # Every source the build reads, whether or not this machine builds it (the CUDA files too).
    manifest = (ROOT / "MANIFEST.in").read_text()
    suffixes = {p.suffix for p in (ROOT / "csrc").iterdir()}
    assert suffixes <= {".cpp", ".cu", ".h", ".cuh"}, f"csrc/ has files MANIFEST.in does not ship: {suffixes}"
    assert "recursive-include csrc *.cpp *.cu *.h *.cuh" in manifest
    assert (ROOT / "LICENSE").is_file() and "include LICENSE" in manifest
    assert (ROOT / "invcoss" / "py.typed").is_file()


def _project_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them (tracked and new, nothing ignored or built)."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            (dest / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            (dest / src.relative_to(ROOT)).write_bytes(src.read_bytes())
    return dest


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sdist")
    src = _project_copy(tmp / "src")
    code = f"import setuptools.build_meta as b; print(b.build_sdist({str(tmp)!r}))"
    name = _run([sys.executable, "-c", code], cwd=src).strip().splitlines()[-1]
    return tmp / name


@pytest.mark.slow
def test_sdist_builds_a_wheel_with_the_extension_in_a_clean_venv(sdist, tmp_path):
    with tarfile.open(sdist) as tar:
        shipped = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if "/" in n}
    needed = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir()} | {"LICENSE", "invcoss/py.typed"}
    assert needed <= shipped, f"the sdist lacks {sorted(needed - shipped)}"

    # A venv of its own that reuses this environment's torch (and setuptools, wheel, pip) through a
    # .pth line: the wheel must build with --no-build-isolation against exactly this torch.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "torch-from-outside.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(INVCOSS_NO_CUDA="1", PYTHONNOUSERSITE="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    pip = [python, "-m", "pip", "--no-cache-dir"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "wheels", str(sdist)], tmp_path, env)
    (wheel,) = (tmp_path / "wheels").glob("invcoss-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name} is tagged pure Python"
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("invcoss/_C_build.json", "invcoss/py.typed", "invcoss/kernels/tv.py"):
        assert needed in names
    assert any(n.startswith("invcoss/_C.") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # --ignore-installed: the outer environment's invcoss is visible through the .pth line.
    _run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], tmp_path, env)
    probe = (
        "import json, torch, invcoss, invcoss._C, invcoss._ext as e; x = torch.randn(64, 8, dtype=torch.float64);"
        " m, v = torch.ops.invcoss.batch_mean_var(x);"
        " print(json.dumps({'file': invcoss._C.__file__, 'info': e.BUILD_INFO, 'cuda': e.HAS_CUDA,"
        " 'ok': bool(torch.allclose(m, x.mean(0)) and torch.allclose(v, x.var(0, unbiased=False)))}))"
    )
    got = json.loads(_run([python, "-W", "error::UserWarning", "-c", probe], tmp_path, env).splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv), got["file"]
    assert got["info"]["torch"] == torch.__version__ and got["info"]["openmp"] and not got["cuda"]
    assert got["ok"]


@pytest.mark.slow
def test_isolated_build_without_torch_stops_with_the_fix(sdist, tmp_path):
    # pip's default: an isolated build environment (setuptools from the index, no torch).
    cmd = [sys.executable, "-m", "pip", "--no-cache-dir", "wheel", "--no-deps", "-w", "w", str(sdist)]
    env = {k: v for k, v in os.environ.items() if k != "INVCOSS_NO_EXTENSION"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and not list(tmp_path.glob("w/*.whl"))
    assert "torch is not importable in this build environment" in done.stdout + done.stderr
    assert "--no-build-isolation" in done.stdout + done.stderr


@pytest.mark.parametrize(
    "platform, machine, wanted",
    [
        ("linux", "x86_64", True),
        ("linux", "aarch64", True),
        ("darwin", "arm64", False),
        ("win32", "AMD64", False),
    ],
)
def test_triton_is_required_only_where_it_has_wheels(platform, machine, wanted):
    (line,) = re.findall(r'^\s*"(triton\b[^"]*)",', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    triton = Requirement(line)
    assert triton.marker.evaluate({"sys_platform": platform, "platform_machine": machine}) is wanted

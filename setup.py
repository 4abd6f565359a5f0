"""Build of the extension ``invcoss._C`` from ``csrc/``; the metadata is in pyproject.toml, except the
license (see ``license_metadata``).

* The extension is compiled against the torch of the build environment, so the build must see the
  torch it will run with: ``pip install --no-build-isolation .`` (pip's default build isolation hides
  it). torch is deliberately not a build requirement: pip would download a second, multi-GB torch
  that need not match the installed one. Without torch a build stops with that advice, and so does
  one without a C++ compiler; ``INVCOSS_NO_EXTENSION=1`` builds a pure-Python package on purpose
  (the torch and Triton backends only; ``python setup.py build_ext --inplace`` can add the extension
  to such an editable install later, as the GPU check does while its Triton kernels compile).
* The CPU kernels (``csrc/*.cpp``) are always built, multi-threaded with OpenMP when the compiler
  accepts ``-fopenmp`` (probed), else single-threaded (e.g. Apple clang without libomp).
* The CUDA kernels (``csrc/*.cu``) are added when torch is a CUDA build and nvcc is found under
  ``CUDA_HOME`` (a GPU is not needed to compile them). ``INVCOSS_NO_CUDA=1`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100, H100/H200); ``MAX_JOBS`` bounds ninja.
* The build records what it was built against (``BUILD_INFO_FILE`` beside the module, and the same
  JSON in the module: ``invcoss._C.build_info()``); ``invcoss._ext`` warns when the torch differs.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import SetupError

BUILD_INFO_FILE = "_C_build.json"
BUILD_INFO_HEADER = "invcoss_build_info.h"
ESCAPE_HATCH = (
    "To install without the extension on purpose (pure Python: the torch and Triton backends, the "
    "CPU kernels several times slower), set INVCOSS_NO_EXTENSION=1."
)
NO_TORCH = (
    "invcoss: cannot build the extension invcoss._C: torch is not importable in this build "
    "environment. The extension is compiled against the torch it will run with, and pip builds in an "
    "isolated environment without it unless told otherwise. Install torch first, then build with "
    "--no-build-isolation (setuptools and wheel must be installed too): `pip install "
    "--no-build-isolation invcoss`, `pip wheel --no-build-isolation .`, `python -m build "
    "--no-isolation`. " + ESCAPE_HATCH
)


def cuda_missing(torch_cuda: str | None, cuda_home: str | None) -> str:
    """Why the CUDA kernels cannot be built here ("" when they can)."""
    if os.environ.get("INVCOSS_NO_CUDA", "0") == "1":
        return "INVCOSS_NO_CUDA=1"
    if torch_cuda is None:
        return "torch is a CPU-only build"
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return "nvcc not found; set CUDA_HOME"
    if not (Path(cuda_home) / "include" / "cuda_runtime.h").exists():  # e.g. CUDA_HOME guessed from a wrapper
        return f"no CUDA headers under CUDA_HOME={cuda_home}; set CUDA_HOME to the toolkit"
    return ""


def license_metadata() -> dict:
    """The SPDX license in the form this setuptools accepts (pyproject.toml declares it dynamic).

    setuptools >= 77 writes it as ``License-Expression`` (PEP 639); older ones reject a plain-string
    ``project.license`` and only know ``License``. The table form ``{text = ...}``, which both accept,
    is deprecated from 77 on and due to stop working. The LICENSE file ships in every case.
    """
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


def check_cxx_compiler(commands: list[str]) -> None:
    """Stop with advice when one of the C++ compiler ``commands`` the build will run is missing."""
    for command in commands:
        if shutil.which(command) is None:
            raise SetupError(
                f"invcoss: cannot build the extension invcoss._C: no C++ compiler ({command!r} is not "
                "on PATH). Install g++ or clang++, or point CXX at one. " + ESCAPE_HATCH
            )


def openmp_flags(compiler, tmp: Path) -> list[str]:
    """The OpenMP flags ``compiler`` (distutils) accepts: ``-fopenmp`` when it compiles and links an
    OpenMP program, else ``-fopenmp-simd`` (the ``omp simd`` hints without the runtime) or nothing; the
    kernels then run single-threaded. The warnings turned off then are about the ignored pragmas and
    the thread counts (``nt``) that only they read."""
    quiet = ["-Wno-unknown-pragmas", "-Wno-unused-variable"]
    with_runtime = "#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n"
    trials = [
        (["-fopenmp"], with_runtime),
        (["-fopenmp-simd", *quiet], ""),
        (quiet, ""),
    ]
    for i, (flags, code) in enumerate(trials):
        src = tmp / f"invcoss_openmp_probe{i}.cpp"
        src.write_text(code or "int probe() { return 0; }\n")
        try:
            objects = compiler.compile([str(src)], output_dir=str(tmp), extra_postargs=flags)
            if code:  # the runtime must link too
                out = str(tmp / f"invcoss_openmp_probe{i}.so")
                compiler.link_shared_object(objects, out, extra_postargs=flags, target_lang="c++")
        except Exception:  # CompileError, LinkError: classes that differ between setuptools versions
            continue
        return flags
    return []


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("INVCOSS_NO_EXTENSION", "0") == "1":
        print("invcoss: building no extension (INVCOSS_NO_EXTENSION=1)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
            get_cxx_compiler,
        )
    except ImportError:
        # A stand-in whose build stops with the advice; metadata and sdist builds need no torch.
        return [Extension("invcoss._C", sources=[])], {"build_ext": _stop(NO_TORCH)}
    csrc = Path(__file__).parent / "csrc"
    cpp = sorted(str(p.relative_to(Path(__file__).parent)) for p in csrc.glob("*.cpp"))
    cu = sorted(str(p.relative_to(Path(__file__).parent)) for p in csrc.glob("*.cu"))
    # Baseline x86-64 code (loads on any x86-64 CPU); the hot loops carry their own AVX2 clones.
    # -g0 overrides the -g of Python's CFLAGS, which triples the compile time.
    cxx = ["-O3", "-g0"]
    why_not = cuda_missing(torch.version.cuda, CUDA_HOME) if cu else "no CUDA sources"
    if why_not:
        print(f"invcoss: building the CPU kernels only ({why_not})")
        ext = CppExtension("invcoss._C", cpp, extra_compile_args={"cxx": cxx})
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(
            f"invcoss: building the CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        # Some CUDA installs keep their libraries in lib/ rather than lib64/.
        lib_dirs = [str(p) for p in (Path(CUDA_HOME) / "lib64", Path(CUDA_HOME) / "lib") if p.is_dir()]
        ext = CUDAExtension(
            "invcoss._C",
            cpp + cu,
            define_macros=[("INVCOSS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            library_dirs=lib_dirs,
        )
    return [ext], {"build_ext": _recording(BuildExtension, torch, get_cxx_compiler)}


def _stop(message: str) -> type:
    class StopBuild(build_ext):
        def run(self) -> None:
            raise SetupError(message)

    return StopBuild


def _recording(base: type, torch, get_cxx_compiler) -> type:
    """``base`` (torch's BuildExtension) that checks the compiler, probes OpenMP, and records the build
    in a generated header (compiled into the module) and in ``BUILD_INFO_FILE`` beside it."""

    class RecordingBuildExt(base):
        def build_extensions(self) -> None:
            # distutils compiles the OpenMP probe (and, without ninja, the sources); ninja runs CXX.
            distutils_cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so
            check_cxx_compiler([distutils_cxx[0]] + ([get_cxx_compiler()] if self.use_ninja else []))
            gen = Path(self.build_temp).resolve() / "invcoss_generated"
            gen.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                omp = openmp_flags(self.compiler, Path(tmp))
            print(
                f"invcoss: OpenMP {'on' if '-fopenmp' in omp else 'off: the CPU kernels run single-threaded'}"
            )
            self.build_info = {
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "openmp": "-fopenmp" in omp,
                "cuda_kernels": any(s.endswith(".cu") for e in self.extensions for s in e.sources),
            }
            header = f"#define INVCOSS_BUILD_INFO {json.dumps(json.dumps(self.build_info))}\n"
            if not (gen / BUILD_INFO_HEADER).exists() or (gen / BUILD_INFO_HEADER).read_text() != header:
                (gen / BUILD_INFO_HEADER).write_text(header)
            for ext in self.extensions:
                ext.include_dirs.append(str(gen))
                ext.extra_compile_args["cxx"] += omp
                ext.extra_link_args += [f for f in omp if f == "-fopenmp"]
                ext.depends.append(str(gen / BUILD_INFO_HEADER))
            super().build_extensions()

        def run(self) -> None:
            super().run()  # for --inplace, builds in build/ and copies the module into the tree
            for ext in self.extensions:
                path = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_INFO_FILE)
                path.write_text(json.dumps(self.build_info, indent=1) + "\n")

    return RecordingBuildExt


if __name__ == "__main__":  # pip runs this file as __main__; tests import cuda_missing from it
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass, **license_metadata())

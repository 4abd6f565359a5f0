"""Build of the optional extension ``invcoss._C`` from ``csrc/``; the metadata is in pyproject.toml,
except the license (see ``license_metadata``).

* The CPU kernels (``csrc/*.cpp``, OpenMP) are always built.
* The CUDA kernels (``csrc/*.cu``) are added when torch is a CUDA build and nvcc is found under
  ``CUDA_HOME`` (a GPU is not needed to compile them). ``INVCOSS_NO_CUDA=1`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100, H100/H200); ``MAX_JOBS`` bounds ninja.
* Without torch at build time, or with ``INVCOSS_NO_EXTENSION=1``, nothing is built, and the package
  runs on the torch/Triton backends (``python setup.py build_ext --inplace`` can add the extension
  to such an editable install later, as the GPU check does while its Triton kernels compile).
"""

import os
from pathlib import Path

import setuptools
from setuptools import setup


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


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("INVCOSS_NO_EXTENSION", "0") == "1":
        print("invcoss: building no extension (INVCOSS_NO_EXTENSION=1)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    csrc = Path(__file__).parent / "csrc"
    cpp = sorted(str(p.relative_to(Path(__file__).parent)) for p in csrc.glob("*.cpp"))
    cu = sorted(str(p.relative_to(Path(__file__).parent)) for p in csrc.glob("*.cu"))
    # Baseline x86-64 code (loads on any x86-64 CPU); the hot loops carry their own AVX2 clones.
    # -g0 overrides the -g of Python's CFLAGS, which triples the compile time.
    cxx = ["-O3", "-g0", "-fopenmp"]
    why_not = cuda_missing(torch.version.cuda, CUDA_HOME) if cu else "no CUDA sources"
    if why_not:
        print(f"invcoss: building the CPU kernels only ({why_not})")
        ext = CppExtension("invcoss._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # Some CUDA installs keep their libraries in lib/ rather than lib64/.
        lib_dirs = [str(p) for p in (Path(CUDA_HOME) / "lib64", Path(CUDA_HOME) / "lib") if p.is_dir()]
        ext = CUDAExtension(
            "invcoss._C",
            cpp + cu,
            define_macros=[("INVCOSS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
            library_dirs=lib_dirs,
        )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # pip runs this file as __main__; tests import cuda_missing from it
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass, **license_metadata())

"""Build of the optional extension ``invcoss._C`` from ``csrc/``; all metadata is in pyproject.toml.

* The CPU kernels (``csrc/*.cpp``, OpenMP) are always built.
* The CUDA kernels (``csrc/*.cu``) are added when torch is a CUDA build and nvcc is found under
  ``CUDA_HOME`` (a GPU is not needed to compile them). ``INVCOSS_NO_CUDA=1`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100, H100/H200); ``MAX_JOBS`` bounds ninja.
* Without torch at build time nothing is built, and the package runs on the torch/Triton backends.
"""

import os
from pathlib import Path

from setuptools import setup


def extension_modules() -> tuple[list, dict]:
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
    with_cuda = (
        bool(cu)
        and os.environ.get("INVCOSS_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    )
    if with_cuda:
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
    else:
        ext = CppExtension("invcoss._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

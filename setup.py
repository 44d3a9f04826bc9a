"""Build rag_kernels and its compiled C++ CPU core (``rag_kernels.ops._C``).

The extension links against the *installed* torch, so it must be built with that torch
importable: install with ``pip install --no-build-isolation -e .`` (an isolated build
environment would fetch a different, possibly multi-GB CUDA, torch and produce an
extension whose ABI does not match the runtime). Set ``RAG_KERNELS_SKIP_CPP=1`` to
install the pure-Python package only; it then falls back to the reference kernels.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - exercised only by a misconfigured install
    sys.exit(
        "rag_kernels: torch must be importable to build the C++ extension.\n"
        "Install torch first (CPU: `pip install torch==2.13.0`), then build without "
        "isolation: `pip install --no-build-isolation -e .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))

ext_modules = []
if os.environ.get("RAG_KERNELS_SKIP_CPP", "0") != "1":
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext_modules.append(
        CppExtension(
            name="rag_kernels.ops._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # -fno-trapping-math (as torch builds): lets GCC if-convert the epilogue loops'
            # selects, without which their AVX2 / baseline versions stay scalar (vec_math.h).
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
            },
            extra_link_args=["-fopenmp"],
        )
    )

setup(
    packages=find_packages(include=["rag_kernels", "rag_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

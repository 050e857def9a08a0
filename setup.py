"""Builds pi05_fastprune._C: the fastprune op library (CPU always; CUDA sources only when torch
has CUDA and nvcc is found). `pip install --no-build-isolation -e .` against an installed torch."""

import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cpu_sources = [p for p in rel("csrc/*.cpp") if not p.endswith("_cuda.cpp")]
    cxx = ["-O3", "-std=c++17"]
    # at::parallel_for is a header template: without -fopenmp it compiles to a plain serial loop
    # in this library, whatever torch itself was built with. The library then shares torch's
    # OpenMP runtime (libgomp.so.1, already loaded by libtorch_cpu) and its thread count.
    link = []
    if sys.platform.startswith("linux") and __import__("torch").backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = (
        os.environ.get("FASTPRUNE_NO_CUDA", "0") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "pi05_fastprune._C",
            cpu_sources + rel("csrc/*_cuda.cpp") + rel("kernels/*.cu"),
            include_dirs=[os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")],
            define_macros=[("FASTPRUNE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "pi05_fastprune._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="pi05_fastprune",
    version="0.1.0",
    description="Fused LightVLA visual-token pruning ops (torch.ops.fastprune) and a pi0.5 model",
    packages=["pi05_fastprune", "pi05_fastprune.kernels"],
    package_dir={"pi05_fastprune.kernels": "kernels"},
    ext_modules=[extension()],
    # ninja compiles the sources in parallel (MAX_JOBS) where it is installed.
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())},
    python_requires=">=3.10",
    install_requires=["numpy"],
)

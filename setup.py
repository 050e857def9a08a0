"""Builds pi05_fastprune._C: the fastprune op library (CPU always; CUDA sources only when torch
has CUDA and nvcc is found). `pip install --no-build-isolation -e .` against an installed torch."""

import glob
import os
import shlex
import subprocess
import sys
import tempfile

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def openmp_flags():
    """["-fopenmp"] where torch uses OpenMP and the C++ compiler builds with it (Linux).

    at::parallel_for is a header template: without -fopenmp it compiles to a serial loop in this
    library, whatever torch itself was built with. With it, the library shares torch's OpenMP
    runtime (libgomp.so.1, already loaded by libtorch_cpu) and its thread count. A compiler that
    cannot build with OpenMP builds the library serial, with a warning, rather than not at all."""
    if not (sys.platform.startswith("linux") and __import__("torch").backends.openmp.is_available()):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = shlex.split(os.environ.get("CXX", "c++")) + ["-fopenmp", src, "-o", os.path.join(tmp, "omp")]
        try:
            built = subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            built = False
        if not built:
            print(f"pi05_fastprune: {' '.join(cmd[:-3])} failed: the CPU kernels are built without OpenMP (serial)")
            return []
    return ["-fopenmp"]


def extension():
    cpu_sources = [p for p in rel("csrc/*.cpp") if not p.endswith("_cuda.cpp")]
    openmp = openmp_flags()  # compile and link flags alike
    cxx = ["-O3", "-std=c++17"] + openmp
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
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=openmp,
        )
    return cpp_extension.CppExtension(
        "pi05_fastprune._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=openmp,
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
    extras_require={"serve": ["websockets>=13", "msgpack"]},  # python -m pi05_fastprune serve
)

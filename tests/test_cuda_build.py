"""The CUDA C++ backend (kernels/prune_cuda.cu, csrc/prune_cuda.cpp) and the LibTorch build.

CPU part (no GPU needed; builds are cached per module):
- every kernels/*.cu compiles with plain ``nvcc -arch=sm_90`` and ``-arch=sm_80``;
- csrc/prune_cuda.cpp parses against the torch headers plus the CUDA runtime headers;
- the CMake build of the op library succeeds and installs, and a LibTorch C++ program (tests/cpp)
  links it (find_package) and runs its eval ops on CPU tensors through the dispatcher;
- the kernels run on the CPU under tests/cpp/cuda_emu.h (every CUDA thread a fiber, blocks in
  turn, in grid order or shuffled, wmma as whole tiles), built with UBSan where the compiler has
  it, both with the tensor-core path and the FMA path, against the float64 truth and the exact
  gather of their own selection;
- the same kernels under ThreadSanitizer (tests/cpp/emu_race.cpp): no two CUDA threads touch one
  address without a barrier or an atomic between them, whatever the values.

The GPU tests of backend="cuda" are tests/test_gpu.py, shared with backend="triton".
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from pi05_fastprune import reference as R
from pi05_fastprune.structured import structured_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_prune import (  # noqa: E402
    MASKS, assert_degenerate_cases, assert_links_openmp, assert_nan_columns_never_win, assert_ties_go_low,
    check_prune, check_selection, make_inputs)

sys.path.insert(0, str(ROOT / "bench"))
import select_precision  # noqa: E402

CU_FILES = sorted(glob.glob(str(ROOT / "kernels" / "*.cu")))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def find_nvcc():
    for cand in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = find_nvcc()
CXX = shutil.which("g++") or shutil.which("c++")
CMAKE = shutil.which("cmake")


def ubsan_flags(root):
    """UBSan for the emulator builds, where the compiler links its runtime: the emulated kernels
    then stop at a misaligned vector access (a fault on the GPU), an index past a fixed-size
    array such as a shared-memory tile (silent corruption on the GPU) or a signed overflow in
    index arithmetic, none of which the emulator's own checks see."""
    flags = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]
    src = root / "ubsan_probe.cpp"
    src.write_text("int main() { return 0; }\n")
    ok = subprocess.run([CXX, *flags, str(src), "-o", str(root / "ubsan_probe")], capture_output=True).returncode == 0
    return flags if ok else []


def run(cmd, cwd=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# --- builds: all started at once in the background, each test waits for its own -----------------


def cuda_include_dir():
    """The CUDA toolkit's include dir (nvcc may be a wrapper script elsewhere)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        cands.append(str(pathlib.Path(NVCC).resolve().parents[1]))
    for c in cands:
        if c and (pathlib.Path(c) / "include" / "cuda_runtime.h").exists():
            return pathlib.Path(c) / "include"
    return None


class Builds:
    """Named build commands run concurrently (2 cores: the CPU checks stay near a minute)."""

    def __init__(self, root):
        self.root = root
        self.procs, self.results = {}, {}
        self.ubsan = []  # the emulator builds' sanitizer flags (ubsan_flags)

    def start(self, name, cmd):
        log = open(self.root / f"{name}.log", "w+")
        self.procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log)

    def wait(self, name, timeout=900):
        if name not in self.results:
            proc, log = self.procs[name]
            rc = proc.wait(timeout=timeout)
            log.seek(0)
            self.results[name] = (rc, log.read())
            log.close()
        return self.results[name]

    def require(self, name):
        rc, log = self.wait(name)
        assert rc == 0, f"{name} failed:\n{log[-6000:]}"
        return log

    def stop(self):
        for proc, log in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    b = Builds(root)
    b.dirs = {"root": root}
    if NVCC is not None:
        for cu in CU_FILES:
            for arch in ("sm_90", "sm_80"):
                obj = root / f"{pathlib.Path(cu).stem}_{arch}.o"
                keep = root / f"keep_{pathlib.Path(cu).stem}_{arch}"  # the PTX, for test_wmma_loads_are_shared
                keep.mkdir()
                b.start(f"nvcc:{pathlib.Path(cu).name}:{arch}",
                        [NVCC, f"-arch={arch}", "-O3", "-std=c++17", "--use_fast_math", "-Werror", "all-warnings",
                         "-Xptxas", "-v", "--keep", "--keep-dir", str(keep), "-I", str(ROOT / "kernels"), "-c", cu,
                         "-o", str(obj)])
        # bench/b1_probe.cu: cluster and bulk-copy instructions, sm_90 only.
        b.start("nvcc:b1_probe.cu:sm_90", [NVCC, "-arch=sm_90", "-O3", "-std=c++17", "-Werror", "all-warnings", "-c",
                                           str(ROOT / "bench" / "b1_probe.cu"), "-o", str(root / "b1_probe.o")])
    if CXX is not None:
        b.ubsan = ubsan_flags(root)
        for name, extra in (("mma", ["-DFASTPRUNE_EMU_MMA"]), ("fma", [])):
            b.start(f"emu:{name}", [CXX, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", *b.ubsan,
                                    "-DFASTPRUNE_CUDA_EMU", *extra, f"-I{ROOT / 'tests' / 'cpp'}",
                                    f"-I{ROOT / 'kernels'}", str(ROOT / "tests" / "cpp" / "emu_prune.cpp"),
                                    "-o", str(root / f"emu_{name}.so")])
        b.start("emu:tsan", [CXX, "-std=c++20", "-O1", "-g", "-fno-strict-aliasing", "-fsanitize=thread",
                             "-DFASTPRUNE_CUDA_EMU", "-DFASTPRUNE_EMU_MMA", f"-I{ROOT / 'tests' / 'cpp'}",
                             f"-I{ROOT / 'kernels'}", str(ROOT / "tests" / "cpp" / "emu_prune.cpp"),
                             str(ROOT / "tests" / "cpp" / "emu_race.cpp"), "-o", str(root / "emu_race")])
    if CMAKE is not None:
        gen = "-G Ninja" if shutil.which("ninja") else ""
        prefix = torch.utils.cmake_prefix_path
        # The library, installed, then the LibTorch program that finds and links it, in turn.
        lib, inst, prog = root / "cmake_lib", root / "cmake_install", root / "cmake_prog"
        b.dirs.update({"cmake:lib": lib, "cmake:install": inst, "cmake:prog": prog})
        b.start("cmake", ["sh", "-c", f'"{CMAKE}" -S "{ROOT}" -B "{lib}" {gen} -DCMAKE_PREFIX_PATH="{prefix}" '
                                      f'&& "{CMAKE}" --build "{lib}" -j 2 && "{CMAKE}" --install "{lib}" --prefix "{inst}" '
                                      f'&& "{CMAKE}" -S "{ROOT / "tests" / "cpp"}" -B "{prog}" {gen} '
                                      f'-DCMAKE_PREFIX_PATH="{prefix};{inst}" && "{CMAKE}" --build "{prog}" -j 2'])
    cuda_inc = cuda_include_dir()
    if CXX is not None and cuda_inc is not None:
        from torch.utils.cpp_extension import include_paths

        stub = root / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        cmd = [CXX, "-std=c++17", "-fsyntax-only", "-w", f"-I{root / 'stub'}"]
        cmd += [f"-I{p}" for p in include_paths()]
        cmd += [f"-I{cuda_inc}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels'}", str(ROOT / "csrc" / "prune_cuda.cpp")]
        b.start("binding", cmd)
    yield b
    b.stop()


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[pathlib.Path(c).name for c in CU_FILES])
def test_cu_compiles(builds, cu, arch):
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the .cu compile check needs it")
    builds.require(f"nvcc:{pathlib.Path(cu).name}:{arch}")


def test_b1_probe_compiles(builds):
    """bench/b1_probe.cu, which gpu_check's probe_b1 step builds with the GPU machine's nvcc."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the .cu compile check needs it")
    builds.require("nvcc:b1_probe.cu:sm_90")


def ptxas_resources(log):
    """{kernel (demangled enough to read): (registers, spill store bytes)} from ptxas -v."""

    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            k = re.search(r"\d+([a-z_]+_kernel)(I\w*?E)?E", m.group(1))
            name = (k.group(1) + (k.group(2) or "")) if k else m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name:
            out[name] = [None, int(m.group(1))]
        m = re.search(r"Used (\d+) registers", line)
        if m and name in out:
            out[name][0] = int(m.group(1))
    return out


def test_cu_kernels_do_not_spill_on_sm90(builds):
    """The register budgets are set by __launch_bounds__ (PERF_LOG v9, v15): the select kernel at
    64 registers (4 blocks per SM), the 16-byte scores kernel at 128 (2 per SM). A change that
    makes ptxas spill under those caps shows up here rather than as a slower GPU run."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")
    res = ptxas_resources(builds.require("nvcc:prune_cuda.cu:sm_90"))
    assert any(k.startswith("select_kernel") for k in res) and len(res) >= 13, res
    assert {k: v for k, v in res.items() if v[1] != 0} == {}, res
    assert res["select_kernel"][0] <= 64, res


def kept_ptx(builds, arch):
    """The PTX that the nvcc build of prune_cuda.cu for ``arch`` kept (--keep)."""
    builds.require(f"nvcc:prune_cuda.cu:{arch}")
    return "".join(p.read_text() for p in (builds.dirs["root"] / f"keep_prune_cuda_{arch}").glob("*.ptx"))


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_wmma_loads_are_shared(builds, arch):
    """Every tensor-core fragment load and store addresses shared memory as such (PERF_LOG v39):
    the CUDA headers' bf16 (and tf32) wmma::load_matrix_sync passes a generic address, which ptxas
    turned into 32-bit generic loads (96 LD.E per two D steps of kernel A at bf16, pi0.5's dtype,
    against 24 LDSM for fp16); the m16n16k8 accumulator store of kernel B's tf32 product likewise
    (8 ST.E.64). That product runs on fp16 halves since v59, whose m16n16k16 stores nvcc issues
    with .shared: no tf32 fragment is left."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")

    ptx = kept_ptx(builds, arch)
    loads = re.findall(r"wmma\.(?:load|store)\.[\w.]+", ptx)
    kinds = {re.sub(r"\.shared", "", x) for x in loads}
    assert any(".bf16" in k for k in kinds) and any(".f16" in k for k in kinds), sorted(kinds)
    assert not any(".tf32" in k for k in kinds), sorted(kinds)
    assert [x for x in loads if ".shared." not in x] == [], sorted(set(loads))


def test_cluster_barriers_in_ptx(builds):
    """Kernel A's cluster variant (PERF_LOG v45) uses cluster instructions, at one and two blocks
    per SM for each dtype, each with two cluster barriers: the first releases the block's
    partials and acquires the others' before any is read through distributed shared memory
    (mapa); the last only keeps every block resident until the others are done reading its shared
    memory, so its arrive is relaxed (a release arrive compiles to MEMBAR.ALL.GPU, which would
    wait for the block's S and A stores). The one-cluster kernel (v80, 16-bit types) has two
    barriers that release what blocks wrote and acquire it (S and A' in the workspace, every
    block's picks in its shared memory, which the blocks read through mapa), then a relaxed
    arrive once a block has read the others' picks and, after its keep rule and gather (v84), the
    wait that keeps it resident until every block has read its picks."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")

    found = {}
    for entry in re.split(r"(?=\.entry )", kept_ptx(builds, "sm_90"))[1:]:
        name = re.match(r"\.entry\s+(\w+)", entry).group(1)
        barriers = re.findall(r"barrier\.cluster\.[\w.]+", entry)
        if barriers or re.search(r"\bmapa\b", entry):
            found[name] = barriers
    scores = {k: v for k, v in found.items() if "scores_kernel" in k}
    one = {k: v for k, v in found.items() if "one_cluster_kernel" in k}
    assert len(scores) == 6 and len(one) == 2 and len(found) == 8, sorted(found)
    release = ["barrier.cluster.arrive.release.aligned", "barrier.cluster.wait.acquire.aligned"]
    for name, barriers in scores.items():
        assert barriers == release + ["barrier.cluster.arrive.relaxed.aligned", "barrier.cluster.wait.aligned"], (
            name, barriers)
    for name, barriers in one.items():
        assert barriers == release * 2 + ["barrier.cluster.arrive.relaxed.aligned", "barrier.cluster.wait.aligned"], (
            name, barriers)


def test_kernels_have_no_64bit_division(builds):
    """No 64-bit division or remainder in the kernels' PTX (PERF_LOG v30, v40): ptxas makes each a
    call of about 100 instructions, which sat in kernel A's last pass (16 per thread at pi05) and
    in front of every gather block's first load."""
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")

    ptx = kept_ptx(builds, "sm_90")
    assert "wmma.load" in ptx
    assert re.findall(r"\b(?:div|rem)\.[su]64\b", ptx) == []


def test_kernels_use_no_torch_headers():
    """The .cu kernels are raw CUDA: they must build with plain nvcc, without ATen/c10/torch."""
    for path in CU_FILES + sorted(glob.glob(str(ROOT / "kernels" / "*.h"))):
        text = pathlib.Path(path).read_text()
        for bad in ("<ATen/", "<c10/", "<torch/"):
            assert bad not in text, f"{path} includes {bad}"


def test_binding_parses(builds):
    """csrc/prune_cuda.cpp against the torch headers and the CUDA runtime headers (a stub stands
    in for c10/cuda/impl/cuda_cmake_macros.h, which only CUDA wheels ship)."""
    if "binding" not in builds.procs:
        pytest.skip("needs the CUDA runtime headers and a C++ compiler")
    builds.require("binding")


# --- CMake / LibTorch --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmake_library(builds):
    if CMAKE is None:
        pytest.skip("cmake not found")
    builds.require("cmake")
    libs = glob.glob(str(builds.dirs["cmake:lib"] / "libfastprune.*"))
    assert libs, f"no libfastprune in {builds.dirs['cmake:lib']}"
    return pathlib.Path(libs[0])


def test_cmake_library_builds(cmake_library):
    assert cmake_library.stat().st_size > 0
    assert_links_openmp(cmake_library)


def test_cmake_library_loads_in_python(cmake_library):
    """torch.ops.load_library on the CMake build gives the same ops (a fresh process: the pip
    build's _C registers the same library name)."""
    code = f"""
import importlib.util, torch
torch.ops.load_library({str(cmake_library)!r})
spec = importlib.util.spec_from_file_location("ref", {str(ROOT / "pi05_fastprune" / "reference.py")!r})
R = importlib.util.module_from_spec(spec); spec.loader.exec_module(R)
g = torch.Generator().manual_seed(0)
p, t = torch.randn(2, 50, 32, generator=g), torch.randn(2, 7, 32, generator=g)
pm = torch.ones(2, 50, dtype=torch.bool); pm[1, 25:] = False
out = torch.ops.fastprune.prune(p, t, None, pm, 9, False, "cpu")
ref = R.prune_ref(p, t, None, pm, keep_tokens=9)
assert all(torch.equal(a, b) for a, b in zip(out, ref)), "differs from the reference"
print("OK", out[3].tolist())
"""
    proc = run([sys.executable, "-c", code], timeout=120)
    assert proc.stdout.strip() == "OK [9, 9]", proc.stdout + proc.stderr


def test_libtorch_program_calls_the_ops(cmake_library, builds):
    """A LibTorch program that links the installed library (find_package(fastprune), the
    README's way) gets the ops registered without loading anything itself: the imported
    target's --no-as-needed keeps libfastprune.so among its needed libraries."""
    exe = builds.dirs["cmake:prog"] / "libtorch_prune"
    assert list(builds.dirs["cmake:install"].glob("**/cmake/fastprune/fastpruneConfig.cmake"))
    proc = run([str(exe)], timeout=120)
    assert proc.stdout.startswith("OK implicit counts=["), proc.stdout
    assert "keep_tokens=10 counts=[10, 10, 10]" in proc.stdout, proc.stdout
    if shutil.which("readelf"):  # the ops ran, so the library loaded; this says the link kept it
        assert "libfastprune.so" in run(["readelf", "-d", str(exe)]).stdout


# --- the kernels on the CPU emulator --------------------------------------------------------------

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Emulated:
    """kernels/prune_cuda.cu built as host C++ against tests/cpp/cuda_emu.h (ctypes)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.fp_emu_run
        f.restype = ctypes.c_int
        I, P, C = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        f.argtypes = [C, C, I, I, I, I, P, I, I, P, I, I, P, P, C, I, I, C, P, P, P, P, P, P, I, P, ctypes.c_uint64, C]
        self.lib.fp_emu_barrier_probe.argtypes = [C, P]

    def __call__(self, op, patches, task, task_mask=None, patch_mask=None, *, mask_voters=False,
                 keep_tokens=None, max_tokens=None, num_sms=132, cluster=False, one_cluster=False, ws_word=2**64 - 1,
                 runs=1):
        """op "select" -> (idx, ksplit); "prune"/"padded" -> (PruneResult, idx, ksplit).
        cluster: ask for kernel A's cluster variant; self.clustered says whether it ran.
        one_cluster: ask for the one-cluster kernel; self.one_cluster says whether it applies
        (self.launches, whether the emulated device placed it).
        self.launches: the kernel launches of the last run.
        ws_word: the 8-byte word the workspace starts filled with; runs: runs on that workspace,
        each on what the run before left (the outputs are the last run's)."""
        assert patches.stride(2) == 1 and task.stride(2) == 1
        B, N, D = patches.shape
        T = task.shape[1]
        tm = None if task_mask is None else task_mask.contiguous()
        pm = None if patch_mask is None else patch_mask.contiguous()
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        cap = max(N, max_tokens or 0)
        idx = torch.full((B, N), -7, dtype=torch.int64)
        counts = torch.full((B,), -7, dtype=torch.int64)
        # Poisoned outputs: every element must be written.
        pruned = torch.full((B * cap * D,), 7.0, dtype=patches.dtype)
        kmask = torch.ones(B * cap, dtype=torch.bool)
        kidx = torch.full((B * cap,), -7, dtype=torch.int64)
        k_out = torch.zeros(1, dtype=torch.int64)
        code = {"select": 0, "prune": 1, "padded": 2}[op]
        clustered = ctypes.c_int(int(cluster) | 2 * int(one_cluster))
        rc = self.lib.fp_emu_run(
            code, _DT[patches.dtype], B, N, T, D, ptr(patches), patches.stride(0), patches.stride(1),
            ptr(task), task.stride(0), task.stride(1), ptr(tm), ptr(pm), int(mask_voters), keep_tokens or 0,
            max_tokens or 0, num_sms, ctypes.byref(clustered), ptr(idx), ptr(counts), ptr(pruned), ptr(kmask), ptr(kidx), cap, ptr(k_out),
            ws_word, runs,
        )
        assert rc >= 1, f"emulated launch failed with code {rc} (-4: wrote past the workspace, -5: left a counter stale)"
        self.clustered = bool(clustered.value & 1)
        self.one_cluster = bool(clustered.value & 2)
        self.launches = clustered.value >> 8
        if op == "select":
            return idx, rc
        K = int(k_out)
        # Nothing written past the outputs' B x K rows (their buffers hold cap >= K rows a sample).
        assert (pruned[B * K * D:] == 7.0).all() and kmask[B * K:].all() and (kidx[B * K:] == -7).all()
        out = R.PruneResult(pruned[: B * K * D].view(B, K, D), kmask[: B * K].view(B, K),
                            kidx[: B * K].view(B, K), counts)
        return out, idx, rc


@pytest.fixture(scope="module")
def emu(builds):
    """{"mma": tensor-core path (sm_80+), "fma": FMA fallback}."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    libs = {}
    for name in ("mma", "fma"):
        builds.require(f"emu:{name}")
        libs[name] = Emulated(builds.dirs["root"] / f"emu_{name}.so")
    return libs


# B, N, T, D, num_sms (num_sms sizes the D split). D = 33 takes the scalar loads of kernel A and
# the scalar gather, the others the 16-byte ones.
EMU_SELECT = [
    (1, 1, 1, 64, 132),
    (2, 7, 13, 96, 132),
    (3, 70, 20, 33, 132),    # D not a multiple of 8: unaligned rows, scalar gather
    (2, 130, 150, 64, 132),  # 3 row tiles, prompt range > 64 tokens: 3 token tiles
    (1, 65, 9, 256, 64),     # D split in 4, a 1-row last tile (kernel A at one block per SM)
    (1, 65, 9, 256, 7),      # D split in 4, 8 blocks on 7 SMs: kernel A's 2-blocks-per-SM variant
    (1, 20, 5, 320, 1),      # no split: 5 (bf16/fp16) or 10 (fp32) steps over D, both register sets
    (2, 9, 6, 203, 1),       # scalar loads over 4 or 7 steps, a partial last step
    (1, 9, 6, 330, 132),     # scalar loads, D split in 6: the finishing step's second batch of 4 slices has 2
    (1, 9, 6, 1024, 132),    # 16-byte loads, D split in 16: the one-block variant's second batch of 11 has 5
    (3, 160, 20, 64, 1),     # kernel B: 1 column split over 3 column tiles, the A tile loaded once
    (2, 192, 150, 64, 1),    # kernel B: 2 column splits over 3 tiles, 3 token steps (A tiles reloaded)
]


@pytest.mark.parametrize("B,N,T,D,sms", EMU_SELECT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_select_matches_truth(emu, B, N, T, D, sms, dtype):
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, "all", seed=N + T)
    idx, _ = emu["mma"]("select", patches, task, task_mask, patch_mask, num_sms=sms)
    check_selection(idx, patches, task, task_mask, patch_mask)
    if dtype == torch.float32:
        truth = R.truth_scores(patches, task, task_mask, patch_mask)
        top2 = truth.topk(min(2, N), dim=-1).values
        if N > 1:  # where the float64 top-2 gap is clear, exactly the reference's choice
            sep = (top2[..., 0] - top2[..., 1]) > 1e-4
            assert torch.equal(idx[sep], R.select_ref(patches, task, task_mask, patch_mask)[sep])


def test_emulated_select_product_on_fp16_halves(emu):
    """PERF_LOG v59: kernel B's product on the tiles' fp16 halves keeps ~22 bits. Patches within
    1e-4 of one common vector give every column nearly the same score, so the SPEC margin is ~1e-7
    of the scores (operands rounded to 10 bits miss it on every row). Rows of D = 66000 along one
    direction give |S| near D, past fp16's 65504 unless S is scaled into its range."""
    patches, task, _, _ = select_precision.near_common(1e-4, B=2, N=40, T=12, D=48)
    assert select_precision.rows_off(patches, task, how="tf32") == 80
    idx, _ = emu["mma"]("select", patches, task)
    assert not R.selection_errors(idx, patches, task).any()

    patches, task, _, _ = select_precision.along_one_direction(B=1, N=6, T=3, D=66000)
    idx, _ = emu["mma"]("select", patches, task)
    assert not R.selection_errors(idx, patches, task).any()
    assert torch.equal(idx, R.select_ref(patches, task))


# Kernel A's cluster variant (plan.cluster, the sm_90 default): B, N, T, D, num_sms, D slices.
EMU_CLUSTER = [
    (1, 65, 9, 256, 64, 4),      # 2 row tiles, a 1-row last tile: rows for only one block of the cluster
    (2, 70, 20, 192, 16, 3),     # 3 slices, 2 samples
    (2, 192, 13, 128, 12, 2),    # 2 slices, 3 full row tiles each
    (1, 130, 150, 512, 132, 8),  # the automatic split held to 8 slices; 3 token tiles
    (1, 9, 6, 1024, 132, 8),     # 9 rows for 8 blocks: rank 0 finishes 2, the others 1
    (3, 70, 20, 64, 132, 1),     # no D split: clusters of one block finish from their own shared memory
    (1, 65, 9, 256, 7, 4),       # 8 blocks on 7 SMs: the variant at two blocks per SM
    (2, 130, 40, 128, 2, 1),     # no D split, 6 blocks on 2 SMs
    (2, 70, 150, 64, 132, 1),    # no D split, 3 token tiles: finish_block's groups of 8 tokens past the first
]


@pytest.mark.parametrize("B,N,T,D,sms,ksplit", EMU_CLUSTER)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", ["all", "invalid_prompt"])
def test_emulated_cluster_matches_truth(emu, B, N, T, D, sms, ksplit, dtype, masks):
    """The cluster variant of kernel A: the blocks of a row tile keep their partials in shared
    memory and finish interleaved rows through distributed shared memory (the emulator gives each
    block of a cluster its own, NaN-filled). The selection matches the float64 truth, the pruned
    outputs follow from it, and on clear top-2 gaps it is the plain kernels' selection."""
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, masks, seed=N + D)
    for build in ("mma", "fma"):
        lib = emu[build]
        out, idx, got_split = lib("padded", patches, task, task_mask, patch_mask, max_tokens=N, num_sms=sms,
                                  cluster=True)
        assert lib.clustered and got_split == ksplit
        check_selection(idx, patches, task, task_mask, patch_mask)
        check_prune(out, patches, idx, patch_mask, None, False, N)
        plain, _ = lib("select", patches, task, task_mask, patch_mask, num_sms=sms)
        assert not lib.clustered
        if N > 1:
            top2 = R.truth_scores(patches, task, task_mask, patch_mask).topk(2, dim=-1).values
            sep = (top2[..., 0] - top2[..., 1]) > 1e-3
            assert torch.equal(idx[sep], plain[sep])


@pytest.mark.parametrize("B,N,T,D,sms", [
    (1, 65, 600, 256, 64),  # 600 prompt tokens: the partial S tile would not fit shared memory
    (1, 65, 300, 256, 7),   # 300 at two blocks per SM (8 blocks on 7 SMs): two would not fit an SM
])
def test_emulated_cluster_declined(emu, B, N, T, D, sms):
    """Where the cluster variant does not fit, the plan keeps the plain kernel A."""
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, torch.float16, "all", seed=1)
    idx, _ = emu["mma"]("select", patches, task, task_mask, patch_mask, num_sms=sms, cluster=True)
    assert not emu["mma"].clustered
    check_selection(idx, patches, task, task_mask, patch_mask)


@pytest.mark.parametrize("T,spans", [(20, [(5, 13), (3, 16)]), (150, [(70, 141), (1, 149)])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cluster", [False, True])
def test_emulated_prompt_range_after_token_0(emu, T, spans, dtype, cluster):
    """Prompt masks whose first valid token is not token 0 (the other tests' masks are prefixes):
    kernel A loads the first prompt rows before it knows the range, guessing token 0, and must
    load them again. Sample 1 has holes inside its range. T = 150: more than 64 tokens, so a
    second token tile. With `cluster`, kernel A's cluster variant."""
    B, N, D = 2, 70, 256
    patches, task, _, patch_mask = make_inputs(B, N, T, D, dtype, "absent_camera", seed=T)
    task_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (lo, hi) in enumerate(spans):
        task_mask[b, lo:hi] = True
    task_mask[1, spans[1][0] + 1 : spans[1][1] - 1 : 3] = False
    for build in ("mma", "fma"):
        out, idx, ksplit = emu[build]("padded", patches, task, task_mask, patch_mask, max_tokens=20, num_sms=16,
                                      cluster=cluster)
        assert ksplit > 1 and emu[build].clustered == cluster
        check_selection(idx, patches, task, task_mask, patch_mask)
        check_prune(out, patches, idx, patch_mask, None, False, 20)


# The one-cluster kernel (plan.one_cluster, PERF_LOG v80, v81): B, N, T, D, masks.
EMU_ONE_CLUSTER = [
    (1, 1, 1, 64, "none"),               # one row, one token, one D step
    (1, 70, 20, 256, "all"),             # 5 blocks of 16 rows, 6 in the last; 4 D steps, fewer than the 7 in flight
    (1, 65, 9, 640, "absent_camera"),    # 10 D steps: the ring of 8 step buffers wraps
    (1, 130, 150, 200, "padded_prompt"),  # up to 3 token tiles (patches streamed again, 3 token steps a
                                          # column tile in phase 2); D = 200: a partial last D step
    (1, 200, 30, 128, "invalid_patches"),  # no valid patch: column 0 alone
    (1, 100, 12, 64, "invalid_prompt"),  # no valid token: the whole prompt
    (1, 1024, 5, 64, "all"),             # 16 blocks of 64 rows, sm_90's largest cluster; 16 S column tiles, a ring of 6
    (1, 700, 12, 64, "absent_camera"),   # 15 blocks of 48 rows (phase 2 multiplies 3 row groups of 16: warps 0-3
                                         # take 2, warps 4-7 one), the last of 28 (2 row groups)
    (3, 70, 20, 256, "all"),             # a cluster a sample: prompts of 3 lengths, the last sample's camera absent
    (2, 130, 150, 200, "padded_prompt"),  # one sample over 1 token tile, the other over 3 (if its prompt is long)
]


@pytest.mark.parametrize("B,N,T,D,masks", EMU_ONE_CLUSTER)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_one_cluster_matches_truth(emu, B, N, T, D, masks, dtype):
    """Kernels A and B (and for prune_padded C) as one cluster launch, a cluster a sample: every
    block's phases in turn, its copies landing only when waited for (NaN until then) and other
    blocks' rows read only after cluster barriers. The selection matches the float64 truth and is
    kernels A and B's without a D split (the same products and sums in the same order); prune and
    prune_padded (cap, mask_voters) keep what the reference keeps from it."""
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, masks, seed=N + T)
    lib = emu["mma"]
    idx, _ = lib("select", patches, task, task_mask, patch_mask, one_cluster=True)
    assert lib.one_cluster and not lib.clustered
    check_selection(idx, patches, task, task_mask, patch_mask)
    want, _ = lib("select", patches, task, task_mask, patch_mask, num_sms=1)
    assert not lib.one_cluster and torch.equal(idx, want)
    voters, _ = lib("select", patches, task, task_mask, patch_mask, mask_voters=True, one_cluster=True)
    if patch_mask is not None:
        want = torch.where(patch_mask, want, -1)
    assert lib.one_cluster and lib.launches == 1 and torch.equal(voters, want)
    keep = max(1, N // 9)
    out, idx, _ = lib("prune", patches, task, task_mask, patch_mask, keep_tokens=keep, one_cluster=True)
    assert lib.launches == 2  # the gather as kernel C: K is read on the host in between
    check_prune(out, patches, idx, patch_mask, keep, False, None)
    # prune_padded: the gather-pad in the same launch up to N rows (K = N: every row, padding
    # included), as kernel C past it.
    for cap, launches in ((keep, 1), (N, 1), (N + 3, 2)):
        out, idx, _ = lib("padded", patches, task, task_mask, patch_mask, max_tokens=cap, mask_voters=True,
                          one_cluster=True)
        assert lib.launches == launches
        check_prune(out, patches, idx, patch_mask, None, True, cap)


@pytest.mark.parametrize("T,lo,hi", [(20, 5, 13), (150, 70, 141)])
def test_emulated_one_cluster_prompt_range_after_token_0(emu, T, lo, hi):
    """The one-cluster kernel copies its first D steps before it knows the prompt range, guessing
    token 0, and must wait for those copies and copy again; holes inside the range; T = 150: a
    second token tile."""
    N, D = 70, 640
    patches, task, _, patch_mask = make_inputs(1, N, T, D, torch.bfloat16, "absent_camera", seed=T)
    task_mask = torch.zeros(1, T, dtype=torch.bool)
    task_mask[0, lo:hi] = True
    task_mask[0, lo + 1 : hi - 1 : 3] = False
    out, idx, _ = emu["mma"]("padded", patches, task, task_mask, patch_mask, max_tokens=20, one_cluster=True)
    assert emu["mma"].one_cluster
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, None, False, 20)


@pytest.mark.parametrize("most,launches", [(16, 1), (9, 1), (4, 3)])
def test_emulated_one_cluster_block_rows(emu, monkeypatch, most, launches):
    """The one-cluster kernel spreads N = 300 over 10 blocks of 32 rows (kernel A's and B's 64-row
    tiles, zeros past a block's rows); where the device places no cluster that large (the
    emulator's FASTPRUNE_EMU_MAX_CLUSTER), 5 blocks of 64 rows; where not even those, kernels A,
    B and C. Each way prune_padded keeps what the reference keeps from the float64 truth's
    selection."""
    monkeypatch.setenv("FASTPRUNE_EMU_MAX_CLUSTER", str(most))
    patches, task, task_mask, patch_mask = make_inputs(1, 300, 20, 64, torch.bfloat16, "all", seed=7)
    out, idx, _ = emu["mma"]("padded", patches, task, task_mask, patch_mask, max_tokens=40, one_cluster=True)
    assert emu["mma"].launches == launches
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, None, False, 40)


def test_emulated_one_cluster_takes_312_prompt_tokens(emu):
    """The longest prompt the README promises the one-cluster kernel (312 tokens: phase 2's A'
    rows and two product tiles, v85, in 226.2 of the 227 KiB), right; 313 is declined below."""
    patches, task, task_mask, patch_mask = make_inputs(1, 70, 312, 64, torch.bfloat16, "all", seed=312)
    out, idx, _ = emu["mma"]("padded", patches, task, task_mask, patch_mask, max_tokens=20, one_cluster=True)
    assert emu["mma"].one_cluster and emu["mma"].launches == 1
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, None, False, 20)


@pytest.mark.parametrize("B,N,T,D,dtype,build", [
    (2, 1025, 5, 64, torch.bfloat16, "mma"),  # 17 row tiles: past a cluster's 16 blocks
    (1, 70, 313, 64, torch.bfloat16, "mma"),  # a prompt past the kernel's shared memory
    (1, 70, 20, 36, torch.bfloat16, "mma"),   # rows not 16-byte multiples
    (1, 70, 20, 64, torch.float32, "mma"),    # fp32
    (1, 70, 20, 64, torch.bfloat16, "fma"),   # no tensor-core path
])
def test_emulated_one_cluster_declined(emu, B, N, T, D, dtype, build):
    """Where the one-cluster kernel does not apply, kernels A and B run, right."""
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, "all", seed=N)
    idx, _ = emu[build]("select", patches, task, task_mask, patch_mask, one_cluster=True)
    assert not emu[build].one_cluster
    check_selection(idx, patches, task, task_mask, patch_mask)


def test_emulated_one_cluster_samples_in_any_order(emu, monkeypatch):
    """A cluster a sample (v81) on inputs whose samples and rows lie apart (batch strides past N
    rows and T tokens, a row stride past D): each cluster reads its own sample's rows and masks
    and writes its own outputs, whichever order the clusters run in (FASTPRUNE_EMU_BLOCK_ORDER:
    the kernel keeps no state across samples, such as a running maximum of the counts, that one
    of them would have to reset first). prune (implicit: counts of each sample's own) sizes its
    output by the largest count."""
    B, N, T, D = 3, 70, 20, 128
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, torch.bfloat16, "all", seed=11)
    # Rows 24 elements apart beyond D and samples 5 rows / 3 tokens apart (16-byte multiples)
    wide = torch.zeros(B, N + 5, D + 24, dtype=patches.dtype)
    wide[:, 2 : N + 2, :D] = patches
    patches = wide[:, 2 : N + 2, :D]
    long_task = torch.zeros(B, T + 3, D, dtype=task.dtype)
    long_task[:, 1 : T + 1] = task
    task = long_task[:, 1 : T + 1]
    lib = emu["mma"]
    monkeypatch.delenv("FASTPRUNE_EMU_BLOCK_ORDER", raising=False)
    want = {}
    for op, kw in (("prune", {}), ("padded", dict(max_tokens=30, mask_voters=True))):
        out, idx, _ = lib(op, patches, task, task_mask, patch_mask, one_cluster=True, **kw)
        assert lib.one_cluster and lib.launches == (2 if op == "prune" else 1)
        check_selection(idx, patches, task, task_mask, patch_mask)
        check_prune(out, patches, idx, patch_mask, kw.get("keep_tokens"), op == "padded", kw.get("max_tokens"))
        want[op] = (out, idx)
    counts = want["prune"][0].counts
    assert len(set(counts.tolist())) > 1 and int(counts.max()) == want["prune"][0].pruned.shape[1]
    for seed in (1, 2, 3):
        monkeypatch.setenv("FASTPRUNE_EMU_BLOCK_ORDER", str(seed))
        for op, kw in (("prune", {}), ("padded", dict(max_tokens=30, mask_voters=True))):
            out, idx, _ = lib(op, patches, task, task_mask, patch_mask, one_cluster=True, **kw)
            assert torch.equal(idx, want[op][1]), (seed, op)
            assert all(torch.equal(a, b) for a, b in zip(out, want[op][0])), (seed, op)


@pytest.mark.parametrize("B,N,T,D,sms,cluster,op", [
    (2, 70, 20, 256, 16, False, "prune"),    # plain kernel A, D in 4 slices: any slice finishes
    (2, 70, 20, 192, 16, True, "padded"),    # clusters of 3 slices
    (2, 192, 150, 64, 1, False, "padded"),   # kernel B: 2 column splits over 3 tiles per row tile
    (3, 130, 40, 128, 2, True, "prune"),     # no D split, 6 blocks on 2 SMs; 3 samples' tails
])
@pytest.mark.parametrize("build", ["mma", "fma"])
def test_emulated_block_order_does_not_matter(emu, monkeypatch, B, N, T, D, sms, cluster, op, build):
    """The emulator runs clusters in grid order unless FASTPRUNE_EMU_BLOCK_ORDER shuffles them
    (cuda_emu.h): in three shuffled orders, other blocks arrive last at kernel A's row-tile
    counters and kernel B's sample counters, and every output is bit for bit the grid order's
    (the partials are added in slice order and the merges are exact), and right."""
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, torch.bfloat16, "absent_camera", seed=N)
    kw = dict(keep_tokens=11) if op == "prune" else dict(max_tokens=9)
    lib = emu[build]
    monkeypatch.delenv("FASTPRUNE_EMU_BLOCK_ORDER", raising=False)
    want, want_idx, ksplit = lib(op, patches, task, task_mask, patch_mask, mask_voters=True, num_sms=sms,
                                 cluster=cluster, **kw)
    assert lib.clustered == cluster
    check_selection(want_idx, patches, task, task_mask, patch_mask)
    check_prune(want, patches, want_idx, patch_mask, kw.get("keep_tokens"), True, kw.get("max_tokens"))
    for seed in (1, 2, 3):
        monkeypatch.setenv("FASTPRUNE_EMU_BLOCK_ORDER", str(seed))
        out, idx, got_split = lib(op, patches, task, task_mask, patch_mask, mask_voters=True, num_sms=sms,
                                  cluster=cluster, **kw)
        assert got_split == ksplit and torch.equal(idx, want_idx)
        assert all(torch.equal(a, b) for a, b in zip(out, want)), seed


# emu_race.cpp's OP DTYPE B N T D SMS CLUSTER VALID OFFSET KEEP MAX (op 0 select, 1 prune,
# 2 prune_padded; dtype 0 fp32, 1 fp16, 2 bf16), prompt tokens [OFFSET, OFFSET + VALID) valid.
TSAN_CASES = {
    # Kernel A as clusters, 2 D slices of 4 steps (a step's buffer stored again two steps after
    # its product read it, v75) over 2 token tiles (100 valid prompt tokens), bf16.
    "cluster_steps_token_tiles": "2 2 1 65 150 512 3 1 100 20 0 9",
    "plain_fp32_8_steps": "1 0 1 65 150 512 3 0 100 20 9 0",  # the same without clusters
    "no_split_finish_in_block": "0 1 2 70 150 320 1 0 100 20 0 0",  # kernel A's own finishing step (v72)
    "select_3_column_tiles": "1 2 2 130 20 64 132 0 12 3 5 0",
    "cluster_one_split": "2 1 1 130 40 128 2 1 30 0 0 7",
    # The one-cluster kernel (v80): 9 blocks of 16 rows, 10 D steps (the ring of 8 wraps), a prompt range
    # after token 0 (the first copies again) over 2 token tiles.
    "one_cluster_ring": "2 2 1 130 150 640 132 2 100 20 0 9",
    "one_cluster_two_samples": "1 2 2 70 40 256 132 2 30 5 0 0",  # a cluster a sample (v81), prune
    # Two samples' gathers, each block's keep rule on the picks it read from the others (v84).
    "one_cluster_two_gathers": "2 1 2 70 40 256 132 2 30 5 6 20",
}


def test_emulated_kernels_race_free(builds):
    """ThreadSanitizer over the emulated kernels (tests/cpp/emu_race.cpp, cuda_emu.h under
    -fsanitize=thread: CUDA threads ordered only by barriers and atomics). It reports the planted
    race (two warps' shared-memory stores and loads without a barrier) and not its fixed
    version; the kernels (each case run twice on one workspace) report none."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    rc, log = builds.wait("emu:tsan")
    if rc != 0 and "tsan" in log.lower() and ("cannot find" in log or "not found" in log):
        pytest.skip(f"no ThreadSanitizer runtime: {log.strip().splitlines()[-1]}")
    assert rc == 0, f"emu:tsan failed:\n{log[-6000:]}"
    exe = str(builds.dirs["root"] / "emu_race")
    planted = subprocess.run([exe, "planted", "0"], capture_output=True, text=True, timeout=120)
    if "FATAL: ThreadSanitizer" in planted.stderr:  # e.g. an address-space layout it cannot map
        pytest.skip(planted.stderr.strip().splitlines()[0])
    assert "WARNING: ThreadSanitizer: data race" in planted.stderr and "emu_race.cpp" in planted.stderr
    fixed = subprocess.run([exe, "planted", "1"], capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0 and "ThreadSanitizer" not in fixed.stderr, fixed.stderr[-4000:]
    procs = {name: subprocess.Popen([exe, *args.split()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in TSAN_CASES.items()}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        # clustered=: emu_prune's cluster word; bit 1, the one-cluster kernel ran
        one = re.search(r"clustered=(\d+)", out)
        if proc.returncode != 0 or "ThreadSanitizer" in out or (
                name.startswith("one_cluster") and not (one and int(one.group(1)) & 2)):
            failed[name] = out[-3000:]
    assert not failed, "\n".join(f"--- {name}:\n{out}" for name, out in failed.items())


@pytest.mark.parametrize("ws_word", [2, 2**64 - 1, 0x5A17C3E90B6D0000])
@pytest.mark.parametrize("D", [256, 203])  # 16-byte and scalar loads in kernel A
def test_emulated_workspace_needs_no_zeroing(emu, ws_word, D):
    """Nothing zeroes the workspace before the kernels (v61): kernel A's D slices arrive at tagged
    counters (arrive_tagged) and kernel A zeroes kernel B's. Whatever word the workspace starts
    as, every int64 word 2 (an untagged counter's first arrival would take itself for the last
    slice and add partials not yet written) or all ones (both counted by compare-and-swap), or
    a fresh counter (counted by the atomic add), the outputs are the same, also on a second run on
    the workspace the first left (a CUDA-graph replay: the add); every counter ends fresh (the
    emulator checks, code -5)."""
    patches, task, task_mask, patch_mask = make_inputs(2, 70, 20, D, torch.bfloat16, "all", seed=D)
    for build in ("mma", "fma"):
        # 3+ D slices: with 2, a block counted one arrival too many would finish early, and the
        # emulator's next block (blocks run one after another) would finish again, right.
        want, want_idx, ksplit = emu[build]("prune", patches, task, task_mask, patch_mask, keep_tokens=9, num_sms=16)
        assert ksplit >= 3
        check_selection(want_idx, patches, task, task_mask, patch_mask)
        for runs in (1, 2):
            out, idx, _ = emu[build]("prune", patches, task, task_mask, patch_mask, keep_tokens=9, num_sms=16,
                                     ws_word=ws_word, runs=runs)
            assert torch.equal(idx, want_idx)
            check_prune(out, patches, idx, patch_mask, 9, False, None)
            assert all(torch.equal(a, b) for a, b in zip(out, want))


@pytest.mark.parametrize("rms", [
    3e-7,
    pytest.param(1e-7, marks=pytest.mark.xfail(strict=True, reason=(
        "S is stored as fp16 halves at a scale set by D alone: with patches and prompt both ~1e-7 "
        "(mean squares 1e-8 of RMSNorm's eps) |S| falls under fp16's smallest subnormal"))),
])
def test_emulated_inputs_far_below_the_rmsnorm_eps(emu, rms):
    """Patches and prompt scaled far below RMSNorm's eps shrink S by (rms / 1e-3)^2. Down to
    3e-7 the selection holds; at 1e-7 (a fuzz run's case) rows miss the float64 maximum (64 of
    384 on the tensor-core path), while the CPU kernel keeps every row (test_prune.py). A known
    limit, not met by the Triton kernels either (test_prune_triton)."""
    off = 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        patches = torch.randn(2, 64, 64, generator=g) * rms
        task = torch.randn(2, 16, 64, generator=g) * rms
        for build in ("mma", "fma"):
            idx, _ = emu[build]("select", patches, task, num_sms=4)
            off += int(R.selection_errors(idx, patches, task).sum())
    assert off == 0, f"{off} of {2 * 3 * 2 * 64} rows off the float64 maximum"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_fma_fallback(emu, dtype):
    """fp16/bf16 on architectures without bf16 wmma take the FMA path."""
    patches, task, task_mask, patch_mask = make_inputs(2, 70, 20, 256, dtype, "all", seed=4)
    idx, ksplit = emu["fma"]("select", patches, task, task_mask, patch_mask, num_sms=8)
    assert ksplit > 1
    check_selection(idx, patches, task, task_mask, patch_mask)


@pytest.mark.parametrize(
    "masks,budget,mask_voters",
    [(m, b, v) for i, m in enumerate(MASKS) for b, v in (([None, 1, "N", 0.1, 0.5, 1.0][i], i % 2 == 0),
                                                         ([0.5, None, 1, 1.0, "N", 0.1][i], i % 2 == 1))],
)
def test_emulated_prune_modes(emu, masks, budget, mask_voters):
    B, N, T, D = 3, 96, 17, 64
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, torch.float32, masks, seed=7)
    keep_tokens = {None: None, "N": N}.get(budget, budget)
    if isinstance(budget, float):
        keep_tokens = max(1, math.ceil(budget * N))
    out, idx, _ = emu["mma"]("prune", patches, task, task_mask, patch_mask, mask_voters=mask_voters,
                             keep_tokens=keep_tokens, num_sms=16)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, None)
    ref = R.prune_ref(patches, task, task_mask, patch_mask, keep_tokens, mask_voters)
    assert torch.equal(out.counts, ref.counts)
    valid = patch_mask if patch_mask is not None else torch.ones(B, N, dtype=torch.bool)
    assert (out.counts[valid.sum(-1) == 0] == 0).all()


@pytest.mark.parametrize("max_tokens,keep_tokens", [(1, None), (5, 3), (40, None), (200, 30), (40, 30)])
def test_emulated_prune_padded_cap(emu, max_tokens, keep_tokens):
    patches, task, task_mask, patch_mask = make_inputs(4, 150, 9, 64, torch.bfloat16, "all", seed=3)
    out, idx, _ = emu["mma"]("padded", patches, task, task_mask, patch_mask, keep_tokens=keep_tokens,
                             max_tokens=max_tokens)
    assert out.pruned.shape == (4, max_tokens, 64)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens)


@pytest.mark.parametrize("keep_tokens,max_tokens,masks", [(None, 0, "all"), (1, 0, "none"), (57, 0, "all"),
                                                           (299, 0, "all"), (600, 0, "none"), (None, 40, "all"),
                                                           (200, 77, "all")])
def test_emulated_prune_tail_segments(emu, keep_tokens, max_tokens, masks):
    """N = 600: each tail thread owns 3 columns and 3 vote bins, so the cut at v* (ties broken by
    the lower index) falls inside and across segments."""
    patches, task, task_mask, patch_mask = make_inputs(2, 600, 5, 16, torch.float32, masks, seed=11)
    mode = "padded" if max_tokens else "prune"
    out, idx, _ = emu["mma"](mode, patches, task, task_mask, patch_mask, keep_tokens=keep_tokens,
                             max_tokens=max_tokens or None)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens or None)


@pytest.mark.parametrize("keep_tokens,max_tokens", [(300, 0), (None, 100)])
def test_emulated_prune_past_the_shared_memory_tail(emu, keep_tokens, max_tokens):
    """N > 2048: kernel B's tail keeps votes and histogram in the workspace, not shared memory."""
    patches, task, task_mask, patch_mask = make_inputs(1, 2100, 5, 16, torch.float32, "all", seed=9)
    mode = "padded" if max_tokens else "prune"
    out, idx, _ = emu["mma"](mode, patches, task, task_mask, patch_mask, keep_tokens=keep_tokens,
                             max_tokens=max_tokens or None)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens or None)


def test_emulated_strided_inputs(emu):
    """Row strides other than D (slices of wider tensors) and an expanded (stride 0) batch."""
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(2, 50, 72, generator=g).to(torch.float16)
    patches = wide[:, :, 4:68]
    task = torch.randn(1, 10, 64, generator=g).to(torch.float16).expand(2, 10, 64)
    out, idx, _ = emu["mma"]("prune", patches, task, keep_tokens=7)
    check_selection(idx, patches, task, None, None)
    check_prune(out, patches, idx, None, 7, False, None)


@pytest.mark.parametrize("one_cluster", [False, True])
def test_emulated_degenerate_cases_follow_the_spec(emu, one_cluster):
    lib = emu["mma"]
    assert_degenerate_cases(lambda p, t, tm, pm: lib("select", p, t, tm, pm, one_cluster=one_cluster)[0],
                            lambda p, t, tm, pm: lib("prune", p, t, tm, pm, one_cluster=one_cluster)[0],
                            dtype=torch.float16)  # the one-cluster kernel takes 16-bit inputs only
    assert lib.one_cluster == one_cluster


def test_emulated_ties_pick_lowest_index(emu):
    assert_ties_go_low(lambda p, t: emu["mma"]("select", p, t)[0],
                       lambda p, t, k: emu["mma"]("prune", p, t, keep_tokens=k)[0].kept_idx)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_emulated_nonfinite_inputs(emu, value):
    patches, task, task_mask, patch_mask = make_inputs(2, 40, 6, 32, torch.float32, "all", seed=5)
    patches[0, 3, 1] = value
    task[1, 0, 0] = value
    for kwargs in ({}, {"keep_tokens": 5}, {"max_tokens": 7}):
        out, idx, _ = emu["mma"]("padded" if "max_tokens" in kwargs else "prune", patches, task, task_mask,
                                 patch_mask, **kwargs)
        assert ((out.kept_idx >= 0) & (out.kept_idx < 40)).all()
        assert ((idx >= 0) & (idx < 40)).all()


def test_emulator_orders_warps_only_at_barriers(emu):
    """The emulator runs a block's warps one at a time up to a block barrier, in increasing
    order in even blocks and decreasing in odd ones: a read of another warp's shared-memory write
    with no barrier between gets the value from before the write, whichever warp runs first. (It
    once ran every thread to its first wait in turn, and a kernel whose reads all came before a
    warp shuffle passed every emulated test without the barrier that orders them before the next
    tile's writes.)"""
    out = torch.zeros(128)
    lib = emu["fma"].lib
    lib.fp_emu_barrier_probe(1, out.data_ptr())
    t = torch.arange(64)
    want = torch.cat([1000 + (t + 32) % 64, 2000 + (t + 32) % 64]).float()
    assert torch.equal(out, want)
    lib.fp_emu_barrier_probe(0, out.data_ptr())
    # Block 0, warp 0 first: its reads of warp 1's slots see the previous launch's block 1 stamps.
    # Block 1, warp 1 first: its reads of warp 0's slots see block 0's stamps.
    stale = torch.cat([t < 32, t >= 32])
    assert torch.equal(out[~stale], want[~stale])
    assert torch.equal(out[stale] - want[stale], torch.full((64,), 1000.0) * torch.cat([torch.ones(32), -torch.ones(32)]))


def run_probe(builds, call, *args):
    """`call` on the FMA emulator library (`lib`, its arguments `a`) in a child process, which
    an emulator check may abort; it prints "done" when the call returns."""
    code = f"import ctypes, sys, torch; lib = ctypes.CDLL(sys.argv[1]); a = sys.argv[2:]; {call}; print('done')"
    return subprocess.run([sys.executable, "-c", code, str(builds.dirs["root"] / "emu_fma.so"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind,past,report", [(0, 8, "store to misaligned address"),
                                              (1, 1, "index 64 out of bounds for type 'float [64]'")])
def test_emulator_stops_at_undefined_behaviour(builds, emu, kind, past, report):
    """The emulator is built with UBSan (ubsan_flags): a 16-byte store 8 bytes past an aligned
    shared address, and a store one past a 64-float shared array, end the process with the
    sanitizer's report; the same probe in bounds and aligned runs clean."""
    if not builds.ubsan:
        pytest.skip(f"{CXX} does not link UBSan's runtime")
    for p in (0, past):
        proc = run_probe(builds, "lib.fp_emu_ub_probe(int(a[0]), int(a[1]), ctypes.c_void_p(torch.zeros(64).data_ptr()))",
                         kind, p)
        if p == 0:
            assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and "done" not in proc.stdout, proc.stdout
            assert report in proc.stderr, proc.stderr[-2000:]


def test_emulator_refuses_what_the_gpu_refuses(builds, emu):
    """A cluster launch with more dynamic shared memory than its opt-in, an opt-in past 227 KB,
    or more than 16 blocks a cluster (sm_90's non-portable maximum, which fp_launch_cluster opts
    into) aborts the emulator, as the GPU would refuse it; the largest launch the GPU takes runs."""
    kb = 1024
    for smem, opt_in, cluster, ok in ((227 * kb, 227 * kb, 16, True), (100 * kb + 4, 100 * kb, 2, False),
                                      (100 * kb, 228 * kb, 2, False), (1 * kb, 1 * kb, 17, False)):
        proc = run_probe(builds, "lib.fp_emu_launch_probe(ctypes.c_int64(int(a[0])), ctypes.c_int64(int(a[1])), int(a[2]))",
                         smem, opt_in, cluster)
        if ok:
            assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and "cluster launch refused" in proc.stderr, (smem, opt_in, cluster)


def test_emulator_checks_split_cluster_barriers(builds, emu):
    """The cluster barrier's halves (v84: a relaxed arrive once a block is done reading the others'
    shared memory, the wait before it leaves) abort the emulator where PTX leaves them undefined
    or a block could leave early: a wait without an arrival, a second arrival before the wait, a
    thread that ends with its arrival pending. Arrive, then wait, runs."""
    for kind, report in ((0, None), (1, "cluster wait without an arrival"), (2, "cluster arrive with an arrival pending"),
                         (3, "ended with a cluster arrival it never waited for")):
        proc = run_probe(builds, "lib.fp_emu_split_barrier_probe(int(a[0]))", kind)
        if report is None:
            assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and report in proc.stderr, (kind, proc.stderr[-2000:])


@pytest.mark.parametrize("path", ["mma", "fma"])
def test_emulated_nan_column_never_wins(emu, path):
    """The merge ranks NaN below every number (test_prune.assert_nan_columns_never_win). The NaN
    columns are the first a merge thread reads in their tiles (columns 1 and 66: thread mq = 1 of
    tile 0, mq = 2 of tile 1), so a merge that kept a NaN it met first would show; the ties among
    the NaN rows' columns pick column 0."""
    assert_nan_columns_never_win(lambda p, t, pm: emu[path]("select", p, t, None, pm)[0], [1, 66])


@pytest.mark.parametrize("one_cluster", [False, True])
def test_emulated_pi05_shape_bf16(emu, one_cluster):
    """The pi0.5 shape (768 patches, 200 prompt slots with 48 valid, D=2048), tensor-core path,
    D split over 11 slices as on an H100, or the one-cluster kernel (16 blocks of 48 rows, 32 D steps); a
    missing camera keeps nothing."""
    patches, task, task_mask, patch_mask = structured_inputs(batch=1, dtype=torch.bfloat16, absent_cameras=((0, 2),))
    out, idx, ksplit = emu["mma"]("padded", patches, task, task_mask, patch_mask, max_tokens=256,
                                  one_cluster=one_cluster)
    assert emu["mma"].one_cluster == one_cluster and (one_cluster or ksplit > 1)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, None, False, 256)
    assert 20 < int(out.counts) < 200
    assert not ((out.kept_idx[0] >= 512) & out.kept_mask[0]).any()


# The GPU tests of backend="cuda" (beside backend="triton") are tests/test_gpu.py.

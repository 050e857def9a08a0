"""Ahead-of-time compile of every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The launchers themselves run, on empty CPU tensors, with a recording ``wrap`` in place of the
launch: every ``kernel[grid](*args, **kwargs)`` they would issue on a GPU is captured (the eval
launcher is told to build its GPU tiles for a 132-SM H100; select_soft builds GPU tiles whenever
the interpreter is off). Each distinct launch is specialised by triton's own binder (argument
types, 16-byte alignment and divisibility, constexprs, exactly as ``JITFunction.run`` would) and
compiled TTIR -> TTGIR -> LLIR -> PTX -> cubin for ``GPUTarget("cuda", 90, 32)`` with triton's
bundled ptxas. So the signatures cannot drift from the code, and GPU-only compile errors (layouts,
``tl.dot`` shapes, atomics, shared memory over the H100's 227 KB per block) show up here.

Per kernel it prints shared memory (dynamic + static), registers, spill stores and stack frame
and the compile time (``pytest -s`` shows the table); it fails on a compile error, on shared
memory over 227 KB, on a compile slower than ``MAX_COMPILE_S`` (a ptxas that runs for minutes
on the GPU machine eats its time budget), and on a reshape whose compiled registers move
elements (an element order the interpreter does not have; ``reshapes_moving_elements``). The eval
kernels are also compiled for an A100 (sm_80, ``test_eval_kernels_compile_for_sm80``).

The same machinery checks the eval launchers' eager launch cache: under a driver that compiles
for sm_90 and records launches instead of running them (bench/triton_fake_driver.py), the cache
must launch the compiled kernel and arguments that ``JITFunction.run`` would, and
``bench/host_prune.py --fake-driver`` must run.

Skipped when a GPU is present (the GPU runs the real kernels), under ``TRITON_INTERPRET=1``, and
when this triton lacks the compiler API used here (``ASTSource``, ``GPUTarget``, the JIT binder).

The lent GPU machines ship an older triton (``GPU_TRITON``, with their torch 2.11) than the one
torch 2.13 pins here, so ``test_compiles_with_the_gpu_machines_triton`` repeats the bf16 compiles
in a subprocess with that triton installed beside the tests (skipped where it cannot be installed),
and with it the eager launch cache's test (``test_cached_launch_gives_each_launch_what_jit_run_gives_it``)
and the scores kernel's pipeline checks (the race of PERF_LOG v58 was seen with that triton).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib
import re
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAVE_CUDA = torch.cuda.is_available()

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as tcompile
    from triton.runtime.jit import create_function_from_signature

    API = None
except Exception as e:  # pragma: no cover
    API = f"triton compiler API not available: {e!r}"

pytestmark = [
    pytest.mark.skipif(INTERPRET, reason="compiles for the GPU, not the interpreter"),
    pytest.mark.skipif(HAVE_CUDA, reason="a GPU is present: the GPU tests run the real kernels"),
    pytest.mark.skipif(API is not None, reason=str(API)),
]

GPU_TRITON = "3.6.0"  # bench/results/h200-2026-11-26: torch 2.11.0+cu130, triton 3.6.0
CHILD_ENV = "FASTPRUNE_SM90_TRITON_CHILD"
ROOT = pathlib.Path(__file__).resolve().parent.parent
H100_SMS = 132
SMEM_LIMIT = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 (232448 bytes)


class Arch(NamedTuple):
    """A GPU to compile for: compute capability, multiprocessors (they size the launchers'
    grids) and shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""

    name: str
    cc: int
    sms: int
    smem: int


H100 = Arch("H100", 90, H100_SMS, SMEM_LIMIT)
A100 = Arch("A100", 80, 108, 163 * 1024)
MAX_COMPILE_S = 30.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- recording


class Recorder:
    """A ``wrap`` for the launchers: ``wrap(kernel)[grid](*args, **kw)`` records, launches nothing."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append((kernel, grid, args, kwargs))

                return launch

        return _Grid()


@functools.lru_cache(maxsize=None)
def _target_backend(cc: int = 90):
    target = GPUTarget("cuda", cc, 32)
    return target, make_backend(target)


def specialise(kernel, args, kwargs, cc: int = 90):
    """(signature, constexprs, attrs) as triton's JIT would build them for these arguments."""
    _, backend = _target_backend(cc)
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    except (AttributeError, TypeError) as e:  # pragma: no cover (another triton's internals)
        pytest.skip(f"triton's JIT binder differs in this version: {e!r}")
    return signature, constexprs, attrs


def _options(kwargs) -> dict:
    """The compile options among a launch's keyword arguments."""
    return {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}


def launch_key(kernel, args, kwargs, cc: int = 90):
    signature, constexprs, attrs = specialise(kernel, args, kwargs, cc)
    opts = tuple(sorted(_options(kwargs).items()))
    return (kernel.fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())), opts)


def distinct(launches, cc: int = 90):
    """One launch per distinct compiled kernel (in first-seen order)."""
    seen = {}
    for kernel, grid, args, kwargs in launches:
        for i, g in enumerate(grid):  # CUDA grid limits: x < 2^31, y and z <= 65535
            assert 1 <= g <= (2**31 - 1 if i == 0 else 65535), ("grid", kernel.fn.__name__, grid)
        seen.setdefault(launch_key(kernel, args, kwargs, cc), (kernel, args, kwargs))
    return list(seen.values())


@functools.lru_cache(maxsize=None)
def _layout_builder():
    """triton's own layout conversions (gluon's op builder, in triton 3.6 and 3.7), with the
    context it lives in."""
    from triton._C.libtriton import gluon_ir, ir

    ctx = ir.context()
    ir.load_dialects(ctx)
    return ctx, gluon_ir.GluonOpBuilder(ctx)


def _held_elements(layout: str, shape: list[int]) -> tuple[int, int, list[int]]:
    """(warps, lanes, flat row-major element index for each (warp, lane, register)) of a TTGIR
    blocked layout over ``shape``, through triton's linear layout of it. The sizes are powers of
    2, so a flat index is the bit concatenation of the coordinates and XORs as they do."""
    from triton.experimental.gluon.language import BlockedLayout

    assert layout.startswith("#ttg.blocked<"), f"a reshape layout this check does not read: {layout}"
    field = lambda k: [int(x) for x in re.search(k + r" = \[([\d, ]+)\]", layout).group(1).split(",")]
    _, builder = _layout_builder()
    blocked = BlockedLayout(field("sizePerThread"), field("threadsPerWarp"), field("warpsPerCTA"), field("order"))
    ll = builder.to_linear_layout(blocked._to_ir(builder), shape)

    def flat(c):
        i = 0
        for x, n in zip(c, shape):
            i = i * n + x
        return i

    def index(bases, v):
        i = 0
        for bit, base in enumerate(bases):
            if v >> bit & 1:
                i ^= flat(base)
        return i

    nw, nl, nr = (1 << len(b) for b in (ll.warp_bases, ll.lane_bases, ll.reg_bases))
    regs = [index(ll.reg_bases, r) for r in range(nr)]
    held = [index(ll.warp_bases, w) ^ index(ll.lane_bases, lane) ^ r for w in range(nw) for lane in range(nl)
            for r in regs]
    return nw, nl, held


_RESHAPE = re.compile(r"tt\.reshape .*: tensor<((?:\d+x)+)\w+, #(\w+)> -> tensor<((?:\d+x)+)\w+, #(\w+)>")


def reshapes_moving_elements(ttgir: str) -> list[str]:
    """The reshapes of a compiled kernel whose lowering moves elements. Lowered to LLVM, a
    reshape hands each thread's registers to the result layout in register order (triton unpacks
    the source's values and packs them as the result), so it keeps row-major element order only
    where every (warp, lane, register) holds the same flat index in both layouts. v65's reshape
    with ``can_reorder`` did not: each row's sum of squares took other rows' squares on the GPU,
    while the interpreter reshapes in order (PERF_LOG v71; run13/v65_replay replays run 13's
    selections from this mapping)."""
    layouts = dict(re.findall(r"^#(\w+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    moved = []
    for line in ttgir.splitlines():
        m = _RESHAPE.search(line)
        if m is None:
            continue
        src_shape, src, dst_shape, dst = m.groups()
        shape = lambda text: [int(x) for x in text.rstrip("x").split("x")]
        if _held_elements(layouts[src], shape(src_shape)) != _held_elements(layouts[dst], shape(dst_shape)):
            moved.append(line.strip()[:240])
    return moved


def _ptxas_int(pattern, log):
    m = re.search(pattern, log)
    return int(m.group(1)) if m else None


def compile_for(kernel, args, kwargs, label, cc: int = 90):
    """Compile one launch to a cubin (for sm_``cc``); returns its resource report."""
    target, _ = _target_backend(cc)
    signature, constexprs, attrs = specialise(kernel, args, kwargs, cc)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    opts = _options(kwargs)
    log = io.StringIO()
    t0 = time.perf_counter()
    # A fresh cache: ptxas runs (and reports) every time, nothing stale is reused.
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = tcompile(src, target=target, options=opts)
        except RuntimeError as e:
            if "ptxas" in str(e) and "not found" in str(e):  # pragma: no cover
                pytest.skip("no ptxas")
            raise
    seconds = time.perf_counter() - t0
    assert compiled.asm.get("cubin"), kernel.fn.__name__
    text = log.getvalue()
    static = _ptxas_int(r"(\d+) bytes smem", text) or 0
    return dict(
        kernel=kernel.fn.__name__,
        label=label,
        warps=compiled.metadata.num_warps,
        stages=compiled.metadata.num_stages,
        shared=compiled.metadata.shared + static,
        regs=_ptxas_int(r"Used (\d+) registers", text),
        spill_stores=_ptxas_int(r"(\d+) bytes spill stores", text),
        stack=_ptxas_int(r"(\d+) bytes stack frame", text),
        # acq_rel atomics: each compiles to a GPU-wide fence, the atomic and an L1 invalidation
        # (MEMBAR.ALL.GPU, ATOMG, CCTL.IVALL on sm_90).
        acq_rel=compiled.asm["ptx"].count(".acq_rel."),
        # Reshapes free to reorder elements: the compiled kernel reads the same registers under
        # another layout, an order the interpreter does not have (PERF_LOG v71).
        reorder=compiled.asm["ttgir"].count("allow_reorder"),
        moved=reshapes_moving_elements(compiled.asm["ttgir"]),
        seconds=round(seconds, 2),
        constexprs={k: v for k, v in kwargs.items() if k.isupper() and k != "DOT_PREC"},
    )


def compile_distinct(launches, labels, dtype, arch: Arch = H100):
    """Compiles each distinct launch once for ``arch``, then checks and reports them all."""
    seen, reports = set(), []
    for (kernel, grid, args, kwargs), label in zip(launches, labels):
        key = launch_key(kernel, args, kwargs, arch.cc)
        if key not in seen:
            seen.add(key)
            reports.append(compile_for(kernel, args, kwargs, f"{dtype} {label}", arch.cc))
    assert len(distinct(launches, arch.cc)) == len(reports)
    check_and_report(reports, arch)
    return reports


def check_and_report(reports, arch: Arch = H100):
    print()
    print(f"{'kernel':22s} {'variant':34s} warps smem_KB regs spill_B stack_B  sec  constexprs")
    for r in reports:
        print(f"{r['kernel']:22s} {r['label']:34s} {r['warps']:5d} {r['shared'] / 1024:7.1f} {r['regs']!s:>4s} "
              f"{r['spill_stores']!s:>7s} {r['stack']!s:>7s} {r['seconds']:4.1f}  {r['constexprs']}")
    too_big = [r for r in reports if r["shared"] > arch.smem]
    assert not too_big, f"shared memory over {arch.smem} bytes ({arch.name} per block): {too_big}"
    slow = [r for r in reports if r["seconds"] > MAX_COMPILE_S]
    assert not slow, f"compiles slower than {MAX_COMPILE_S} s (the GPU machine pays this at first launch): {slow}"
    assert all(r["regs"] is None or r["regs"] <= 255 for r in reports)
    reordered = [(r["kernel"], r["label"]) for r in reports if r["reorder"]]
    assert not reordered, f"reshapes with can_reorder (GPU-only element order, PERF_LOG v71): {reordered}"
    moved = [(r["kernel"], r["label"], r["moved"]) for r in reports if r["moved"]]
    assert not moved, f"reshapes whose compiled registers move elements (PERF_LOG v71): {moved}"


# ----------------------------------------------------------------------------- eval ops


# (B, N, T, D): pi0.5 at B=1 and the largest benchmark shape (B=64, N=1536: 16-row vs 32-row
# score tiles, BLOCK_NALL 1024 vs 2048).
EVAL_SHAPES = [(1, 768, 200, 2048), (64, 1536, 200, 2048)]


def eval_launches(dtype, sms: int = H100_SMS):
    from pi05_fastprune.kernels import prune_triton as K

    rec = Recorder()
    labels = []
    real_config = K._config
    K._config = functools.partial(real_config, gpu_sms=sms)
    try:
        for B, N, T, D in EVAL_SHAPES:
            # Empty (untouched) CPU tensors: only shapes, dtypes and alignment matter here.
            p = torch.empty(B, N, D, dtype=dtype)
            t = torch.empty(B, T, D, dtype=dtype)
            tm = torch.ones(B, T, dtype=torch.bool)
            pm = torch.ones(B, N, dtype=torch.bool)
            for masks in (False, True):
                m = (tm, pm) if masks else (None, None)
                tag = f"B{B} N{N} {'masks' if masks else 'no masks'}"
                for what, call in [
                    ("select", lambda: K.select(p, t, *m, mask_voters=masks, wrap=rec)),
                    ("implicit", lambda: K.prune_padded(p, t, *m, None, 128, masks, wrap=rec)),
                    ("budget", lambda: K.prune_padded(p, t, *m, 64, 128, False, wrap=rec)),
                ]:
                    n0 = len(rec.launches)
                    call()
                    labels += [f"{tag} {what}"] * (len(rec.launches) - n0)
    finally:
        K._config = real_config
    return rec.launches, labels


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_eval_kernels_compile_for_sm90(dtype):
    """The three eval kernels (scores, select + finishing step, gather) for every variant the
    launchers issue: this dtype, with and without masks, select / implicit / budget modes."""
    launches, labels = eval_launches(DTYPES[dtype])
    names = {k.fn.__name__ for k, *_ in launches}
    assert names == {"_scores_kernel", "_select_kernel", "_gather_kernel"}, names
    reports = compile_distinct(launches, labels, dtype)
    # The only acq_rel atomics of a program are its arrival at a finishing step: one atomic add
    # (select), or with a D split the tagged counter's add and, where the add found no tag, its
    # compare-and-swap and retry (scores, v60); merges and the finishing step's reads need no
    # fence of their own (PERF_LOG v44: run 5's select kernel had 15, most of them one after
    # another in its finishing step).
    most = {"_scores_kernel": 3, "_select_kernel": 1, "_gather_kernel": 0}
    fenced = {(r["kernel"], r["label"]): r["acq_rel"] for r in reports if r["acq_rel"] > most[r["kernel"]]}
    assert not fenced, fenced
    # The scores kernel's D steps loaded ahead in registers (pi05 B=1: two steps for 16-bit
    # inputs, one for fp32; PERF_LOG v66) fit without spills.
    ahead = [r for r in reports if r["constexprs"].get("PREFETCH")]
    assert ahead and {r["constexprs"]["PREFETCH"] for r in ahead} == {1 if dtype == "fp32" else 2}, ahead
    assert all(not r["spill_stores"] for r in ahead), ahead


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wide_rows_split_d_at_most_max_ksplit(dtype):
    """Few rows and a wide D (test_gpu's 6 patches of 66000) ask for the most D slices: at most
    MAX_KSPLIT, whose finishing step's unrolled loads compile in seconds without spills (129
    slices took 80 s to compile on the GPU machine in run 13, and spilled 5188 B)."""
    from pi05_fastprune.kernels import prune_triton as K

    rec = Recorder()
    real_config = K._config
    K._config = functools.partial(real_config, gpu_sms=H100_SMS)
    try:
        K.select(torch.empty(1, 6, 66000, dtype=DTYPES[dtype]), torch.empty(1, 3, 66000, dtype=DTYPES[dtype]), None,
                 None, mask_voters=False, wrap=rec)
    finally:
        K._config = real_config
    kernel, _, args, kwargs = next(launch for launch in rec.launches if launch[0].fn.__name__ == "_scores_kernel")
    assert kwargs["KSPLIT"] == K.MAX_KSPLIT
    report = compile_for(kernel, args, kwargs, f"{dtype} B1 N6 D66000")
    check_and_report([report])
    assert not report["spill_stores"], report


def test_eval_kernels_compile_for_sm80():
    """The eval kernels compile for an A100 too (sm_80: no warpgroup MMA, 163 KB of shared
    memory per block, 108 SMs for the launchers' grids): the Triton backend is the GPU backend
    wherever the CUDA C++ kernels were not built."""
    for dtype in ("bf16", "fp32"):
        launches, labels = eval_launches(DTYPES[dtype], A100.sms)
        compile_distinct(launches, labels, dtype, A100)


def _gpu_config(B, N=768, D=2048, dtype=torch.bfloat16, **tuned):
    """The Triton launch parameters (_Cfg) of a pi0.5-like call (200 prompt tokens) on a 132-SM
    GPU, under the sweep's ``tuned`` overrides."""
    from pi05_fastprune.kernels import prune_triton as K

    with K.tuning(**tuned):
        return K._config(torch.empty(B, N, D, dtype=dtype), 200, gpu_sms=H100_SMS)


def test_scores_kernel_runs_one_stage():
    """GPU tiles of the scores kernel run 1 stage at every shape (PERF_LOG v54: 64-row tiles at 3
    stages gave wrong S at pi05 B=64 and B=8 with 4 D slices on an H200); a swept stage count
    stays as set."""
    def cfg(B, dtype, D=2048, **tuned):
        c = _gpu_config(B, D=D, dtype=dtype, **tuned)
        return c.bm1, c.ksplit, c.stages1

    assert cfg(64, torch.bfloat16) == (64, 1, 1)
    assert cfg(8, torch.float16) == (64, 2, 1)
    assert cfg(8, torch.bfloat16, ksplit=4) == (64, 4, 1)
    assert cfg(8, torch.bfloat16, D=1024) == (64, 2, 1)
    assert cfg(1, torch.bfloat16) == (16, 3, 1)
    assert cfg(64, torch.float32) == (32, 1, 1)
    assert cfg(8, torch.bfloat16, stages1=3)[2] == 3


def _launch_b64(kernel_name: str, task_mask: bool = False, **tuned):
    """(kernel, args, kwargs) of one eval kernel's launch at pi05 B=64 (bf16; no masks, or a
    prompt mask) under ``tuned``."""
    from pi05_fastprune.kernels import prune_triton as K

    rec = Recorder()
    real_config = K._config
    K._config = functools.partial(real_config, gpu_sms=H100_SMS)
    tm = torch.ones(64, 200, dtype=torch.bool) if task_mask else None
    try:
        with K.tuning(**tuned):
            p = torch.empty(64, 768, 2048, dtype=torch.bfloat16)
            K.prune_padded(p, torch.empty(64, 200, 2048, dtype=torch.bfloat16), tm, None, None, 128, False, wrap=rec)
    finally:
        K._config = real_config
    kernel, _, args, kwargs = next(launch for launch in rec.launches if launch[0].fn.__name__ == kernel_name)
    return kernel, args, kwargs


def _ttgir(kernel_name: str, task_mask: bool = False, **tuned) -> str:
    """The sm_90 TTGIR of one eval kernel at pi05 B=64 (bf16; no masks, or a prompt mask) under
    ``tuned``."""
    kernel, args, kwargs = _launch_b64(kernel_name, task_mask, **tuned)
    target, _ = _target_backend()
    signature, constexprs, attrs = specialise(kernel, args, kwargs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return tcompile(src, target=target, options=_options(kwargs)).asm["ttgir"]


def test_launch_grids_follow_the_programs_an_sm_holds():
    """Run 14's sweep (H200, pi05 bf16) in the defaults: the 64-row 16-bit score programs take a
    register cap of 168 (3 per SM) only where more of them than 2 per SM hold are launched
    (B=64: 101 vs 125 µs; B=8 runs one wave either way), and the select kernel splits a row's
    columns up to 4 ways where a wave of 2 programs per SM would give fewer (B=8: 4 splits, 14.7
    vs 18.0 µs) and no further where that wave already asks for more (B=1, 1536 patches: 11)."""
    from pi05_fastprune.kernels import prune_triton as K

    def cfg(B, N=768, dtype=torch.bfloat16, **tuned):
        c = _gpu_config(B, N=N, dtype=dtype, **tuned)
        return c.maxnreg1, c.n_split

    assert cfg(64) == (168, 1)
    assert cfg(23) == (168, 1)  # 276 programs of 64 rows: past 2 x 132
    assert cfg(22)[0] == 0 and cfg(8) == (0, 4) and cfg(1) == (0, 22)
    assert cfg(16) == (0, 2) and cfg(1, N=1536) == (0, 11)
    assert cfg(64, dtype=torch.float32)[0] == 0  # 32-row fp32 tiles: no cap measured
    assert cfg(64, maxnreg1=255, n_split=2) == (255, 2)  # the sweep's values stay as set
    # Decided on the swept tiles: 16-row tiles (two steps loaded ahead, ~233 registers) and 3
    # stages stay uncapped at B=64; 8 D slices at B=8 (768 programs) take the cap.
    assert cfg(64, bm1=16)[0] == 0 and cfg(64, stages1=3)[0] == 0 and cfg(8, ksplit=8)[0] == 168
    # maxnreg1=0: the uncapped kernel (a cap of 255 is not that: ptxas allocates differently)
    assert "maxnreg" in _launch_b64("_scores_kernel")[2]
    assert "maxnreg" not in _launch_b64("_scores_kernel", maxnreg1=0)[2]
    # Launches that Inductor compiles (wrap_triton) take no cap: it would not pass it on.
    assert K._reg_cap(168, torch.library.wrap_triton) == {} and K._reg_cap(168, K._identity) == {"maxnreg": 168}


@pytest.mark.parametrize("bk", [128, 64])
def test_scores_pipeline_buffers(bk):
    """PERF_LOG v58, the 3-stage race (runs 7 and 12): at 3 stages the pipeline copies each D
    step's tiles 2 steps ahead and leaves one warpgroup MMA in flight (``pendings = 1``). With
    the tiles also read into registers (their sums of squares) it gives them only 2 shared-memory
    buffers, so the copy 2 steps ahead lands in the buffer the MMA in flight reads. With
    SSQ_LOADS (the sums from loads of their own) they get 3. If this triton allocates 3 either
    way, or waits for every MMA, the race is gone: measure 3 stages again (v54). The same at
    D steps of 64 (the sweep's 3-stage variant with a register cap, v62). At 2 stages the same
    holds one buffer lower: 1 for the copy one step ahead, 2 with SSQ_LOADS."""
    def buffers_and_pendings(ttgir):
        allocs = _tile_buffers(ttgir, bk)
        pendings = {int(n) for n in re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", ttgir)}
        return allocs, max(pendings)

    assert buffers_and_pendings(_ttgir("_scores_kernel", stages1=3, bk=bk)) == ({2}, 1)
    assert buffers_and_pendings(_ttgir("_scores_kernel", stages1=3, ssq_loads=1, bk=bk)) == ({3}, 1)
    assert buffers_and_pendings(_ttgir("_scores_kernel", stages1=2, bk=bk)) == ({1}, 1)
    assert buffers_and_pendings(_ttgir("_scores_kernel", stages1=2, ssq_loads=1, bk=bk)) == ({2}, 1)


def _tile_buffers(ttgir: str, bk: int) -> set[int]:
    """The buffer counts of ``ttgir``'s shared-memory allocations of 64-row bf16 tiles of ``bk``
    columns (one per pipeline stage in flight)."""
    return {int(n) for n in re.findall(rf"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x64x{bk}xbf16", ttgir)}


def _first_loop(ttgir: str) -> str:
    """The body of the first loop of ``ttgir`` that holds a warpgroup MMA."""
    first_dot = ttgir.index("ttng.warp_group_dot ")
    return ttgir[ttgir.rindex("scf.for", 0, first_dot):ttgir.index("scf.yield", first_dot)]


@pytest.mark.parametrize("stages, bk", [(2, 128), (3, 128), (4, 64)])
def test_scores_gram_sums_leave_the_tiles_to_the_mmas(stages, bk):
    """The sweep's ``ssq_mma`` (sums of squares as the diagonals of p p^T and q q^T): the D loop
    reads its tiles only as MMA operands, so it loads them by asynchronous copies alone (no
    ``tt.load`` in it: a load into registers waits out its round trip each step, as SSQ_LOADS's
    do) into one buffer per stage, and waits for a step's MMAs (3) before the copy that reuses
    their buffer: the race of test_scores_pipeline_buffers cannot happen."""
    ttgir = _ttgir("_scores_kernel", stages1=stages, ssq_mma=1, bk=bk, maxnreg1=0)
    loop = _first_loop(ttgir)
    assert loop.count("ttng.warp_group_dot ") == 3
    assert "tt.load " not in loop and loop.count("async_copy_global_to_local") == 2
    assert _tile_buffers(ttgir, bk) == {stages}
    assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["3"]


@pytest.mark.parametrize("stages", [2, 3])
def test_select_tiles_loaded_where_multiplied_pipeline_as_copies(stages):
    """The sweep's ``s_ahead=0``: in the select kernel's one-prompt-tile loop (pi0.5: a prompt mask,
    48 valid tokens) each column tile of S loads where it is multiplied, and triton's pipeline at
    2+ stages turns its two halves' loads into asynchronous copies (no register load left in the
    loop); with the tile loaded one ahead (the default) they stay register loads at any stage count."""
    loop = _first_loop(_ttgir("_select_kernel", task_mask=True, s_ahead=0, stages2=stages))
    assert "tt.load " not in loop and loop.count("async_copy_global_to_local") == 2
    assert loop.count("ttng.warp_group_dot ") == 3
    ahead = _first_loop(_ttgir("_select_kernel", task_mask=True, stages2=stages))
    assert ahead.count("tt.load ") == 2 and "async_copy_global_to_local" not in ahead


def test_scores_sums_of_squares_stay_in_the_thread():
    """PERF_LOG v65 and v71: each D step adds its squares into per-thread partial sums through a
    reshape that keeps element order (check_and_report rejects ``can_reorder``, which mixed rows
    on the GPU in run 13), and triton lays the reshape out so that the D loop moves no data
    across lanes: no layout conversion in it."""
    lines = _ttgir("_scores_kernel").splitlines()
    at = [i for i, line in enumerate(lines) if "tt.reshape" in line]
    assert len(at) == 2, at
    start = max(i for i in range(at[0]) if "scf.for" in lines[i])
    end = next(i for i in range(at[-1], len(lines)) if "scf.yield" in lines[i])
    assert not [line for line in lines[start:end] if "convert_layout" in line]


# The patch tile's reshape in the scores kernel at pi05 B=64 (bf16), sm_90 TTGIR: v65's as run 13 ran
# it (can_reorder: the result layout is triton's default, one row a thread), v71's as now.
_V65_RESHAPE = """
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1, 1], threadsPerWarp = [32, 1, 1], warpsPerCTA = [2, 2, 1], order = [0, 1, 2]}>
#blocked3 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
    %ssp_195 = tt.reshape %ssp_194 allow_reorder efficient_layout : tensor<64x128xf32, #blocked3> -> tensor<64x16x8xf32, #blocked1>
"""
_V71_RESHAPE = """
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1, 8], threadsPerWarp = [2, 16, 1], warpsPerCTA = [4, 1, 1], order = [2, 1, 0]}>
#blocked3 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
    %ssp_155 = tt.reshape %ssp_154 : tensor<64x128xf32, #blocked3> -> tensor<64x16x8xf32, #blocked1>
"""


def test_reshape_check_reads_registers_as_the_gpu_does():
    """The check behind check_and_report's ``moved``: it flags v65's reshape, whose registers
    handed row r's place to squares of 16 other rows (run 13's wrong selections, replayed to the
    row in run13/v65_replay), and passes v71's, whose layout keeps each element in place."""
    assert len(reshapes_moving_elements(_V65_RESHAPE)) == 1
    assert reshapes_moving_elements(_V71_RESHAPE) == []
    # Thread 0 of warp 0 holds rows 0, 8, ..., 56 of the source tile, and row 0 alone of the result.
    _, _, src = _held_elements("#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], warpsPerCTA = "
                               "[4, 1], order = [1, 0]}>", [64, 128])
    _, _, dst = _held_elements("#ttg.blocked<{sizePerThread = [1, 1, 1], threadsPerWarp = [32, 1, 1], warpsPerCTA "
                               "= [2, 2, 1], order = [0, 1, 2]}>", [64, 16, 8])
    assert sorted({i // 128 for i in src[:64]}) == list(range(0, 64, 8))
    assert {i // 128 for i in dst[:64]} == {0}


@pytest.mark.parametrize("kernel_name,tuned,programs", [
    ("_scores_kernel", dict(maxnreg1=168), 3),
    ("_scores_kernel", dict(stages1=3, ssq_loads=1, bk=64, maxnreg1=168), 3),
    ("_select_kernel", dict(bn2=64, maxnreg2=168), 3),
])
def test_register_caps_fit_more_programs_per_sm(kernel_name, tuned, programs):
    """The sweep's register caps (PERF_LOG v62) reach ptxas and buy what they are for: at pi05
    B=64 the capped kernels fit ``programs`` of 4 warps per SM in its 64 K registers and 228 KB
    of shared memory, spilling little or nothing. Uncapped the scores kernel fits 2, and the
    select kernel with 64-column tiles 2 on pi05's masked launch (234 registers) and 3 on this
    unmasked one (143). v64 and v67 took the default select kernel to 120 registers (4
    programs), where a cap of 128 buys nothing."""
    kernel, args, kwargs = _launch_b64(kernel_name, **tuned)
    cap = tuned.get("maxnreg1", tuned.get("maxnreg2"))
    assert kwargs["maxnreg"] == cap
    report = compile_for(kernel, args, kwargs, f"maxnreg {cap}")
    assert report["regs"] <= cap
    # Spills, if any, are pointers kept across the D loop: 40 B for the capped scores kernel since
    # v71 (five 64-bit pointers stored before the loop, loaded after it; sm_90 SASS).
    assert (report["spill_stores"] or 0) <= 40, report
    per_warp = -(-report["regs"] // 8) * 8 * 32  # registers are allocated 8 per thread at a time
    assert 65536 // (per_warp * report["warps"]) == programs, report
    assert 228 * 1024 // (report["shared"] + 1024) >= programs, report  # 1 KB per block for the driver


def test_select_product_mmas_and_waits():
    """PERF_LOG v59: the select kernel's product per column tile is three fp16 warpgroup MMAs,
    each waited for before the next (f16x3, the default; tf32x3 the same with tf32 operands), or
    one over the halves side by side with a single wait (f16x4, for the sweep)."""
    def dots_and_waits(ttgir):
        return len(re.findall(r"ttng\.warp_group_dot ", ttgir)), len(re.findall(r"ttng\.warp_group_dot_wait", ttgir))

    assert dots_and_waits(_ttgir("_select_kernel")) == (3, 3)
    assert dots_and_waits(_ttgir("_select_kernel", sel_prec="f16x4")) == (1, 1)
    assert "f16" in _ttgir("_select_kernel") and "tf32" in _ttgir("_select_kernel", sel_prec="tf32x3")


# ----------------------------------------------------------------------------- eager launches


def _run_view(launches, inputs):
    """Recorded launches with each pointer reduced to the input it points at, or to the order in
    which the run first passed that scratch address (buffers are new each call; the numbering
    keeps which launches share one)."""
    ids = {t.data_ptr(): ("input", i) for i, t in enumerate(inputs) if t is not None}
    scratch = {}
    view = []
    for launcher, grid, stream, function, packed, args in launches:
        args = tuple(ids.get(a) or scratch.setdefault(a, ("scratch", len(scratch))) if i in launcher.pointers else a
                     for i, a in enumerate(args))
        view.append((launcher, grid, stream, function, packed, args))
    return view


def _eval_case(name):
    """(patches, task, task_mask, patch_mask, keep_tokens, max_tokens) on CPU, untouched values."""
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(name.split()[-1], torch.bfloat16)
    B, N, T, D = {"odd": (2, 21, 11, 40), "one": (1, 1, 3, 32)}.get(name.split()[0], (1, 768, 200, 2048))
    if "misaligned" in name:  # contiguous, 4 bytes past a 16-byte boundary
        patches = torch.empty(B * N * D + 2, dtype=dtype)[2:].view(B, N, D)
    else:
        patches = torch.empty(B, N, D, dtype=dtype)
    task = torch.empty(B, T, D, dtype=dtype)
    masks = (None, None) if "nomask" in name else (torch.ones(B, T, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool))
    keep = 5 if "budget" in name else None
    cap = next((int(w[3:]) for w in name.split() if w.startswith("cap")), {"odd": 9, "one": 1}.get(name.split()[0], 256))
    return (patches, task, *masks, keep, cap)


def test_cached_launch_gives_each_launch_what_jit_run_gives_it(tmp_path):
    """kernels.prune_triton's _CachedLaunch (an eager launch after the first of its
    specialisation skips JITFunction.run's binding) launches the compiled kernel that
    JITFunction.run would pick, with the same grid and arguments. Under a driver that compiles for
    sm_90 and records launches (bench/triton_fake_driver.py), each case runs through
    JITFunction.run, then twice through the cache; the cache's second call must match the first
    path launch by launch. The cases share the cache in an order where a key that missed a
    specialisation would reuse the wrong kernel: a patches tensor off 16-byte alignment, no
    masks, fp16/fp32, sizes not divisible by 16, and sizes of 1 (triton makes an int 1 a
    constant). "odd", "odd cap1" and "odd cap16" differ only in the static cap (9, 1, 16), so in
    whether two int arguments are 1 or divisible by 16."""
    sys.path.insert(0, str(ROOT / "bench"))
    from triton_fake_driver import FakeDriver

    from pi05_fastprune.kernels import prune_triton as K

    class Plain:  # not the kernel itself: the launchers take JITFunction.run
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return self.kernel[grid]

    cases = ["pi05", "pi05 misaligned", "pi05 nomask", "pi05 budget", "pi05 fp16", "pi05 misaligned fp32",
             "odd", "odd cap1", "odd cap16", "odd misaligned", "odd budget fp16", "one", "one fp32"]
    real_config = K._config
    K._config = functools.partial(real_config, gpu_sms=H100_SMS)
    kernels = [c.kernel for c in K._CACHED.values()]
    try:
        with knobs.cache.scope(), FakeDriver() as drv:
            knobs.cache.dir = str(tmp_path)
            for name in cases:
                inp = _eval_case(name)
                runs = []
                for wrap in (Plain, K._identity, K._identity):
                    drv.launches.clear()
                    K.prune_padded(*inp, False, wrap=wrap)
                    runs.append(_run_view(drv.launches, inp[:4]))
                assert len(runs[0]) == 3, (name, runs[0])
                assert runs[2] == runs[0], name
    finally:
        K._config = real_config
        for cached in K._CACHED.values():
            cached.compiled.clear()
        for kernel in kernels:  # their kernels compiled for the fake device 0
            kernel.device_caches.clear()


def _plan_view(flat, inputs):
    """``_triton_plan_launches``' launches as (function, grid, block, shared, parameters), each
    pointer reduced as in ``_run_view`` (the plan's buffers are new each call)."""
    ids = {t.data_ptr(): ("input", i) for i, t in enumerate(inputs) if t is not None}
    scratch, view, at = {}, [], 0
    while at < len(flat):
        function, gx, gy, gz, block, shared, n = flat[at:at + 7]
        values = flat[at + 7:at + 7 + n]
        at += 7 + n
        view.append((function, (gx, gy, gz), block, shared, values))
    return view, ids, scratch


def _expected_plan_view(launches, inputs):
    """The fake driver's launches as ``_plan_view`` shows a replay: the kernel's handle, grid,
    threads and shared bytes, and the values of the parameters the kernel receives (constexprs
    dropped; a float as its bits), then triton's two null scratch pointers."""
    view = []
    for launcher, grid, stream, function, packed, args in _run_view(launches, inputs):
        num_warps, _, shared = packed
        values = [struct.unpack("<i", struct.pack("<f", args[i]))[0] if ty == "fp32" else args[i]
                  for i, ty in launcher.params]
        view.append((function, tuple(grid), 32 * num_warps, shared, values + [0, 0]))
    return view


def test_cached_launch_plan_replays_what_the_launch_code_launches(tmp_path):
    """The launch plans that the C++ ops replay for backend="triton" on CUDA (csrc/triton_plan.h,
    recorded by kernels.prune_triton.plan_of). Under the fake driver (sm_90 compiles, launches
    recorded), each case's select, prune and prune_padded calls are recorded and their plans
    stored; then, for every case, on new tensors of the same key, the plan's launches
    (``_triton_plan_launches``: what a replay would launch, without launching) must equal what the
    Python launch code launches for those tensors: kernel handle, grid, block, shared memory and
    every parameter (pointers by the input they point at, or by buffer). All plans are stored
    before any is checked, so a key that missed a difference between two cases (alignment, masks,
    caps of 1 and 16, dtypes) would replay the wrong plan. prune reads another kept count K at the
    check than at the recording (1, 9 or 17), which its gather takes in its grid, its outputs'
    shapes and an argument."""
    sys.path.insert(0, str(ROOT / "bench"))
    from triton_fake_driver import FakeDriver

    from pi05_fastprune.kernels import prune_triton as K

    cases = ["pi05", "pi05 misaligned", "pi05 nomask", "pi05 budget", "pi05 fp16", "odd", "odd cap1", "odd cap16",
             "odd misaligned", "one fp32"]
    real_config, real_read_k = K._config, K._read_k
    K._config = functools.partial(real_config, gpu_sms=H100_SMS)
    kept = {}  # prune's K per case: the kernels do not run, so the test writes the count it reads

    def read_k(ws, at):
        ws[at:at + 1].view(torch.int32).fill_(kept["k"])
        return real_read_k(ws, at)

    K._read_k = read_k
    calls = {  # op -> (launch code, the op's arguments after the tensors)
        "prune_padded": (lambda inp: K.prune_padded(*inp, False), lambda inp: (inp[4], inp[5], False)),
        "prune": (lambda inp: K.prune(*inp[:5], False), lambda inp: (inp[4], None, False)),
        "select": (lambda inp: [K.select(*inp[:4])], lambda inp: (None, None, False)),
    }
    kernels = [c.kernel for c in K._CACHED.values()]
    torch.ops.fastprune._triton_plans_clear()
    try:
        with knobs.cache.scope(), FakeDriver() as drv:
            knobs.cache.dir = str(tmp_path)
            for n, name in enumerate(cases):
                inp = _eval_case(name)
                kept["k"] = 1 + n % 3 * 8  # 1, 9, 17: K at 1 and divisible by 16 or not, one gather kernel
                K.prune_padded(*inp, False)  # compiles (JITFunction.run)
                K.prune(*inp[:5], False)
                for op, (run, tail) in calls.items():
                    with K.recording() as rec:
                        out = list(run(inp))
                    plan = K.plan_of(rec, inp[:4], out)
                    assert plan is not None, (name, op)
                    assert torch.ops.fastprune._triton_plan_put(op, *inp[:4], *tail(inp), plan), (name, op)
            for n, name in enumerate(cases):
                inp = _eval_case(name)  # new tensors, the same key
                kept["k"] = 1 + (n + 1) % 3 * 8  # another K than at the recording
                for op, (run, tail) in calls.items():
                    drv.launches.clear()
                    out = list(run(inp))
                    expected = _expected_plan_view(drv.launches, inp[:4])
                    k = kept["k"] if op == "prune" else None
                    bufs, flat = torch.ops.fastprune._triton_plan_launches(op, *inp[:4], *tail(inp), k)
                    got, ids, scratch = _plan_view(flat, inp[:4])
                    got = [(f, g, b, sh, [ids.get(v) or scratch.setdefault(v, ("scratch", len(scratch)))
                                          if isinstance(e, tuple) else v for v, e in zip(vals, exp[4])])
                           for (f, g, b, sh, vals), exp in zip(got, expected)]
                    assert len(got) == len(expected) == (2 if op == "select" else 3), (name, op)
                    assert got == expected, (name, op)
                    # The plan's outputs are buffers like the launch code's.
                    shapes = [(t.shape, t.dtype) for t in out[:3]]
                    assert [(t.shape, t.dtype) for t in bufs[-len(shapes):]] == shapes, (name, op)
            p, t, tm, pm, keep, cap = _eval_case("odd")
            with pytest.raises(RuntimeError, match="no Triton launch plan"):
                torch.ops.fastprune._triton_plan_launches("prune_padded", p, t, tm, pm, keep, cap + 1, False)

            class Plain:  # launches through JITFunction.run, which the recording does not see
                def __init__(self, kernel):
                    self.kernel = kernel

                def __getitem__(self, grid):
                    return self.kernel[grid]

            with K.recording() as rec:
                out = K.prune_padded(p, t, tm, pm, keep, cap, False, wrap=Plain)
            assert K.plan_of(rec, (p, t, tm, pm), list(out)) is None
    finally:
        torch.ops.fastprune._triton_plans_clear()
        K._config, K._read_k = real_config, real_read_k
        for cached in K._CACHED.values():
            cached.compiled.clear()
        for kernel in kernels:  # their kernels compiled for the fake device 0
            kernel.device_caches.clear()


def test_host_breakdown_with_the_fake_driver(tmp_path):
    """bench/host_prune.py --fake-driver times the Triton layers here (launches run nothing)."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    import host_prune

    assert host_prune.main(["--quick", "--fake-driver", "--reps", "5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "host.json").read_text())
    assert [r["layer"] for r in result["rows"]] == ["api", "op", "call", "triton_op", "launches", "jit_run", "no_launch",
                                                    "gather", "empty"]
    assert all(r["host_us"] > 0 and r["loop_us"] > 0 for r in result["rows"]) and "fake_driver" in result["environment"]
    # The API's eager launches go through the launch cache (_CachedLaunch.launch).
    assert "prune_triton.py" in (profile := (tmp_path / "profile_triton.txt").read_text()) and "(launch)" in profile


# ----------------------------------------------------------------------------- select_soft


# (B, N, T, D, valid prompt tokens, noise variants). BT = next pow2 of the valid count: 64 at
# the training shape (48 of 200), 16 for a short prompt, 256 for a long one (the GPU test's
# masks reach 165). B*N/64 row tiles >= 264 switches to 64-row tiles (bench_train B=32).
SS_CASES = {
    "B8_Tv48": (8, 768, 200, 2048, 48, ("none", "seed", "explicit")),
    "B32_Tv48": (32, 768, 200, 2048, 48, ("seed",)),
    "B2_Tv12": (2, 768, 200, 2048, 12, ("seed",)),
    "B2_Tv165": (2, 768, 200, 2048, 165, ("none", "seed")),
}


def select_soft_launches(dtype, case):
    from pi05_fastprune.kernels import select_soft_triton as SK

    B, N, T, D, tv, noises = SS_CASES[case]
    p = torch.empty(B, N, D, dtype=dtype)
    t = torch.empty(B, T, D, dtype=dtype)
    tm = (torch.arange(T)[None, :] < tv).expand(B, T).contiguous()
    pm = torch.ones(B, N, dtype=torch.bool)
    rec = Recorder()
    labels = []
    for noise in noises:
        kw = {}
        if noise == "seed":
            kw = dict(noise_scale=torch.tensor(1.0), seed=torch.tensor([1, 2], dtype=torch.int64))
        elif noise == "explicit":
            kw = dict(noise_scale=torch.tensor(1.0), noise=torch.empty(B, N, N))
        n0 = len(rec.launches)
        SK.select_soft_fwd(p, t, tm, pm, wrap=rec, **kw)
        SK.select_soft_bwd(torch.empty_like(p), p, t, tm, pm, idx=torch.zeros(B, N, dtype=torch.int64),
                           lse=torch.zeros(B, N), wrap=rec, **kw)
        labels += [f"{case} noise={noise}"] * (len(rec.launches) - n0)
    return rec.launches, labels


@pytest.mark.parametrize("case", list(SS_CASES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_select_soft_kernels_compile_for_sm90(dtype, case):
    """Every select_soft forward and backward kernel the launchers issue for this dtype and shape."""
    launches, labels = select_soft_launches(DTYPES[dtype], case)
    names = {k.fn.__name__ for k, *_ in launches}
    assert {"_prep_kernel", "_fwd_kernel", "_bwd_row_kernel", "_bwd_col_kernel", "_bwd_patch_kernel",
            "_bwd_direct_kernel", "_bwd_task_kernel", "_bwd_task_rms_kernel"} <= names, names
    compile_distinct(launches, labels, dtype)


# ----------------------------------------------------------------------------- the GPU's triton


@pytest.mark.skipif(os.environ.get(CHILD_ENV) == "1", reason="no recursion")
def test_compiles_with_the_gpu_machines_triton(tmp_path):
    import triton

    if triton.__version__ == GPU_TRITON:
        pytest.skip(f"the tests above already ran with triton {GPU_TRITON}")
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"triton=={GPU_TRITON}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"triton {GPU_TRITON} cannot be installed here: {pip.stderr.strip()[-300:]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]), **{CHILD_ENV: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    code = (f"import triton, sys; assert triton.__version__ == {GPU_TRITON!r}, triton.__version__; "
            f"import pytest; sys.exit(pytest.main([{__file__!r}, '-q', '-x', '-p', 'no:cacheprovider', '-k', "
            f"'bf16 or cached_launch or pipeline_buffers or gram_sums or where_multiplied']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # A skip there would be specialise()'s: that triton's JIT binder not understood, nothing compiled.
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " skipped" not in proc.stdout, \
        proc.stdout[-2000:]

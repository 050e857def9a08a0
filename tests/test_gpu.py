"""GPU tests of the eval ops, run against both GPU backends (``backend="triton"`` and
``backend="cuda"``): every dtype incl. bf16, the pi05 shape at B = 1/8/64, odd shapes, every
mask case, budgets, caps, mask_voters, ties, NaN/Inf, strided inputs, int64 offsets,
``torch.compile(fullgraph=True, dynamic=True)`` with one compile across kept counts, the
static-cap op captured in a CUDA graph, and the Triton sweep's pipeline candidates. Skipped
without CUDA (a backend not built or not importable here is skipped by name). ``bench/gpu_check``
runs them with ``-m gpu``.

Selections are checked against the float64 truth (SPEC tolerance, so genuine near-ties may
differ from the CPU's choice); every other output must equal what the reference builds from
the op's own selection, bit for bit.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

import pi05_fastprune as fp
from pi05_fastprune import reference as R
from pi05_fastprune.structured import structured_inputs

from test_cuda_build import select_precision
from test_prune import (MASKS, SHAPES, assert_degenerate_cases, assert_nonfinite_inputs_stay_in_range,
                        assert_ties_go_low, check_prune, make_inputs, well_separated)
from test_prune import check_selection as check_selection_truth

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.fastprune


def _backend_available(name: str) -> str | None:
    """None if `name` runs here, else why not."""
    if name == "cuda":
        from pi05_fastprune.prune import cuda_kernels_built

        return None if cuda_kernels_built() else "pi05_fastprune._C was built without the CUDA kernels"
    from pi05_fastprune import triton_ops

    if not triton_ops.HAVE_TRITON or triton_ops.INTERPRET:
        return "triton is not installed, or runs in the interpreter"
    return None


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    why = _backend_available(request.param)
    if why:
        pytest.skip(why)
    return request.param


def cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


def check_selection(idx, patches, task, task_mask, patch_mask):
    assert idx.is_cuda
    check_selection_truth(idx, patches, task, task_mask, patch_mask)


def test_backends_built():
    """The GPU machine must have both: a silent skip of a whole backend would pass the suite."""
    for name in ("triton", "cuda"):
        assert _backend_available(name) is None, f"{name}: {_backend_available(name)}"


def test_auto_backend(monkeypatch):
    from pi05_fastprune.prune import resolve_backend

    monkeypatch.delenv("FASTPRUNE_BACKEND", raising=False)
    # Both built here (test_backends_built): the CUDA C++ kernels at pi0.5 B=1, Triton from B=8 (run 14).
    assert resolve_backend("auto", torch.device("cuda"), 768) == "cuda"
    assert resolve_backend("auto", torch.device("cuda"), 8 * 768) == "triton"
    monkeypatch.setenv("FASTPRUNE_BACKEND", "triton")
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("B,N,T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_matches_truth(backend, B, N, T, D, dtype):
    patches, task, task_mask, patch_mask = cuda(*make_inputs(B, N, T, D, dtype, "all", seed=N + T))
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    check_selection(idx, patches, task, task_mask, patch_mask)
    again = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    assert torch.equal(idx, again), "not reproducible"


@pytest.mark.parametrize("B,N,T,D", [(2, 40, 12, 48), (1, 768, 48, 2048)])
def test_select_product_on_the_tensor_cores(backend, B, N, T, D):
    """PERF_LOG v59: the select kernels' product on fp16 halves, as the tensor cores compute it.
    Patches within 1e-4 of one vector leave a SPEC margin of ~1e-7 of the scores: operands rounded
    to 10 bits miss it on every row (checked here on the CPU), the kernels on none."""
    patches, task, _, _ = select_precision.near_common(1e-4, B, N, T, D)
    assert select_precision.rows_off(patches, task, how="tf32") == B * N
    patches, task = cuda(patches, task)
    check_selection(fp.select_tokens(patches, task, backend=backend), patches, task, None, None)


def test_select_product_scales_wide_rows(backend):
    """|S| <= D: at D = 66000 with rows along one direction, |S| passes fp16's 65504 unless the
    kernels scale S into its range before taking its fp16 halves (v59)."""
    patches, task = cuda(*select_precision.along_one_direction(B=1, N=6, T=3, D=66000)[:2])
    check_selection(fp.select_tokens(patches, task, backend=backend), patches, task, None, None)


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("budget", [None, 1, "N", 0.1, 0.5])
@pytest.mark.parametrize("mask_voters", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_modes(backend, masks, budget, mask_voters, dtype):
    B, N, T, D = 3, 96, 17, 64
    patches, task, task_mask, patch_mask = cuda(*make_inputs(B, N, T, D, dtype, masks, seed=7))
    keep_tokens = {None: None, "N": N}.get(budget, budget)
    if isinstance(budget, float):
        keep_tokens = max(1, math.ceil(budget * N))
    out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=mask_voters,
                          keep_tokens=keep_tokens, backend=backend)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, None)
    assert out.pruned.shape[1] == max(1, int(out.counts.max()))
    if mask_voters and patch_mask is not None:
        voted = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=True,
                                 backend=backend)
        assert torch.equal(voted, torch.where(patch_mask, idx, -1))


@pytest.mark.parametrize("max_tokens", [1, 5, 40, 200])
@pytest.mark.parametrize("keep_tokens", [None, 3, 30])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_padded_cap(backend, max_tokens, keep_tokens, dtype):
    patches, task, task_mask, patch_mask = cuda(*make_inputs(4, 150, 9, 64, dtype, "all", seed=3))
    out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=keep_tokens,
                          max_tokens=max_tokens, backend=backend)
    assert out.pruned.shape == (4, max_tokens, 64)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_pi05_shape(backend, dtype, batch):
    absent = ((batch - 1, 2),) if batch > 1 else ()
    patches, task, task_mask, patch_mask = structured_inputs(batch=batch, dtype=dtype, absent_cameras=absent,
                                                             seed=batch, device="cuda")
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    check_selection(idx, patches, task, task_mask, patch_mask)
    for keep_tokens, max_tokens in [(None, None), (96, None), (None, 256)]:
        out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=keep_tokens,
                              max_tokens=max_tokens, backend=backend)
        check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens)
    implicit = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    assert (implicit.counts > 20).all() and (implicit.counts < 200).all()


@pytest.mark.parametrize("batch", [1, 64])  # 1: D split into slices (arrival counters), 64: none
def test_a_call_is_three_kernels(backend, batch):
    """One prune_padded call at the pi05 shape puts 3 kernels on the device and nothing else (no
    fill or memset: issue #3's and #4's at most 3 launches; v60, v61), in the launch code's first
    call and in a later call (for Triton, the C++ replay of its launch plan)."""
    p, t, tm, pm = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=3, device="cuda")
    ops._triton_plans_clear()
    for call in ("first", "later"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.prune_padded(p, t, tm, pm, None, 128, False, backend)
            torch.cuda.synchronize()
        work = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(work) == 3 and not any("memset" in w.lower() or "fill" in w.lower() for w in work), (call, work)


def odd_inputs(dtype, seed):
    """CUDA inputs of 3 x 203 patches, 37 prompt tokens, width 1000 (nothing a block multiple),
    sample 1 without a valid prompt token, sample 2 without a valid patch."""
    g = torch.Generator().manual_seed(seed)
    B, N, T, D = 3, 203, 37, 1000
    patches = torch.randn(B, N, D, generator=g).to(dtype)
    task = torch.randn(B, T, D, generator=g).to(dtype)
    task_mask = torch.rand(B, T, generator=g) > 0.6
    task_mask[1] = False
    patch_mask = torch.rand(B, N, generator=g) > 0.2
    patch_mask[2] = False
    return cuda(patches, task, task_mask, patch_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shape(backend, dtype):
    """Nothing a block multiple; one sample without a valid prompt token, one without patches."""
    patches, task, task_mask, patch_mask = odd_inputs(dtype, seed=1)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend=backend)
    check_selection(idx, patches, task, task_mask, patch_mask)
    for keep_tokens, mask_voters, max_tokens in [(None, False, None), (64, True, None), (None, True, 96)]:
        out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=keep_tokens,
                              mask_voters=mask_voters, max_tokens=max_tokens, backend=backend)
        check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, max_tokens)


# Sweep candidates that take triton's pipeline to 2+ stages (PERF_LOG v78, v79), right or not
# before any becomes a default: the scores kernel's sums of squares as Gram diagonals, the select
# kernel's S tiles loaded where they are multiplied.
PIPELINE_VARIANTS = [dict(ssq_mma=1, stages1=2), dict(ssq_mma=1, stages1=3), dict(ssq_mma=1, stages1=4, bk=64),
                     dict(s_ahead=0, stages2=2), dict(s_ahead=0, stages2=3)]


@pytest.mark.parametrize("variant", PIPELINE_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_pipeline_variants(variant, dtype):
    """Each variant's selection within the SPEC tolerance of the float64 truth and its outputs the
    reference's gather of it, at the odd shape (no tile multiple, a sample without prompt, one
    without patches) and at pi05 B=8 (64-row score tiles, D in 2 slices)."""
    why = _backend_available("triton")
    if why:
        pytest.skip(why)
    from pi05_fastprune.kernels import prune_triton as K

    pi05 = structured_inputs(batch=8, dtype=dtype, absent_cameras=((7, 2),), seed=8, device="cuda")
    with K.tuning(**variant):
        for patches, task, task_mask, patch_mask in (odd_inputs(dtype, seed=5), pi05):
            idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, backend="triton")
            check_selection(idx, patches, task, task_mask, patch_mask)
            for keep_tokens, max_tokens in [(None, None), (64, None), (None, 96)]:
                out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask,
                                      keep_tokens=keep_tokens, max_tokens=max_tokens, backend="triton")
                check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens)


def test_backends_agree_on_pi05(backend):
    """The GPU backend and the CPU kernel both pick rows within the SPEC tolerance of the
    float64 maximum, and the same row wherever the float64 best leads its runner-up by more
    than twice that tolerance (elsewhere different summation orders may differ); each one's
    outputs are the gather of its own selection."""
    patches, task, task_mask, patch_mask = structured_inputs(batch=2, dtype=torch.float32, seed=4)
    masks = dict(task_mask=task_mask, patch_mask=patch_mask)
    on_gpu = dict(task_mask=task_mask.cuda(), patch_mask=patch_mask.cuda())
    cpu_idx = fp.select_tokens(patches, task, backend="cpu", **masks)
    gpu_idx = fp.select_tokens(*cuda(patches, task), backend=backend, **on_gpu).cpu()
    for idx in (cpu_idx, gpu_idx):
        check_selection_truth(idx, patches, task, task_mask, patch_mask)
    clear = well_separated(patches, task, task_mask, patch_mask, rel=2e-3)
    assert clear.float().mean() > 0.5  # the comparison covers most rows
    assert torch.equal(gpu_idx[clear], cpu_idx[clear])
    for name, idx in (("cpu", cpu_idx), (backend, gpu_idx)):
        dev = "cpu" if name == "cpu" else "cuda"
        out = fp.prune_tokens(*[t.to(dev) for t in (patches, task)], backend=name,
                              **(masks if dev == "cpu" else on_gpu))
        check_prune(R.PruneResult(*[t.cpu() for t in out]), patches, idx, patch_mask, None, False, None)


@pytest.mark.parametrize("max_tokens", [None, 16])
def test_pruned_rows_carry_the_gather_gradient(backend, max_tokens):
    """As on the CPU (test_prune.py): through the C++ op's autograd kernel ("cuda", and the
    Triton plan replay) and the Triton ops' registered autograd ("triton"), eager and compiled."""
    from conftest import expected_rows_gradient

    patches, task, task_mask, patch_mask = cuda(*make_inputs(3, 96, 17, 64, torch.bfloat16, "all", seed=9))
    weight = torch.randn(3, 96, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).cuda()

    def loss(p, t):
        r = fp.prune_tokens(p, t, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=12,
                            max_tokens=max_tokens, backend=backend)
        return (r.pruned * weight[:, : r.pruned.shape[1]]).sum(), r

    torch._dynamo.reset()
    for f in (loss, torch.compile(loss, fullgraph=True, dynamic=True)):
        p, t = patches.clone().requires_grad_(True), task.clone().requires_grad_(True)
        value, r = f(p, t)
        value.backward()
        expect = expected_rows_gradient(r, weight[:, : r.pruned.shape[1]], p.shape)
        assert torch.equal(p.grad, expect) and t.grad is None
    torch._dynamo.reset()


def test_strided_inputs(backend):
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(2, 300, 2056, generator=g).to(torch.bfloat16).cuda()
    patches = wide[:, :, 4:2052]  # row stride 2056, 8-byte aligned rows
    task = torch.randn(1, 30, 2048, generator=g).to(torch.bfloat16).cuda().expand(2, 30, 2048)
    out = fp.prune_tokens(patches, task, keep_tokens=40, backend=backend)
    idx = fp.select_tokens(patches, task, backend=backend)
    check_selection(idx, patches, task, None, None)
    check_prune(out, patches, idx, None, 40, False, None)


def test_triton_launch_cache_matches_jit_run():
    """The Triton backend's eager launch cache (kernels.prune_triton._CachedLaunch) gives the
    outputs of launches through JITFunction.run, call after call, across specialisations that
    must not share a compiled kernel: a patches tensor 4 bytes off 16-byte alignment, sizes not
    divisible by 16, a static cap of 1 (an int argument triton makes a constant), fp16."""
    why = _backend_available("triton")
    if why:
        pytest.skip(why)
    from pi05_fastprune.kernels import prune_triton as K

    class JitRun:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return self.kernel[grid]

    g = torch.Generator().manual_seed(12)
    for B, N, T, D, cap, dtype, offset in [(1, 768, 200, 2048, 256, torch.bfloat16, 0),
                                            (1, 768, 200, 2048, 256, torch.bfloat16, 2),
                                            (2, 21, 11, 40, 9, torch.bfloat16, 0),
                                            (2, 21, 11, 40, 1, torch.bfloat16, 0),
                                            (2, 21, 11, 40, 16, torch.float16, 2)]:
        flat = torch.randn(B * N * D + offset, generator=g).to(dtype).cuda()
        patches = flat[offset:].view(B, N, D)
        task = torch.randn(B, T, D, generator=g).to(dtype).cuda()
        task_mask = torch.rand(B, T, generator=g).cuda() < 0.6
        want = K.prune_padded(patches, task, task_mask, None, None, cap, False, wrap=JitRun)
        for _ in range(2):  # the first call of a specialisation fills the cache, the second uses it
            got = K.prune_padded(patches, task, task_mask, None, None, cap, False)
            for a, b in zip(got, want):
                assert torch.equal(a, b), (B, N, cap, dtype, offset)


def test_triton_launch_plans_replay_the_launch_code(monkeypatch):
    """backend="triton" through the C++ ops on CUDA: the first call of a key runs the Python
    launch code, which stores the call's launch plan; later calls replay it from C++
    (csrc/triton_plan.h), prune with its host read of K between its launches. A replay gives the
    launch code's outputs bit for bit (select, prune, prune_padded), across keys that
    must not share a plan (16-byte alignment, a cap of 1 (a constant int) and of 16, fp16, no
    masks, a budget), on a side stream, as a new thread's first CUDA work, and captured in a CUDA
    graph. The replays run with the Python launch code disabled, so they cannot fall back to it."""
    why = _backend_available("triton") or _backend_available("cuda")
    if why:
        pytest.skip(why)
    from pi05_fastprune.kernels import prune_triton as K

    g = torch.Generator().manual_seed(13)
    cases = []
    for B, N, T, D, keep, cap, dtype, offset, masked in [(1, 768, 200, 2048, None, 256, torch.bfloat16, 0, True),
                                                          (1, 768, 200, 2048, None, 256, torch.bfloat16, 2, True),
                                                          (2, 21, 11, 40, None, 9, torch.bfloat16, 0, False),
                                                          (2, 21, 11, 40, 3, 1, torch.bfloat16, 0, True),
                                                          (2, 21, 11, 40, None, 16, torch.float16, 2, True)]:
        flat = torch.randn(B * N * D + offset, generator=g).to(dtype).cuda()
        patches = flat[offset:].view(B, N, D)
        task = torch.randn(B, T, D, generator=g).to(dtype).cuda()
        tm = (torch.rand(B, T, generator=g) < 0.6).cuda() if masked else None
        pm = (torch.rand(B, N, generator=g) < 0.9).cuda() if masked else None
        cases.append(((patches, task, tm, pm), keep, cap))
    ops._triton_plans_clear()
    want = []
    for inp, keep, cap in cases:
        want.append((K.select(*inp), K.prune_padded(*inp, keep, cap, False), K.prune(*inp, keep, False)))
        ops.select(*inp, False, "triton")  # records
        ops.prune_padded(*inp, keep, cap, False, "triton")
        ops.prune(*inp, keep, False, "triton")
        ops._triton_plan_launches("select", *inp, None, None, False)  # raises without a plan
        ops._triton_plan_launches("prune_padded", *inp, keep, cap, False)
        ops._triton_plan_launches("prune", *inp, keep, None, False, 1)

    def no_python(*args, **kwargs):
        raise AssertionError("a call with a launch plan ran the Python launch code")

    for name in ("select", "prune", "prune_padded"):
        monkeypatch.setattr(K, name, no_python)
    side = torch.cuda.Stream()
    for (inp, keep, cap), (sel, padded, pruned) in zip(cases, want):
        for stream in (torch.cuda.current_stream(), side):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                got_sel = ops.select(*inp, False, "triton")
                got = ops.prune_padded(*inp, keep, cap, False, "triton")
                got_pruned = ops.prune(*inp, keep, False, "triton")
            torch.cuda.current_stream().wait_stream(stream)
            assert torch.equal(got_sel, sel), (inp[0].shape, cap)
            assert all(torch.equal(a, b) for a, b in zip(got, padded)), (inp[0].shape, cap)
            assert all(torch.equal(a, b) for a, b in zip(got_pruned, pruned)), (inp[0].shape, keep)
    # A new thread's first CUDA work: a replay makes no runtime call before its launches.
    result = {}

    def replay_in_thread():
        inp, keep, cap = cases[2]
        result["out"] = ops.prune_padded(*inp, keep, cap, False, "triton")
        torch.cuda.synchronize()

    thread = threading.Thread(target=replay_in_thread)
    thread.start()
    thread.join()
    assert all(torch.equal(a, b) for a, b in zip(result["out"], want[2][1]))
    inp, keep, cap = cases[0]
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=side):
        captured = ops.prune_padded(*inp, keep, cap, False, "triton")
    for _ in range(3):  # each replay finds the arrival counters as the one before left them (v60)
        for t in captured:
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, want[0][1]))
    ops._triton_plans_clear()


def test_opcheck(backend):
    """The CUDA-key registrations (the CUDA C++ kernels; Triton's through its launch-plan replay)
    under torch.library.opcheck, as test_prune_compile's CPU cases, gradients included."""
    from test_prune_compile import small_inputs

    patches, task, task_mask, patch_mask = cuda(*small_inputs(dtype=torch.bfloat16, absent=((1, 0),)))
    torch.library.opcheck(ops.select.default, (patches, task, task_mask, patch_mask, True, backend))
    torch.library.opcheck(ops.prune.default, (patches, task, task_mask, patch_mask, 9, False, backend))
    torch.library.opcheck(ops.prune_padded.default, (patches, task, None, patch_mask, None, 16, True, backend))
    p = patches.clone().requires_grad_(True)
    torch.library.opcheck(ops.prune_padded.default, (p, task, task_mask, patch_mask, 9, 16, False, backend))


def test_degenerate_cases_follow_the_spec(backend):
    assert_degenerate_cases(lambda p, t, tm, pm: fp.select_tokens(p, t, task_mask=tm, patch_mask=pm, backend=backend),
                            lambda p, t, tm, pm: fp.prune_tokens(p, t, task_mask=tm, patch_mask=pm, backend=backend),
                            "cuda")


def test_ties_and_determinism(backend):
    assert_ties_go_low(lambda p, t: fp.select_tokens(p, t, backend=backend),
                       lambda p, t, k: fp.prune_tokens(p, t, keep_tokens=k, backend=backend).kept_idx, "cuda")
    # B=1 is where the Triton scores kernel splits D and its slices arrive in any order; B=64 is
    # where its 64-row tiles take D in one slice (at 3 stages there S changed from call to call).
    for batch in (1, 3, 64):
        p, t, tm, pm = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=9, device="cuda")
        outs = [fp.prune_tokens(p, t, task_mask=tm, patch_mask=pm, backend=backend) for _ in range(5)]
        for o in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_inputs(backend, value):
    assert_nonfinite_inputs_stay_in_range(value, "cuda", backend=backend)
    torch.cuda.synchronize()


def test_a_nan_column_never_beats_a_number(backend):
    """A patch row of NaN: every other row picks as if its column were masked out, and the NaN row
    itself (NaN in every column) picks the lowest allowed column, in both backends, as in the CPU
    kernel (test_prune_triton.py; the merges differ only where a row's best is -inf or NaN:
    PERF_LOG v64)."""
    patches, task, _, _ = make_inputs(2, 40, 6, 32, seed=3)
    patches[1, 5] = float("nan")
    without = torch.ones(patches.shape[:2], dtype=torch.bool)
    without[1, 5] = False
    patches, task, without = cuda(patches, task, without)
    idx = fp.select_tokens(patches, task, backend=backend)
    assert torch.equal(idx, fp.select_tokens(patches, task, patch_mask=without, backend=backend))
    assert idx[1, 5] == 0 and (idx[1] != 5).all()


def test_backend_errors(backend):
    patches, task, _, _ = cuda(*make_inputs(1, 8, 3, 16))
    with pytest.raises(RuntimeError, match="backend='cpu' needs CPU tensors"):
        ops.prune(patches, task, None, None, None, False, "cpu")
    with pytest.raises(RuntimeError, match="keep_tokens"):
        ops.prune(patches, task, None, None, 0, False, backend)


def test_int64_offsets(backend):
    """B*N*D > 2^31: the last sample must match the same sample run alone."""
    free, _ = torch.cuda.mem_get_info()
    B, N, T, D = 1100, 768, 16, 2560  # 2.16e9 elements, 4.3 GB in bf16
    if free < 12 * 2**30:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    patches = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    task = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out = ops.prune_padded(patches, task, None, None, 32, 32, False, backend)
    last = ops.prune_padded(patches[-1:].clone(), task[-1:].clone(), None, None, 32, 32, False, backend)
    for a, b in zip(out, last):
        assert torch.equal(a[-1:], b)
    del patches, task, out
    torch.cuda.empty_cache()


def _ops_of(backend):
    """(prune, prune_padded) callables; the Triton ones are the triton_ops Inductor sees."""
    if backend == "triton":
        return ops.triton_prune, ops.triton_prune_padded
    return (lambda p, t, tm, pm, k, v: ops.prune(p, t, tm, pm, k, v, backend),
            lambda p, t, tm, pm, k, c, v: ops.prune_padded(p, t, tm, pm, k, c, v, backend))


def test_compile_once_across_kept_counts(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    prune, prune_padded = _ops_of(backend)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")

    @torch.compile(backend=cnt, fullgraph=True, dynamic=True)
    def f(p, t, tm, pm):
        out = prune(p, t, tm, pm, None, False)
        padded = prune_padded(p, t, tm, pm, None, 128, False)
        return out[0].float().sum(1), out[3], padded[0].float().sum(1), padded[2]

    counts = set()
    for seed in range(4):
        p, t, tm, pm = structured_inputs(batch=1, dtype=torch.bfloat16, seed=seed, device="cuda")
        s, c, ps, pidx = f(p, t, tm, pm)
        eager = prune(p, t, tm, pm, None, False)
        eager_p = prune_padded(p, t, tm, pm, None, 128, False)
        assert torch.equal(c, eager[3])
        torch.testing.assert_close(s, eager[0].float().sum(1))
        torch.testing.assert_close(ps, eager_p[0].float().sum(1))
        assert torch.equal(pidx, eager_p[2])
        counts.add(int(eager[3].max()))
    assert cnt.frame_count == 1, cnt.frame_count
    assert len(counts) > 1, counts


def test_compiled_triton_ops_at_a_capped_batch():
    """pi0.5 at B=32: 384 score programs of 64 rows, where eager launches cap the scores kernel at
    168 registers (PERF_LOG v76) and launches through wrap_triton, which Inductor compiles, take
    no cap. Compiled, the Triton ops give the eager (capped) call's outputs bit for bit (a cap
    changes registers, not the arithmetic), and the eager launch code's scores kernel was
    compiled with the cap."""
    why = _backend_available("triton")
    if why:
        pytest.skip(why)
    from pi05_fastprune.kernels import prune_triton as K

    p, t, tm, pm = structured_inputs(batch=32, dtype=torch.bfloat16, seed=3, device="cuda")
    assert K._config(p, t.shape[1]).maxnreg1 == 168
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.triton_prune_padded(*a, None, 128, False), fullgraph=True)
    got = compiled(p, t, tm, pm)
    want = fp.prune_tokens(p, t, task_mask=tm, patch_mask=pm, max_tokens=128, backend="triton")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with K.recording() as rec:
        K.prune_padded(p, t, tm, pm, None, 128, False)
    scores = [c for c, *_ in rec.launches if c.metadata.name.startswith("_scores_kernel")]
    assert len(scores) == 1 and scores[0].metadata.maxnreg == 168
    assert 0 < scores[0].n_regs <= 168


@pytest.mark.parametrize("batch", [1, 4])  # 1: with the Triton D split (its tagged arrival counters)
def test_cuda_graph_static_cap(backend, batch):
    """prune_padded never syncs with the host: captured once, replayed on new inputs, it gives
    the eager result."""
    _, prune_padded = _ops_of(backend)
    absent = ((0, 2),) if batch == 1 else ((1, 2), (3, 0))
    p, t, tm, pm = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=0, device="cuda",
                                     absent_cameras=absent)
    static = [x.clone() for x in (p, t, tm, pm)]
    run = lambda: prune_padded(*static, 24, 128, True)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (JIT, workspace) outside the capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed in (1, 2):
        new = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=seed, device="cuda",
                                absent_cameras=absent)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = prune_padded(*new, 24, 128, True)
        assert all(torch.equal(a, b) for a, b in zip(captured, eager))


_PDL_CHILD = """
import sys, torch, pi05_fastprune  # noqa: E401,F401
from pi05_fastprune.structured import structured_inputs
out = {}
profile = sys.argv[2:] == ["profile"]  # record the device work: which kernel A ran, a memset?
for batch in (1, 8):
    p, t, tm, pm = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=batch, device="cuda",
                                     absent_cameras=((batch - 1, 2),))
    run = lambda: torch.ops.fastprune.prune_padded(p, t, tm, pm, 96, 256, True, "cuda")  # noqa: E731
    if profile:
        for name, call in (("kernels", lambda: torch.ops.fastprune.select(p, t, tm, pm, False, "cuda")),
                           ("padded_kernels", run)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
            out[f"{name}{batch}"] = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out[f"kernels{batch}"] = sorted(set(out[f"kernels{batch}"]))
    out[f"select{batch}"] = torch.ops.fastprune.select(p, t, tm, pm, False, "cuda").cpu()
    out[f"eager{batch}"] = [x.cpu() for x in run()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    out[f"graph{batch}"] = [x.cpu() for x in captured]
torch.save(out, sys.argv[1])
"""


def test_cuda_dependent_launches_give_the_same_results(tmp_path):
    """FASTPRUNE_CUDA_PDL=1 (opt-in; measured slower on an H200) launches kernels B and C as
    programmatic dependent launches on sm_90+: same selections and outputs as plain launches,
    eager and replayed from a CUDA graph. One process per setting: the binding reads it once."""
    import os
    import subprocess
    import sys

    why = _backend_available("cuda")
    if why:
        pytest.skip(why)
    results = {}
    for pdl in ("0", "1"):
        path = tmp_path / f"pdl{pdl}.pt"
        proc = subprocess.run([sys.executable, "-c", _PDL_CHILD, str(path)], capture_output=True, text=True,
                              env=dict(os.environ, FASTPRUNE_CUDA_PDL=pdl), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[pdl] = torch.load(path)
    for key, plain in results["0"].items():
        with_pdl = results["1"][key]
        plain, with_pdl = (plain, with_pdl) if isinstance(plain, list) else ([plain], [with_pdl])
        assert all(torch.equal(a, b) for a, b in zip(plain, with_pdl)), key


def _child_matches_truth(tmp_path, *args, timeout=300, **env):
    """_PDL_CHILD (with `args`) under the environment variables `env`: its selections are the
    float64 truth's row argmax and its outputs the pruning of them, eager and from a CUDA graph.
    Returns what it saved."""
    import os
    import subprocess
    import sys

    path = tmp_path / "child.pt"
    proc = subprocess.run([sys.executable, "-c", _PDL_CHILD, str(path), *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(path)
    for batch in (1, 8):
        p, t, tm, pm = structured_inputs(batch=batch, dtype=torch.bfloat16, seed=batch, device="cuda",
                                         absent_cameras=((batch - 1, 2),))
        idx = got[f"select{batch}"].cuda()
        check_selection_truth(idx, p, t, tm, pm)
        for key in (f"eager{batch}", f"graph{batch}"):
            check_prune(R.PruneResult(*[x.cuda() for x in got[key]]), p, idx, pm, 96, True, 256)
    return got


def _child_error(tmp_path, **env):
    """_PDL_CHILD under the environment variables `env`, which must make it fail: its stderr."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PDL_CHILD, str(tmp_path / "bad.pt")], capture_output=True,
                          text=True, env=dict(os.environ, **env), timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


def test_cuda_ksplit_override(tmp_path):
    """FASTPRUNE_CUDA_KSPLIT (gpu_check's bench_ksplit sweep) fixes kernel A's D slices: the
    selections are still the float64 truth's row argmax and the outputs the pruning of them,
    eager and from a CUDA graph; a bad value is an error that names the variable."""
    why = _backend_available("cuda")
    if why:
        pytest.skip(why)
    _child_matches_truth(tmp_path, FASTPRUNE_CUDA_KSPLIT="4")
    assert "FASTPRUNE_CUDA_KSPLIT must be an integer in [1, 32]" in _child_error(tmp_path, FASTPRUNE_CUDA_KSPLIT="0")


def test_cuda_cluster_variant(tmp_path):
    """Kernel A runs as thread block clusters by default on sm_90 (FASTPRUNE_CUDA_CLUSTER=0 turns
    that off), no memset either way (v61): at pi05 B=1 8 D slices in one wave, at B=8 2 at two
    blocks per SM. Both ways the selections are the float64 truth's row argmax and the outputs
    the pruning of them, eager and from a CUDA graph. A value other than 0 or 1 is an error naming
    the variable."""
    import os
    import re
    import subprocess
    import sys

    why = _backend_available("cuda")
    if why:
        pytest.skip(why)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need compute capability 9.0")
    for env in ({}, {"FASTPRUNE_CUDA_CLUSTER": "1"}, {"FASTPRUNE_CUDA_CLUSTER": "0"}):
        cluster = env.get("FASTPRUNE_CUDA_CLUSTER", "1") == "1"
        got = _child_matches_truth(tmp_path, "profile", **env)
        for batch in (1, 8):
            work = got[f"kernels{batch}"]
            # scores_kernel<T, kVec, kMinBlocks, kCluster>: demanglers write the bool as true/1
            scores = [re.search(r"scores_kernel<[^>]*,\s*(?:\(bool\))?(true|false|1|0)>", k) for k in work]
            scores = [m.group(1) in ("true", "1") for m in scores if m]
            assert scores == [cluster], (env, work)
            assert not any("memset" in k.lower() for k in work), work
    assert "FASTPRUNE_CUDA_CLUSTER must be 0 or 1, got 'yes'" in _child_error(tmp_path, FASTPRUNE_CUDA_CLUSTER="yes")


def test_cuda_one_cluster(tmp_path):
    """FASTPRUNE_CUDA_ONE_CLUSTER=1 (opt-in, PERF_LOG v80, v81) runs kernels A and B of the pi05
    call as one launch of one 16-block cluster a sample (12 blocks where the device places no 16),
    at B=1 and at B=8, and prune_padded (cap 256) as that launch alone. The selections are the
    float64 truth's row argmax and the outputs the pruning of them, eager and from a CUDA graph.
    A value other than 0 or 1 is an error naming the variable."""
    import re

    why = _backend_available("cuda")
    if why:
        pytest.skip(why)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need compute capability 9.0")
    # A kernel hung at a cluster barrier would hold this xdist worker: a minute is ~5x what the
    # child needs.
    got = _child_matches_truth(tmp_path, "profile", timeout=60, FASTPRUNE_CUDA_ONE_CLUSTER="1")
    for batch in (1, 8):
        work = got[f"kernels{batch}"]
        assert len(work) == 1 and re.search(r"one_cluster_kernel", work[0]), (batch, work)
        padded = got[f"padded_kernels{batch}"]
        assert len(padded) == 1 and re.search(r"one_cluster_kernel", padded[0]), (batch, padded)
    assert "FASTPRUNE_CUDA_ONE_CLUSTER must be 0 or 1, got '2'" in _child_error(tmp_path, FASTPRUNE_CUDA_ONE_CLUSTER="2")


def test_pi05_model_prunes_on_gpu(backend, monkeypatch):
    """The dummy pi0.5 in fp32 on the GPU, pruning through `backend`: the pruned actions equal
    the unpruned model's with the dropped patches masked out of attention (test_model's
    invariant)."""
    import dataclasses

    from conftest import last_kept
    from test_model import CFG, make_inputs

    from pi05_fastprune.model import Pi05

    monkeypatch.setenv("FASTPRUNE_BACKEND", backend)
    model = Pi05(CFG, seed=0).cuda().eval()
    (images, masks, tokens, lang), noise = make_inputs(batch=3, absent=((1, 2),), lang_lens=(5, 11, 8))
    inputs = ([im.cuda() for im in images], [m.cuda() for m in masks], tokens.cuda(), lang.cuda())
    noise = noise.cuda()
    model.config = dataclasses.replace(CFG, token_pruning_enabled=True)
    with torch.no_grad():
        pruned = model.sample_actions(*inputs, noise=noise, num_steps=2)
    kept = last_kept(model)
    n = CFG.num_image_tokens
    assert kept.kept_idx.is_cuda and kept.kept_idx.shape[1] < n
    model.config = dataclasses.replace(CFG, token_pruning_enabled=False)
    with torch.no_grad():
        embs, pad, att, pos = model.embed_prefix(*inputs)
        keep = torch.zeros(3, n, dtype=torch.int64, device="cuda").scatter_add(1, kept.kept_idx,
                                                                                 kept.kept_mask.long()) > 0
        pad = pad.clone()
        pad[:, :n] &= keep
        masked = model.sample_actions_from_prefix((embs, pad, att, pos), noise=noise, num_steps=2)
    # fp32 on the GPU: attention over fewer keys sums in another order (TF32 stays off).
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4)

"""The Triton backend (fastprune::triton_select / triton_prune / triton_prune_padded).

Two groups:
- interpreter tests (CPU, ``TRITON_INTERPRET=1``): fp32/fp16, tiny odd shapes, every mask
  case, implicit and budget modes, caps, mask_voters, ties, NaN/Inf, torch.compile of the
  opaque ops. ``TRITON_INTERPRET`` must be set before triton is imported and would change
  every other test file's triton in the same process, so these tests only run in a process
  of their own: ``test_interpreter_suite`` (collected in the normal run) starts
  ``pytest tests/test_prune_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` and fails
  with its output when that fails. Running this file directly under ``TRITON_INTERPRET=1``
  runs them in-process instead (and the wrapper skips).

The GPU tests of backend="triton" are tests/test_gpu.py, shared with backend="cuda".
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHILD_ENV = "FASTPRUNE_TRITON_INTERPRETER_CHILD"
ROOT = pathlib.Path(__file__).resolve().parent.parent

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

import pi05_fastprune  # noqa: F401,E402
from pi05_fastprune import reference as R  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import select_precision  # noqa: E402
from test_prune import assert_degenerate_cases, well_separated  # noqa: E402
from test_prune import check_selection as check_selection_truth  # noqa: E402

if HAVE_TRITON:
    import triton
    import triton.language as tl

    import pi05_fastprune.triton_ops  # noqa: F401,E402  (registers fastprune::triton_*)
    from pi05_fastprune.kernels import prune_triton as _K

    @triton.jit
    def _scratch_probe(WS, B, N, TS, n_tiles, KSPLIT: tl.constexpr):
        """Marks the scratch regions (test_scratch_layout_fills_the_host_sizes_exactly)."""
        S, A, SP, SSP, SST, ARRIVED = _K._f32_scratch(WS, B, N, TS, KSPLIT, n_tiles)
        KEYS, ORDER, COUNTER, KMAX = _K._i32_scratch(WS, B, N)
        tl.store(S, 1.0)
        tl.store(A, 2.0)
        if KSPLIT > 1:
            tl.store(SP, 3.0)
            tl.store(SSP, 4.0)
            tl.store(SST, 5.0)
            tl.store(SST + KSPLIT * B * n_tiles * TS - 1, 6.0)
            tl.store(ARRIVED, 15)
            tl.store(ARRIVED + 2 * B * n_tiles - 1, 16)
        else:
            tl.store(A + B * N * TS - 1, 6.0)
        tl.store(KEYS + B * N - 1, -7)
        tl.store(ORDER, 12)
        tl.store(COUNTER, 13)
        tl.store(KMAX, 14)

interp = pytest.mark.skipif(not (INTERPRET and HAVE_TRITON), reason="runs in the TRITON_INTERPRET=1 subprocess")

ops = torch.ops.fastprune


# ----------------------------------------------------------------------------- wrapper


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.skipif(os.environ.get(CHILD_ENV) == "1", reason="no recursion")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", str(pathlib.Path(__file__)), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "not test_interpreter_suite and not sm90"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    print(out)
    assert proc.returncode == 0, f"interpreter tests failed (rc={proc.returncode}):\n{out}"
    # the interpreter tests ran: none of them skips there (only sm90 ones are deselected)
    assert " passed" in proc.stdout and not re.search(r"\d+ skipped", proc.stdout), out


# ----------------------------------------------------------------------------- helpers


def make_case(name, dtype=torch.float32, seed=0):
    """Tiny inputs with odd sizes (not block multiples) for each mask case."""
    g = torch.Generator().manual_seed(seed)
    B, cams, per_cam, T, D = 3, 3, 7, 11, 40
    N = cams * per_cam  # 21
    patches = torch.randn(B, N, D, generator=g)
    task = torch.randn(B, T, D, generator=g)
    task_mask = patch_mask = None
    if name == "masks":
        # sample 0: padded prompt (prefix valid) and an absent camera (zeroed, like pi0.5)
        # sample 1: no valid prompt token, all cameras present
        # sample 2: scattered prompt mask, no valid patch at all
        task_mask = torch.zeros(B, T, dtype=torch.bool)
        task_mask[0, :5] = True
        task_mask[2] = torch.rand(T, generator=g) > 0.5
        task_mask[2, 9] = True
        task[0, 5:] *= 30.0  # padding content must not matter
        patch_mask = torch.ones(B, N, dtype=torch.bool)
        patch_mask[0, per_cam : 2 * per_cam] = False
        patches[0, per_cam : 2 * per_cam] = 0.0
        patch_mask[2] = False
    elif name == "prompt_only":
        task_mask = torch.rand(B, T, generator=g) > 0.4
        task_mask[:, 0] = True
    return patches.to(dtype), task.to(dtype), task_mask, patch_mask


CASES = ["plain", "masks", "prompt_only"]


def assert_same(out, ref):
    names = ("pruned", "kept_mask", "kept_idx", "counts")
    for name, a, b in zip(names, out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(a.cpu(), b.cpu()), name


def check_selection(idx, patches, task, task_mask, patch_mask):
    """The float64 truth, and the eager reference's picks on rows without a near-tie."""
    check_selection_truth(idx, patches, task, task_mask, patch_mask)
    ref = R.select_ref(patches, task, task_mask, patch_mask)
    sep = well_separated(patches, task, task_mask, patch_mask)
    assert torch.equal(idx[sep], ref[sep])


# ----------------------------------------------------------------------------- interpreter


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_select_matches_reference_and_truth(case, dtype):
    patches, task, task_mask, patch_mask = make_case(case, dtype)
    idx = ops.triton_select(patches, task, task_mask, patch_mask, False)
    assert idx.dtype == torch.int64 and idx.shape == patches.shape[:2]
    check_selection(idx, patches, task, task_mask, patch_mask)
    if patch_mask is not None:
        # a sample without a valid patch may only pick column 0; others only valid columns
        allowed = R._allowed_columns(patches, patch_mask)
        assert allowed.gather(1, idx).all()
        voting = ops.triton_select(patches, task, task_mask, patch_mask, True)
        assert torch.equal(voting, torch.where(patch_mask, idx, -1))
    # same through the C++ op's backend switch, and reproducible
    assert torch.equal(ops.select(patches, task, task_mask, patch_mask, False, "triton"), idx)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_prune_is_exact_gather_of_own_selection(case, dtype):
    patches, task, task_mask, patch_mask = make_case(case, dtype)
    idx = ops.triton_select(patches, task, task_mask, patch_mask, False)
    for keep_tokens, mask_voters in [(None, False), (6, False), (None, True), (21, True)]:
        out = ops.triton_prune(patches, task, task_mask, patch_mask, keep_tokens, mask_voters)
        ref = R.prune_from_idx(patches, idx, patch_mask, keep_tokens, mask_voters)
        assert_same(out, ref)
        if patch_mask is not None:
            assert patch_mask.gather(1, out[2])[out[1]].all()  # every kept patch is valid
            assert out[3][2] == 0  # sample 2 has no valid patch: keeps none
    # static cap, binding (3) and not binding (25 > N): exactly M rows
    for keep_tokens, cap in [(None, 3), (5, 3), (None, 25)]:
        out = ops.triton_prune_padded(patches, task, task_mask, patch_mask, keep_tokens, cap, False)
        assert_same(out, R.prune_from_idx(patches, idx, patch_mask, keep_tokens, False, cap))


@interp
def test_masked_prompt_over_several_token_tiles():
    """A prompt mask whose valid tokens reach past the first token tile (16 in the interpreter):
    the select kernel's general path, not the one-tile shortcut; sample 1 stays within one tile."""
    g = torch.Generator().manual_seed(6)
    patches, task = torch.randn(2, 30, 24, generator=g), torch.randn(2, 40, 24, generator=g)
    task_mask = torch.zeros(2, 40, dtype=torch.bool)
    task_mask[0, :5] = task_mask[0, 20:35] = True
    task_mask[1, 3:9] = True
    idx = ops.triton_select(patches, task, task_mask, None, False)
    check_selection(idx, patches, task, task_mask, None)
    assert_same(ops.triton_prune(patches, task, task_mask, None, 7, False),
                R.prune_from_idx(patches, idx, None, 7, False))


@interp
def test_prune_matches_reference_end_to_end():
    """The public op with backend="triton": its selection right against the float64 truth,
    its outputs the reference's gather of that selection, and (this case has no near-tie)
    the reference's whole call."""
    patches, task, task_mask, patch_mask = make_case("masks", seed=3)
    every_row = ops.select(patches, task, task_mask, patch_mask, False, "triton")
    check_selection(every_row, patches, task, task_mask, patch_mask)
    idx = ops.select(patches, task, task_mask, patch_mask, True, "triton")
    assert torch.equal(idx, torch.where(patch_mask, every_row, -1))
    for keep_tokens in (None, 4):
        out = ops.prune(patches, task, task_mask, patch_mask, keep_tokens, True, "triton")
        assert_same(out, R.prune_from_idx(patches, idx, patch_mask, keep_tokens, True))
        assert_same(out, R.prune_ref(patches, task, task_mask, patch_mask, keep_tokens, True))


@interp
def test_python_api_backend_triton():
    """prune_tokens / select_tokens(backend="triton") reach the same kernels."""
    import pi05_fastprune as fp

    patches, task, task_mask, patch_mask = make_case("masks", seed=5)
    kw = dict(task_mask=task_mask, patch_mask=patch_mask)
    assert torch.equal(fp.select_tokens(patches, task, backend="triton", **kw),
                       ops.triton_select(patches, task, task_mask, patch_mask, False))
    assert_same(fp.prune_tokens(patches, task, keep_ratio=0.3, backend="triton", **kw),
                ops.triton_prune(patches, task, task_mask, patch_mask, 7, False))
    assert_same(fp.prune_tokens(patches, task, max_tokens=4, backend="triton", **kw),
                ops.triton_prune_padded(patches, task, task_mask, patch_mask, None, 4, False))


@interp
def test_python_api_takes_budgets_as_the_op_schema_does():
    """numpy and 0-d tensor integers as the C++ op takes them; a float names its argument."""
    import numpy as np

    import pi05_fastprune as fp

    patches, task, task_mask, patch_mask = make_case("masks")
    kw = dict(task_mask=task_mask, patch_mask=patch_mask, backend="triton")
    want = fp.prune_tokens(patches, task, keep_tokens=3, max_tokens=4, **kw)
    for k, m in ((np.int64(3), np.int32(4)), (torch.tensor(3), torch.tensor(4))):
        assert_same(fp.prune_tokens(patches, task, keep_tokens=k, max_tokens=m, **kw), want)
    with pytest.raises(ValueError, match="keep_tokens must be an int, got float"):
        fp.prune_tokens(patches, task, keep_tokens=2.0, **kw)
    with pytest.raises(ValueError, match="max_tokens must be an int"):
        fp.prune_tokens(patches, task, max_tokens=3.0, **kw)


@interp
def test_python_api_launches_directly_in_eager_and_through_the_op_when_intercepted():
    """Eager API calls skip the op's dispatch layers; under a dispatch mode (as in export and
    fake-tensor tracing) and under torch.compile the op is called, with the same results."""
    import pi05_fastprune as fp
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    patches, task, task_mask, patch_mask = make_case("masks", seed=5)
    kw = dict(task_mask=task_mask, patch_mask=patch_mask, backend="triton")
    calls = {
        "triton_select": lambda: fp.select_tokens(patches, task, **kw),
        "triton_prune": lambda: fp.prune_tokens(patches, task, keep_tokens=6, **kw),
        "triton_prune_padded": lambda: fp.prune_tokens(patches, task, max_tokens=4, **kw),
    }
    for name, run in calls.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            eager = run()
        assert f"fastprune::{name}" not in {e.name for e in prof.events()}, name
        with Seen() as seen:
            traced = run()
        assert f"fastprune.{name}.default" in seen.ops, (name, seen.ops)
        assert_same(tuple(traced) if name != "triton_select" else (traced,),
                    tuple(eager) if name != "triton_select" else (eager,))

    torch._dynamo.reset()
    compiled = torch.compile(lambda p, t, tm, pm: fp.prune_tokens(
        p, t, task_mask=tm, patch_mask=pm, max_tokens=4, backend="triton").pruned, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(patches, task, task_mask, patch_mask),
                               fp.prune_tokens(patches, task, max_tokens=4, **kw).pruned, rtol=0, atol=0)


@interp
def test_ops_call_their_eager_kernels_not_the_custom_op_wrapper():
    """An eager call of a fastprune::triton_* op reaches the device-key kernel that triton_ops
    registers (the body with plain launches), not custom_op's CompositeExplicitAutograd wrapper
    (backend_impl): the same outputs with fewer host layers."""
    import cProfile
    import pstats

    patches, task, task_mask, patch_mask = make_case("masks", seed=5)
    prof = cProfile.Profile()
    prof.enable()
    ops.triton_select(patches, task, task_mask, patch_mask, False)
    ops.triton_prune(patches, task, task_mask, patch_mask, 6, False)
    ops.triton_prune_padded(patches, task, task_mask, patch_mask, None, 4, False)
    ops.prune_padded(patches, task, task_mask, patch_mask, None, 4, False, "triton")
    prof.disable()
    names = {name for (_, _, name) in pstats.Stats(prof).stats}
    assert {"triton_select", "triton_prune", "triton_prune_padded"} <= names, names
    assert "backend_impl" not in names


@interp
@pytest.mark.parametrize("B,N,TS,ksplit,n_tiles",
                         [(1, 21, 16, 2, 2), (3, 7, 5, 3, 1), (3, 7, 5, 1, 1), (2, 768, 208, 1, 48)])
def test_scratch_layout_fills_the_host_sizes_exactly(B, N, TS, ksplit, n_tiles):
    """The kernels' scratch regions (_i32_scratch, _f32_scratch) and the host's sizes
    (_scratch_sizes) agree: a probe kernel marks each region's first element and the last
    region's last one; the marks land where the host expects them, in the order int32, fp32,
    arrival counters, the last on the buffer's last element, nothing past it, and every region
    start is 16-byte aligned."""
    from pi05_fastprune.kernels import prune_triton as K

    n_ws, arrived_at, kmax_at = K._scratch_sizes(B, N, TS, ksplit, n_tiles)
    guard = 8
    ws = torch.zeros(n_ws + guard)
    _scratch_probe[(1,)](ws, B, N, TS, n_tiles, KSPLIT=ksplit)
    ints = ws.view(torch.int32)
    floats = {float(v): i for i, v in enumerate(ws.tolist()) if v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)}
    marks = {int(v): i for i, v in enumerate(ints.tolist()) if v in (12, 13, 14, 15, 16)}
    assert ws[:2 * B * N].view(torch.int64)[-1] == -7
    assert marks[14] == kmax_at, marks
    starts = [marks[12], marks[13]] + [floats[v] for v in (1.0, 2.0, 3.0, 4.0, 5.0) if v in floats]
    assert starts == sorted(starts) and all(i % 4 == 0 for i in starts), (marks, floats)
    if ksplit > 1:  # the int64 arrival counters end the buffer
        assert floats[6.0] < marks[15] == arrived_at and marks[15] % 4 == 0 and marks[16] == n_ws - 2, (marks, floats)
        assert ws[marks[15]:n_ws].view(torch.int64).tolist() == [15] + [0] * (2 * B * n_tiles - 2) + [16]
    else:  # no arrival counters: the fp32 regions end the buffer
        assert floats[6.0] == n_ws - 1 == arrived_at - 1, floats
    assert not ws[n_ws:].any()


@interp
def test_exact_ties_pick_lowest_column_and_budget_ties_lowest_index():
    g = torch.Generator().manual_seed(1)
    B, N, T, D = 2, 40, 5, 32
    base = torch.randn(B, 8, D, generator=g)
    # Every patch is a copy of one of 8 rows: exact score ties across far-apart columns,
    # in different column tiles and column splits.
    patches = base[:, torch.arange(N) % 8]
    task = torch.randn(B, T, D, generator=g)
    idx = ops.triton_select(patches, task, None, None, False)
    assert (idx < 8).all(), idx  # the lowest copy wins every tie
    check_selection(idx, patches, task, None, None)
    # Budget larger than the voted set: zero-vote patches fill it in index order.
    out = ops.triton_prune(patches, task, None, None, 12, False)
    assert_same(out, R.prune_from_idx(patches, idx, None, 12, False))


@interp
def test_degenerate_cases_follow_the_spec():
    assert_degenerate_cases(lambda p, t, tm, pm: ops.triton_select(p, t, tm, pm, False),
                            lambda p, t, tm, pm: ops.triton_prune(p, t, tm, pm, None, False))


@interp
def test_nan_inf_do_not_crash():
    patches, task, task_mask, patch_mask = make_case("masks")
    patches[1, 4] = float("nan")
    patches[1, 6, 3] = float("inf")
    task[1, 2, 0] = float("-inf")
    idx = ops.triton_select(patches, task, task_mask, patch_mask, False)
    assert ((idx >= 0) & (idx < patches.shape[1])).all()
    out = ops.triton_prune(patches, task, task_mask, patch_mask, None, False)
    assert_same(out, R.prune_from_idx(patches, idx, patch_mask, None, False))
    out = ops.triton_prune_padded(patches, task, task_mask, patch_mask, 4, 4, False)
    assert (out[3] <= 4).all()


@interp
def test_a_nan_column_never_beats_a_number():
    """A patch row of NaN makes its column's scores NaN in every row, and its own row's scores NaN
    in every column (PERF_LOG v64: the merge counts NaN as -inf). Every other row picks as if that
    column were masked out, as the CPU kernel does; the NaN row picks the lowest allowed column."""
    import pi05_fastprune as fp

    patches, task, _, _ = make_case("plain", seed=3)
    patches[1, 5] = float("nan")
    without = torch.ones(patches.shape[:2], dtype=torch.bool)
    without[1, 5] = False
    idx = ops.triton_select(patches, task, None, None, False)
    assert torch.equal(idx, ops.triton_select(patches, task, None, without, False))
    assert idx[1, 5] == 0 and (idx[1] != 5).all()
    assert torch.equal(idx, fp.select_tokens(patches, task, backend="cpu"))


@interp
def test_deterministic_and_batch_independent():
    patches, task, task_mask, patch_mask = make_case("masks", seed=5)
    a = ops.triton_prune(patches, task, task_mask, patch_mask, None, False)
    b = ops.triton_prune(patches, task, task_mask, patch_mask, None, False)
    assert_same(a, b)
    one = ops.triton_select(patches[1:2], task[1:2], task_mask[1:2], patch_mask[1:2], False)
    assert torch.equal(one[0], ops.triton_select(patches, task, task_mask, patch_mask, False)[1])


@interp
@pytest.mark.parametrize("before", ["counts", "random", "fresh", "replay"])
def test_scores_arrival_counters_need_no_zeroed_scratch(monkeypatch, before):
    """On a GPU nothing zeroes the scratch that torch.empty hands the call (ARRIVAL_TAG; the
    interpreter zeroes the counters, see _scratch), so with D in 3 slices the outputs are the
    same whatever the scratch held: "counts", every int64 word 2 (an untagged counter's first
    arrival would take itself for the last slice and add partials not yet written), "random" bits
    (both take the compare-and-swap word), "fresh" counters (the atomic add's count), or
    "replay", the scratch of an earlier call on the same inputs as it left it (CUDA-graph replays
    reuse their memory: the second call counts by the add). Both words of every row tile's
    counter are left fresh."""
    from pi05_fastprune.kernels import prune_triton as K

    patches, task, task_mask, patch_mask = make_case("masks", seed=6)
    args = (patches, task, task_mask, patch_mask)
    with K.tuning(ksplit=3, bk=16):
        cfg = K._config(patches, task.shape[1])
        assert cfg.ksplit == 3
        want = ops.triton_prune_padded(*args, 5, 9, False)
        g = torch.Generator().manual_seed(7)
        made = []

        def dirty(cfg, dev):
            if before == "replay" and made:
                return made[-1]
            t = torch.empty(cfg.n_ws, dtype=torch.float32, device=dev)
            if before == "counts":
                t.view(torch.int64).fill_(2)
            elif before == "fresh":
                t.view(torch.int64).fill_(K.ARRIVAL_TAG.value << 16)
            else:
                t.view(torch.int32).copy_(torch.randint(-2**31, 2**31, (t.numel(),), generator=g, dtype=torch.int32))
            made.append(t)
            return t

        monkeypatch.setattr(K, "_scratch", dirty)
        for _ in range(2):
            assert_same(ops.triton_prune_padded(*args, 5, 9, False), want)
            counters = made[-1][cfg.arrived_at:].view(torch.int64)
            assert counters.numel() == 2 * patches.shape[0] * cfg.n_score_tiles
            assert counters.tolist() == [K.ARRIVAL_TAG.value << 16] * counters.numel()


@interp
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_program_order_does_not_matter(monkeypatch, seed):
    """The interpreter runs a launch's programs in grid order, so the last program to arrive at
    a scores-kernel row-tile counter or a select-kernel sample counter is always the last of its
    group, and a finishing step that worked only for that program would pass. Here each launch's
    program ids are handed out in a shuffled order (the interpreter's set_grid_idx), on scratch
    that starts NaN up to the arrival counters (a partial read before it was written shows,
    rather than an earlier call's equal one): with D in 3 slices and 3 column splits, every
    output is bit for bit the grid order's."""
    from triton.runtime import interpreter as I

    from pi05_fastprune.kernels import prune_triton as K

    patches, task, task_mask, patch_mask = make_case("masks", seed=8)
    args = (patches, task, task_mask, patch_mask)
    with K.tuning(ksplit=3, bk=16, n_split=3, bm2=16, bn2=16):
        want_idx = ops.triton_select(*args, True)
        want = [ops.triton_prune(*args, None, False), ops.triton_prune_padded(*args, 5, 9, True)]
        g = torch.Generator().manual_seed(seed)
        real = I.InterpreterBuilder.set_grid_idx
        order = []

        def shuffled(self, x, y, z):
            nx, ny, nz = self.grid_dim
            if (x, y, z) == (0, 0, 0):  # a new launch
                order[:] = torch.randperm(nx * ny * nz, generator=g).tolist()
            f = order[(x * ny + y) * nz + z]
            real(self, f // (ny * nz), f // nz % ny, f % nz)

        real_scratch = K._scratch

        def poisoned(cfg, dev):
            ws = real_scratch(cfg, dev)
            ws[: cfg.arrived_at].fill_(float("nan"))
            return ws

        monkeypatch.setattr(I.InterpreterBuilder, "set_grid_idx", shuffled)
        monkeypatch.setattr(K, "_scratch", poisoned)
        assert torch.equal(ops.triton_select(*args, True), want_idx)
        assert_same(ops.triton_prune(*args, None, False), want[0])
        assert_same(ops.triton_prune_padded(*args, 5, 9, True), want[1])
    assert order, "the launches went through the shuffled set_grid_idx"


@interp
@pytest.mark.parametrize("rms", [
    3e-7,
    pytest.param(1e-7, marks=pytest.mark.xfail(strict=True, reason=(
        "S is stored as fp16 halves at a scale set by D alone: with patches and prompt both ~1e-7 "
        "(mean squares 1e-8 of RMSNorm's eps) |S| falls under fp16's smallest subnormal"))),
])
def test_inputs_far_below_the_rmsnorm_eps(rms):
    """The CUDA emulator's test_emulated_inputs_far_below_the_rmsnorm_eps on the Triton kernels:
    down to 3e-7 every row holds; at 1e-7 (a fuzz run's case: all 16 rows off) they miss the
    float64 maximum, while the CPU kernel keeps every row (test_prune.py). A known limit."""
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(1, 16, 64, generator=g) * rms
    task = torch.randn(1, 8, 64, generator=g) * rms
    assert not R.selection_errors(ops.triton_select(patches, task, None, None, False), patches, task).any()


@interp
def test_launch_parameters_do_not_change_results():
    """The launch parameters the GPU sweep (bench/tune_triton.py) varies leave the outputs as they
    are: tile sizes, column splits (1 = no merge across programs), D slices (1 = no partials to
    add; 3 slices of 16, 16 and 8), warps, stages, the fp32 dot's precision, A' kept across column
    tiles or not (the prompt fits one token tile here), the scores kernel's D steps loaded 2, 1
    or 0 steps ahead, its sums of squares as Gram diagonals, the select kernel's S tiles loaded
    one ahead or where they are multiplied. Only float rounding can move, and these inputs have no
    near-ties."""
    from pi05_fastprune.kernels import prune_triton as K

    patches, task, task_mask, patch_mask = make_case("masks", seed=4)
    args = (patches, task, task_mask, patch_mask)
    want_idx = ops.triton_select(*args, True)
    want = ops.triton_prune_padded(*args, 5, 9, False)
    for tuned in (dict(bm1=32, bk=64, n_split=1), dict(bm2=32, bn2=16, n_split=3, warps2=2),
                  dict(br=4, bd=64, warps3=1, stages1=2), dict(ksplit=1), dict(ksplit=3, bk=16),
                  dict(dot_prec="tf32x3"), dict(sel_prec="f16x4"), dict(sel_prec="f16x4", a_once=0),
                  dict(sel_prec="tf32x3"), dict(sel_prec="ieee", a_once=0),
                  dict(a_once=0), dict(prefetch1=0), dict(prefetch1=1), dict(ksplit=1, bk=16, prefetch1=0),
                  dict(ssq_mma=1), dict(ssq_mma=1, prefetch1=2), dict(ssq_mma=1, stages1=2), dict(ssq_mma=1, ksplit=1),
                  dict(s_ahead=0), dict(s_ahead=0, stages2=3, n_split=1)):
        with K.tuning(**tuned):
            assert torch.equal(ops.triton_select(*args, True), want_idx), tuned
            assert_same(ops.triton_prune_padded(*args, 5, 9, False), want)
    with pytest.raises(ValueError, match="unknown launch parameter"):
        with K.tuning(block=8):
            pass
    with pytest.raises(ValueError, match="positive ints"):
        with K.tuning(bm1=0):
            pass
    with pytest.raises(ValueError, match="dot_prec one of"):
        with K.tuning(dot_prec="tf32"):
            pass
    with pytest.raises(ValueError, match="sel_prec one of"):
        with K.tuning(sel_prec="f16"):
            pass
    with pytest.raises(ValueError, match="0 or 1"):
        with K.tuning(a_once=2):
            pass
    with pytest.raises(ValueError, match="0, 1 or 2"):
        with K.tuning(prefetch1=3):
            pass
    with pytest.raises(ValueError, match="ssq_loads and ssq_mma"):
        with K.tuning(ssq_loads=1), K.tuning(ssq_mma=1):
            pass


@interp
@pytest.mark.parametrize("sel_prec", ["f16x3", "f16x4"])
def test_select_product_holds_the_margin_where_10_bit_operands_miss_it(sel_prec):
    """PERF_LOG v59: the select kernel's A' S^T as fp16 products of fp16 halves keeps ~22 bits
    (f16x3, the default, and f16x4). Patches close to one common vector (spread 1e-4) give every
    column nearly the same score, so the SPEC margin (1e-3 of a row's score range) is ~1e-7 of the
    scores: operands rounded to 10 bits (plain tf32, bench/select_precision.py) miss it on every
    row, the kernel on none."""
    patches, task, _, _ = select_precision.near_common(1e-4, B=2, N=40, T=12, D=48)
    assert select_precision.rows_off(patches, task, how="tf32") == 80
    assert _K._config(patches, 12).sel_prec == "f16x3"
    with _K.tuning(sel_prec=sel_prec):
        idx = ops.triton_select(patches, task, None, None, False)
    assert not R.selection_errors(idx, patches, task).any()


@interp
def test_select_product_scales_wide_rows_into_the_fp16_range():
    """|S| <= D, and the fp16 halves hold up to 65504: from D = 32769 on, S enters the product
    scaled by a power of 2 (exact), which keeps the choices. Rows of D = 66000 along one
    direction give |S| near D, past 65504 here."""
    assert [_K._config(torch.empty(1, 2, D), 4).s_shift for D in (48, 32768, 32769, 65536, 65537)] == [0, 0, 1, 1, 2]
    patches, task, _, _ = select_precision.along_one_direction(B=1, N=6, T=3, D=66000)
    idx = ops.triton_select(patches, task, None, None, False)
    assert not R.selection_errors(idx, patches, task).any()
    assert torch.equal(idx, R.select_ref(patches, task))


@interp
def test_bad_input_raises_before_kernels():
    patches, task, task_mask, patch_mask = make_case("masks")
    with pytest.raises((ValueError, RuntimeError), match="patches"):
        ops.triton_select(patches[0], task, None, None, False)
    with pytest.raises((ValueError, RuntimeError), match="task_mask"):
        ops.triton_prune(patches, task, task_mask[:, :3], None, None, False)
    with pytest.raises((ValueError, RuntimeError), match="keep_tokens"):
        ops.triton_prune(patches, task, None, None, 0, False)
    with pytest.raises((ValueError, RuntimeError), match="max_tokens"):
        ops.triton_prune_padded(patches, task, None, None, None, 0, False)
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        ops.triton_select(patches, task.double(), None, None, False)


@interp
def test_api_checks_inputs_on_the_python_launch_route():
    """The API's eager Triton calls on CPU tensors launch from Python, where no C++ op checks the
    inputs: the route checks them itself, with the API's ValueError (as after an op's check)."""
    patches, task, task_mask, patch_mask = make_case("masks")
    with pytest.raises(ValueError, match=r"patches must be \[B, N, D\], got shape"):
        pi05_fastprune.select_tokens(patches[0], task, backend="triton")
    with pytest.raises(ValueError, match=r"task_mask must be \["):
        pi05_fastprune.prune_tokens(patches, task, task_mask=task_mask[:, :3], backend="triton")
    with pytest.raises(ValueError, match=r"patch_mask must be bool"):
        pi05_fastprune.prune_tokens(patches, task, patch_mask=patch_mask.int(), max_tokens=4, backend="triton")
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1, got 0"):
        pi05_fastprune.prune_tokens(patches, task, max_tokens=0, backend="triton")


@interp
def test_pruned_rows_carry_the_gather_gradient():
    """As the C++ ops (test_prune.py): pruned's gradient is the gather's, task gets none, in
    eager calls (the API's direct launch steps aside for inputs that need gradients), through
    the Triton ops (their registered autograd) and compiled."""
    from conftest import expected_rows_gradient

    patches, task, task_mask, patch_mask = make_case("masks", seed=4)
    weight = torch.randn(3, 21, 40, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(ops.triton_prune_padded.default,
                          (patches.clone().requires_grad_(True), task, task_mask, patch_mask, 6, 8, True))

    def loss(p, t, max_tokens):
        r = pi05_fastprune.prune_tokens(p, t, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=6,
                                        max_tokens=max_tokens, backend="triton")
        return (r.pruned * weight[:, : r.pruned.shape[1]]).sum(), r

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for max_tokens in (None, 8):
        for f in (loss, compiled):
            p, t = patches.clone().requires_grad_(True), task.clone().requires_grad_(True)
            value, r = f(p, t, max_tokens)
            value.backward()
            assert torch.equal(p.grad, expected_rows_gradient(r, weight[:, : r.pruned.shape[1]], p.shape))
            assert t.grad is None
    torch._dynamo.reset()


@interp
def test_opcheck_and_compile_once_across_kept_counts():
    from torch._dynamo.testing import CompileCounterWithBackend

    patches, task, task_mask, patch_mask = make_case("masks", seed=2)
    # Every check (schema, autograd registration beside the eager device-key kernels, fake
    # tensors, AOT dispatch) for the static-shape ops; schema and fake for the dynamic-K one.
    torch.library.opcheck(ops.triton_prune_padded.default, (patches, task, task_mask, patch_mask, None, 5, True))
    torch.library.opcheck(ops.triton_select.default, (patches, task, task_mask, patch_mask, True))
    torch.library.opcheck(ops.triton_prune.default, (patches, task, task_mask, patch_mask, 4, False),
                          test_utils=("test_schema", "test_faketensor"))

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=cnt, fullgraph=True, dynamic=True)
    def f(p, t, tm, pm):
        out = ops.triton_prune(p, t, tm, pm, None, False)
        return out[0].sum(1), out[3]

    counts = set()
    for seed in range(3):
        p, t, tm, pm = make_case("prompt_only", seed=seed)
        s, c = f(p, t, tm, pm)
        eager = ops.triton_prune(p, t, tm, pm, None, False)
        torch.testing.assert_close(s, eager[0].sum(1))
        counts.add(int(eager[3].max()))
    assert cnt.frame_count == 1, cnt.frame_count
    assert len(counts) > 1, counts  # the kept count did change


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover
    HAVE_HYPOTHESIS = False


if HAVE_HYPOTHESIS:

    @interp
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        B=st.integers(1, 2), N=st.integers(1, 35), T=st.integers(1, 20), D=st.integers(1, 50),
        seed=st.integers(0, 2**16), masks=st.booleans(), budget=st.integers(0, 40),
    )
    def test_random_shapes(B, N, T, D, seed, masks, budget):
        g = torch.Generator().manual_seed(seed)
        patches = torch.randn(B, N, D, generator=g)
        task = torch.randn(B, T, D, generator=g)
        task_mask = torch.rand(B, T, generator=g) > 0.5 if masks else None
        patch_mask = torch.rand(B, N, generator=g) > 0.3 if masks else None
        idx = ops.triton_select(patches, task, task_mask, patch_mask, False)
        check_selection(idx, patches, task, task_mask, patch_mask)
        keep = budget if 1 <= budget <= N else None
        out = ops.triton_prune(patches, task, task_mask, patch_mask, keep, masks)
        assert_same(out, R.prune_from_idx(patches, idx, patch_mask, keep, masks))


# ----------------------------------------------------------------------------- sm_90 compile

# The ahead-of-time sm_90 compile of these kernels (every dtype and mask variant, with shared
# memory, registers and spills) is tests/test_triton_sm90.py.


# The GPU tests of backend="triton" (beside backend="cuda") are tests/test_gpu.py.

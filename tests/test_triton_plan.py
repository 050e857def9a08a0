"""The C++ store of the Triton backend's launch plans (csrc/triton_plan.h), without triton: the
key, the parser's errors, and the buffers and parameter values a replay would launch with.

That the Python launch code records plans which replay what it launches is checked under a fake
driver in tests/test_triton_sm90.py (test_cached_launch_plan_replays_what_the_launch_code_launches),
and on a GPU in tests/test_gpu.py (test_triton_launch_plans_replay_the_launch_code)."""

import struct

import pytest
import torch

import pi05_fastprune  # noqa: F401  (loads the op library)

ops = torch.ops.fastprune
F32, I64, BOOL = 6, 4, 11  # c10::ScalarType codes


def inputs():
    return torch.zeros(2, 5, 8), torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), None


def plan(launch_params, buffers=((F32, [40]), (I64, [2])), outputs=(1,), k_read=(-1, 0, 0)):
    """One launch of kernel 77 on a (4, 2, 1) grid, 128 threads and 1024 shared bytes."""
    out = [2, len(buffers), 1, len(outputs), *k_read]
    for dtype, sizes in buffers:
        out += [dtype, len(sizes), *sizes]
    out += [77, 4, 2, 1, 128, 1024, len(launch_params) // 3, *launch_params]
    return out + list(outputs)


@pytest.fixture(autouse=True)
def empty_store():
    ops._triton_plans_clear()
    yield
    ops._triton_plans_clear()


def test_a_replay_resolves_each_parameter_for_the_call():
    p, t, tm, pm = inputs()
    bits = struct.unpack("<i", struct.pack("<f", 0.125))[0]
    params = [0, 0, 0,  # patches
              0, 2, 16,  # task_mask + 16 bytes
              1, 0, 32,  # buffer 0 + 32 bytes
              2, -7, 0, 3, 2**40, 0, 4, bits, 0, 5, 0, 0]
    encoded = plan(params, buffers=((F32, [40]), (I64, [2]), (BOOL, [2, 3])),
                   outputs=(1, 0, 2, 1))
    assert ops._triton_plan_put("prune_padded", p, t, tm, pm, None, 3, False, encoded)
    for call in range(2):  # new buffers each replay; the same inputs
        bufs, flat = ops._triton_plan_launches("prune_padded", p, t, tm, pm, None, 3, False)
        assert [(b.dtype, tuple(b.shape)) for b in bufs] == [(torch.float32, (40,)), (torch.int64, (2,)),
                                                              (torch.bool, (2, 3))]
        assert flat == [77, 4, 2, 1, 128, 1024, 7, p.data_ptr(), tm.data_ptr() + 16, bufs[0].data_ptr() + 32,
                        -7, 2**40, bits, 0]
    # New inputs with the same key (shapes, dtypes, masks, cap, alignment) resolve to themselves.
    q = torch.ones(2, 5, 8)
    _, flat = ops._triton_plan_launches("prune_padded", q, t, tm, pm, None, 3, False)
    assert flat[7] == q.data_ptr()


@pytest.mark.parametrize("change", ["cap", "keep_tokens", "mask_voters", "patch_mask", "dtype", "shape",
                                    "alignment", "op"])
def test_the_key_tells_calls_apart(change):
    p, t, tm, pm = inputs()
    args = dict(op="prune_padded", p=p, t=t, tm=tm, pm=pm, keep=None, cap=3, mv=False)
    assert ops._triton_plan_put(*args.values(), plan([0, 0, 0], outputs=(1, 1, 1, 1)))
    other = dict(args)
    if change == "cap":
        other["cap"] = 4
    elif change == "keep_tokens":
        other["keep"] = 2
    elif change == "mask_voters":
        other["mv"] = True
    elif change == "patch_mask":
        other["pm"] = torch.ones(2, 5, dtype=torch.bool)
    elif change == "dtype":
        other["p"], other["t"] = p.half(), t.half()
    elif change == "shape":
        other["p"] = torch.zeros(2, 6, 8)
    elif change == "alignment":  # contiguous, 4 bytes past a 16-byte boundary
        other["p"] = torch.zeros(2 * 5 * 8 + 1)[1:].view(2, 5, 8)
    else:
        other["op"] = "select"
        other["cap"] = None
    with pytest.raises(RuntimeError, match="no Triton launch plan"):
        ops._triton_plan_launches(*other.values())
    ops._triton_plan_launches(*args.values())


def test_non_contiguous_inputs_have_no_plan():
    p, t, tm, pm = inputs()
    wide = torch.zeros(2, 5, 16)[:, :, :8]
    assert not ops._triton_plan_put("select", wide, t, tm, pm, None, None, False, plan([0, 0, 0]))
    with pytest.raises(RuntimeError, match="no Triton launch plan"):
        ops._triton_plan_launches("select", wide, t, tm, pm, None, None, False)


@pytest.mark.parametrize("op,encoded,message", [(op, *case) for op, cases in (("select", [
    ([1, 0, 0, 1], "version 1"),
    ([2, 1, 0, 1, -1, 0, 0, F32], "ends early"),
    (plan([0, 0, 0], k_read=(1, 0, 0)), "of select cannot read K"),
    (plan([6, 0, 0]), "uses K in launch 0, before K is read"),
    (plan([0, 0, 0]) + [0], "values past its end"),
    (plan([0, 0, 0], outputs=(2,)), "returns buffer 2 of 2"),
    (plan([0, 0, 0], outputs=(0, 1)), "of select returns 1 tensors, got 2"),
    (plan([1, 1, 16]), "points at buffer 1 \\+ 16, outside it"),
    (plan([0, 4, 0]), "points at input 4"),
    (plan([9, 0, 0]), "unknown kind 9"),
    (plan([0, 0, 0], buffers=((99, [1]), (I64, [2]))), "unknown scalar type 99"),
]), ("prune", [
    ([2, 1, 0, 4, 0, 0, 40, F32, 1, 10, 0, 0, 0, 0], r"reads K at launch 0 from bytes 40 of buffer 0, outside it"),
    ([2, 1, 0, 4, -1, 0, 0, F32, 1, -1, 0, 0, 0, 0], "must read K"),
])) for case in cases])
def test_malformed_plans_are_refused(op, encoded, message):
    p, t, tm, pm = inputs()
    with pytest.raises(RuntimeError, match=message):
        ops._triton_plan_put(op, p, t, tm, pm, None, None, False, encoded)


def test_a_plan_pointing_at_a_missing_mask_is_refused_at_replay():
    p, t, tm, _ = inputs()
    assert ops._triton_plan_put("select", p, t, tm, None, None, None, False, plan([0, 3, 0]))
    with pytest.raises(RuntimeError, match="points at input 3, which the call lacks"):
        ops._triton_plan_launches("select", p, t, tm, None, None, None, False)


def test_prune_takes_k_from_the_host_read():
    """prune's plan: the launches from k_launch on, the buffers with a K dimension (-1) and the
    grids of -b (ceil(K / b)) take the K read on the host, which `_triton_plan_launches` takes as k."""
    p, t, tm, pm = inputs()
    encoded = [2, 3, 2, 4, 1, 0, 12,  # K read before launch 1, from bytes 12 of buffer 0
               F32, 1, 40, I64, 2, 2, -1, BOOL, 3, 2, -1, 5]
    for grid, params in (([1, 2, 1], [1, 0, 0]), ([-8, 3, 2], [1, 1, 0, 6, 0, 0, 1, 2, 0, 3, 9, 0])):
        encoded += [50 + len(encoded), *grid, 64, 0, len(params) // 3, *params]
    encoded += [1, 2, 1, 0]
    assert ops._triton_plan_put("prune", p, t, tm, pm, 2, None, False, encoded)
    for k in (1, 17):
        bufs, flat = ops._triton_plan_launches("prune", p, t, tm, pm, 2, None, False, k)
        assert [tuple(b.shape) for b in bufs] == [(40,), (2, k), (2, k, 5)]
        second = flat[7 + 1:]
        assert second[1:4] == [-(-k // 8), 3, 2]
        assert second[7:] == [bufs[1].data_ptr(), k, bufs[2].data_ptr(), 9]
    with pytest.raises(RuntimeError, match="need k >= 1 exactly when"):
        ops._triton_plan_launches("prune", p, t, tm, pm, 2, None, False)


def test_unknown_op():
    p, t, tm, pm = inputs()
    with pytest.raises(RuntimeError, match="op must be 'select', 'prune' or 'prune_padded', got 'gather'"):
        ops._triton_plan_put("gather", p, t, tm, pm, None, None, False, plan([0, 0, 0]))

"""The training op fastprune::select_soft (+ select_soft_backward): SPEC "Training".

- CPU (C++) against autograd of ``reference.select_soft_ref`` in fp32 and bf16 (masks, absent
  camera, padded prompt, empty prompt / no valid patch, noise 0 and 1, explicit and seeded).
- ``gradcheck`` in float64: the op's analytic gradient against finite differences of the
  straight-through surrogate ``hard @ X + softmax(score'(X, task)) @ X0`` (``X0`` and ``hard``
  held at their values: exactly what ``(hard + soft - soft.detach()) @ X`` differentiates).
- the seeded noise: C++ == numpy Philox, forward and backward see the same noise, generators
  make runs reproducible; opcheck (schema, fake, autograd registration, AOT dispatch).
- Triton: ``*_interp`` tests run only under ``TRITON_INTERPRET=1``, in a subprocess started by
  ``test_triton_interpreter_suite`` (the env var must be set before triton is imported and
  would leak into other test modules); GPU tests run with CUDA.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

SS = importlib.import_module("pi05_fastprune.select_soft")
from pi05_fastprune import reference as R

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHILD_ENV = "FASTPRUNE_SELECT_SOFT_INTERP_CHILD"
ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_CUDA = torch.cuda.is_available()

interp = pytest.mark.skipif(not (INTERPRET and SS.HAVE_TRITON), reason="runs in the TRITON_INTERPRET=1 subprocess")
not_interp = pytest.mark.skipif(INTERPRET, reason="CPU-op tests run in the main process")
skip_gpu = pytest.mark.skipif(INTERPRET or not HAVE_CUDA or not SS.HAVE_TRITON, reason="needs CUDA and triton")


def gpu(fn):
    return pytest.mark.gpu(skip_gpu(fn))

ops = torch.ops.fastprune


# ----------------------------------------------------------------------------- inputs


def make(B=2, cams=3, per_cam=16, T=12, D=64, dtype=torch.float32, case="plain", seed=0, device="cpu"):
    """pi0.5-like inputs: camera-major patches, a padded prompt; ``case`` picks the masks."""
    g = torch.Generator().manual_seed(seed)
    N = cams * per_cam
    patches = torch.randn(B, N, D, generator=g).to(dtype)
    task = torch.randn(B, T, D, generator=g).to(dtype)
    task_mask = patch_mask = None
    if case in ("masks", "empty"):
        lens = torch.randint(1, T, (B,), generator=g)
        task_mask = torch.arange(T)[None, :] < lens[:, None]
        patch_mask = torch.ones(B, N, dtype=torch.bool)
        patch_mask[0, 2 * per_cam:] = False  # sample 0: third camera absent
        patch_mask[:, 5] = False
    if case == "empty":  # sample 0 has no valid prompt token, the last one no valid patch
        task_mask[0] = False
        patch_mask[-1] = False
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return patches.to(device), task.to(device), mv(task_mask), mv(patch_mask)


def run(fn, patches, task, grad_seed=1, **kw):
    """(selected, idx, grad_patches, grad_task) for a random upstream gradient."""
    p = patches.clone().requires_grad_()
    t = task.clone().requires_grad_()
    sel, idx = fn(p, t, **kw)
    g = torch.randn(sel.shape, generator=torch.Generator().manual_seed(grad_seed)).to(sel.dtype).to(sel.device)
    (sel.float() * g.float()).sum().backward()
    return sel.detach(), idx, p.grad, t.grad


def ours(p, t, task_mask=None, patch_mask=None, **kw):
    return SS.select_soft(p, t, task_mask=task_mask, patch_mask=patch_mask, **kw)


def ref(p, t, task_mask=None, patch_mask=None, noise_scale=None, noise=None, seed=None, backend=None):
    if seed is not None and noise_scale:
        noise = SS.philox_uniform(seed, p.shape[0], p.shape[1]).to(p.device)
    return R.select_soft_ref(p, t, task_mask, patch_mask, noise_scale=noise_scale, noise=noise)


def assert_close_scaled(a, b, rel):
    """|a - b| <= rel * max|b| elementwise (gradients have a wide dynamic range)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-12)
    err = (a - b).abs().max()
    assert err <= rel * scale, f"max err {err:.3e} > {rel} * {scale:.3e}"


CASES = [
    ("plain", None, False),
    ("masks", None, False),
    ("masks", 0.0, True),
    ("masks", 1.0, True),
    ("empty", 1.0, True),
    ("plain", 1.0, "seed"),
]


def noise_kw(patches, ns, noise):
    B, N = patches.shape[:2]
    if noise == "seed":
        return dict(noise_scale=ns, seed=torch.tensor([1234567, 89], dtype=torch.int64))
    if noise:
        return dict(noise_scale=ns, noise=torch.rand(B, N, N, generator=torch.Generator().manual_seed(7)))
    return dict(noise_scale=ns)


# ----------------------------------------------------------------------------- CPU vs reference


@not_interp
@pytest.mark.parametrize("case,ns,noise", CASES)
def test_cpu_matches_reference_fp32(case, ns, noise):
    patches, task, tm, pm = make(case=case)
    kw = noise_kw(patches, ns, noise)
    sel, idx, gp, gt = run(ours, patches, task, task_mask=tm, patch_mask=pm, **kw)
    sel_r, idx_r, gp_r, gt_r = run(ref, patches, task, task_mask=tm, patch_mask=pm, **kw)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx_r)
    assert torch.equal(sel, torch.gather(patches, 1, idx[..., None].expand_as(patches)))
    torch.testing.assert_close(sel, sel_r, rtol=1e-5, atol=1e-5)
    assert_close_scaled(gp, gp_r, 1e-5)
    assert_close_scaled(gt, gt_r, 1e-5)
    if tm is not None:  # padded prompt tokens get exactly zero gradient
        eff = tm | ~tm.any(-1, keepdim=True)
        assert torch.all(gt[~eff] == 0)
    if pm is not None:  # only allowed columns are chosen
        allowed = pm.clone()
        allowed[:, 0] |= ~pm.any(-1)
        assert torch.all(allowed.gather(1, idx))


@not_interp
@pytest.mark.parametrize("case,ns,noise", [CASES[1], CASES[3], CASES[4]])
def test_cpu_matches_reference_bf16(case, ns, noise):
    patches, task, tm, pm = make(case=case, dtype=torch.bfloat16)
    kw = noise_kw(patches, ns, noise)
    sel, idx, gp, gt = run(ours, patches, task, task_mask=tm, patch_mask=pm, **kw)
    sel_r, idx_r, gp_r, gt_r = run(ref, patches, task, task_mask=tm, patch_mask=pm, **kw)
    assert sel.dtype == gp.dtype == gt.dtype == torch.bfloat16
    assert torch.equal(idx, idx_r)
    assert torch.equal(sel, torch.gather(patches, 1, idx[..., None].expand_as(patches)))
    assert_close_scaled(gp, gp_r, 2e-2)
    assert_close_scaled(gt, gt_r, 2e-2)


# ----------------------------------------------------------------------------- gradcheck


def surrogate_check(patches, task, tm, pm, ns, noise=None, seed=None, backend="cpu"):
    """gradcheck of the op's backward against the straight-through surrogate (float64)."""
    kw = dict(task_mask=tm, patch_mask=pm, noise_scale=ns, backend=backend)
    kw.update(dict(noise=noise) if noise is not None else dict(seed=seed))
    U = noise if noise is not None else SS.philox_uniform(seed, *patches.shape[:2]).double()
    with torch.no_grad():
        _, idx0 = SS.select_soft(patches, task, **kw)
    hard = F.one_hot(idx0, patches.shape[1]).to(patches.dtype)
    X0 = patches.detach().clone()

    def surrogate(p, t):
        s = R.scores(p, t, tm, pm, dtype=torch.float64) + U * ns
        return hard @ p + torch.softmax(s, -1) @ X0

    def f(p, t):
        sel, _ = SS.select_soft(p, t, **kw)
        return sel - sel.detach() + surrogate(p, t).detach()

    p = patches.clone().requires_grad_()
    t = task.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (p, t), eps=1e-6, atol=1e-6, rtol=1e-4)


@not_interp
def test_a_last_patch_equal_to_an_earlier_one_never_wins():
    """Without noise the forward is the row argmax, lowest index on an exact tie. N = 1025 leaves
    the CPU kernel's last 128-row chunk one row high, a matrix-vector product that rounded that
    row's scores differently: it picked the last patch, a copy of patch 99, over patch 99
    (csrc/ties.h)."""
    g = torch.Generator().manual_seed(0)
    N, D, T = 1025, 64, 62
    patches = torch.randn(1, N, D, generator=g)
    patches[0, N - 1] = patches[0, 99]
    task = patches[:, 99:100] * 3 + torch.randn(1, T, D, generator=g)
    assert (R.truth_scores(patches, task)[0].argmax(-1) == 99).sum() > N // 2
    _, idx = SS.select_soft(patches, task, noise_scale=0.0)
    assert not (idx == N - 1).any()


@not_interp
def test_a_copied_patch_never_beats_its_original():
    """Without noise, the CPU kernel's argmax leaves later copies of a patch out (csrc/ties.h):
    its products round equal rows differently by their place, and some row picked the copy in 32
    of 300 such shapes (a fuzz run). With noise the copies are no tie, and each may win."""
    from conftest import copied_patch_case

    for seed in range(150):
        patches, task, a, b = copied_patch_case(seed)
        _, idx, lse = ops.select_soft(patches, task, None, None, None, None, None, "cpu")
        assert not (idx == b).any(), f"seed {seed}: a row picked patch {b}, a copy of patch {a}"
        # The copy stays in the softmax (the gradient's soft part): only the argmax leaves it out.
        torch.testing.assert_close(lse.double(), torch.logsumexp(R.truth_scores(patches, task), -1),
                                   rtol=1e-4, atol=1e-4)


def test_gradcheck_float64_explicit_noise():
    g = torch.Generator().manual_seed(3)
    B, N, T, D = 2, 6, 5, 8
    patches = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    task = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    tm = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pm = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    noise = torch.rand(B, N, N, generator=g, dtype=torch.float64)
    surrogate_check(patches, task, tm, pm, 0.7, noise=noise)


@not_interp
def test_gradcheck_float64_seeded_noise():
    """The backward regenerates the forward's noise from the seed (else the check fails)."""
    g = torch.Generator().manual_seed(4)
    B, N, T, D = 1, 7, 4, 6
    patches = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    task = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    surrogate_check(patches, task, None, None, 2.0, seed=torch.tensor([-5, 2**40 + 3], dtype=torch.int64))


# ----------------------------------------------------------------------------- noise


@not_interp
def test_seeded_noise_is_philox_and_shared_by_backward():
    patches, task, tm, pm = make(case="masks", seed=5)
    seed = torch.tensor([2**62 + 11, -(2**50)], dtype=torch.int64)
    U = SS.philox_uniform(seed, *patches.shape[:2])
    assert U.min() >= 0 and U.max() < 1 and abs(U.mean().item() - 0.5) < 0.02
    ns = torch.tensor(3.0)
    a = ops.select_soft(patches, task, tm, pm, ns, seed, None)
    b = ops.select_soft(patches, task, tm, pm, ns, None, U)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    g = torch.randn_like(patches)
    ga = ops.select_soft_backward(g, patches, task, tm, pm, ns, seed, None, a[1], a[2])
    gb = ops.select_soft_backward(g, patches, task, tm, pm, ns, None, U, b[1], b[2])
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)
    # the noise moves the selection
    c = ops.select_soft(patches, task, tm, pm, None, None, None)
    assert not torch.equal(a[1], c[1])


@not_interp
def test_generator_reproducible_and_deterministic():
    patches, task, tm, pm = make(case="masks", seed=6)
    kw = dict(task_mask=tm, patch_mask=pm, noise_scale=1.0)
    r1 = run(ours, patches, task, generator=torch.Generator().manual_seed(9), **kw)
    r2 = run(ours, patches, task, generator=torch.Generator().manual_seed(9), **kw)
    r3 = run(ours, patches, task, generator=torch.Generator().manual_seed(10), **kw)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    assert not torch.equal(r1[1], r3[1])
    torch.manual_seed(0)
    a = SS.select_soft(patches, task, noise_scale=torch.tensor(1.0))[1]
    torch.manual_seed(0)
    assert torch.equal(a, SS.select_soft(patches, task, noise_scale=torch.tensor(1.0))[1])


# ----------------------------------------------------------------------------- opcheck, compile, errors


def opcheck_select_soft(device, backend):
    """select_soft (seeded, explicit and no noise) and its backward under torch.library.opcheck."""
    patches, task, tm, pm = make(B=2, cams=2, per_cam=8, T=6, D=16, case="masks", device=device)
    p = patches.clone().requires_grad_()
    t = task.clone().requires_grad_()
    seed = torch.tensor([1, 2], dtype=torch.int64, device=device)
    noise = torch.rand(2, 16, 16, device=device)
    ns = torch.tensor(1.0, device=device)
    for args in [
        (p, t, tm, pm, ns, seed, None, "auto"),
        (p, t, None, None, ns, None, noise, backend),
        (p, t, tm, pm, None, None, None, "auto"),
    ]:
        torch.library.opcheck(ops.select_soft.default, args)
    sel, idx, lse = ops.select_soft(patches, task, tm, pm, ns, seed, None)
    torch.library.opcheck(
        ops.select_soft_backward.default,
        (torch.randn_like(sel), patches, task, tm, pm, ns, seed, None, idx, lse, "auto"),
    )


@not_interp
def test_opcheck():
    opcheck_select_soft("cpu", "cpu")


@not_interp
def test_compile_noise_scale_tensor_no_recompile():
    from torch._dynamo.testing import CompileCounter

    patches, task, tm, pm = make(case="masks", seed=8)
    cnt = CompileCounter()
    torch._dynamo.reset()

    @torch.compile(backend=cnt, fullgraph=True)
    def step(p, t, ns, seed):
        sel, idx, _ = ops.select_soft(p, t, tm, pm, ns, seed, None)
        return sel.float().square().sum(), idx

    for step_i, ns in enumerate([1.0, 0.5, 0.25]):
        p = patches.clone().requires_grad_()
        seed = torch.tensor([step_i, 0], dtype=torch.int64)
        loss, idx = step(p, task, torch.tensor(ns), seed)
        loss.backward()
        p2 = patches.clone().requires_grad_()
        sel, idx2, _ = ops.select_soft(p2, task, tm, pm, torch.tensor(ns), seed, None)
        sel.float().square().sum().backward()
        assert torch.equal(idx, idx2) and torch.equal(p.grad, p2.grad)
    assert cnt.frame_count == 1


@not_interp
def test_compiled_seed_of_size_two_and_mark_static():
    """The documented limit (select_soft's docstring): under dynamic=True a seed passed in at B=2
    is duck-sized with the batch, so B=3 compiles again; mark_static(seed, 0) keeps one compile.
    If this fails because torch stops duck-sizing them, drop the note."""
    from torch._dynamo.testing import CompileCounter

    def compiles(mark_static):
        cnt = CompileCounter()
        torch._dynamo.reset()

        @torch.compile(backend=cnt, fullgraph=True, dynamic=True)
        def step(p, t, seed):
            sel, idx = SS.select_soft(p, t, noise_scale=torch.tensor(0.5), seed=seed)
            return sel.sum(), idx

        for B in (2, 3, 4):
            patches, task, _, _ = make(B=B, cams=2, per_cam=8, T=6, D=16, case="masks")
            seed = torch.tensor([1, 2], dtype=torch.int64)
            if mark_static:
                torch._dynamo.mark_static(seed, 0)
            step(patches, task, seed)
        return cnt.frame_count

    assert (compiles(False), compiles(True)) == (2, 1)


@not_interp
def test_bad_inputs():
    patches, task, tm, pm = make(case="masks")
    B, N = patches.shape[:2]
    with pytest.raises(ValueError, match="patches"):
        SS.select_soft(patches[0], task)
    with pytest.raises(ValueError, match="noise must be"):
        SS.select_soft(patches, task, noise_scale=1.0, noise=torch.rand(B, N, N - 1))
    with pytest.raises(ValueError, match="task_mask"):
        SS.select_soft(patches, task, task_mask=tm[:, :-1])
    with pytest.raises(ValueError, match="seed"):
        SS.select_soft(patches, task, noise_scale=1.0, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise_scale"):
        SS.select_soft(patches, task, noise_scale=torch.tensor([1.0, 2.0]), noise=torch.rand(B, N, N))
    with pytest.raises(RuntimeError, match="noise_scale"):
        ops.select_soft(patches, task, None, None, torch.tensor([1.0, 2.0]), None, torch.rand(B, N, N))
    with pytest.raises(RuntimeError, match="seed"):
        ops.select_soft(patches, task, None, None, torch.tensor(1.0), None, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.select_soft(patches, task.half(), None, None, None, None, None)


@not_interp
@pytest.mark.parametrize("bad,message", [
    (dict(grad=(2, 5, 7)), r"grad must match patches \(2, 9, 16\) torch.float32, got \(2, 5, 7\)"),
    (dict(idx=(2, 9, torch.int32)), r"idx must be torch.int64, got torch.int32"),
    (dict(lse=(1, 9, torch.float32)), r"lse must be \[2, 9\], got shape \(1, 9\)"),
    (dict(noise_scale="meta"), r"noise_scale is on meta, patches on cpu"),
])
def test_backward_checks_its_own_arguments(bad, message):
    """The backward's fake (and with it the Triton body on CUDA, which runs the same checks)
    rejects a grad, idx or lse that are not the forward's for these patches."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        patches, task = torch.empty(2, 9, 16), torch.empty(2, 4, 16)
        grad = torch.empty(*bad.get("grad", (2, 9, 16)))
        *shape, dtype = bad.get("idx", (2, 9, torch.int64))
        idx = torch.empty(*shape, dtype=dtype)
        *shape, dtype = bad.get("lse", (2, 9, torch.float32))
        lse = torch.empty(*shape, dtype=dtype)
        noise_scale = torch.empty((), device=bad.get("noise_scale", "cpu"))
        seed = torch.empty(2, dtype=torch.int64)
        with pytest.raises(ValueError, match=message):
            ops.select_soft_backward(grad, patches, task, None, None, noise_scale, seed, None, idx, lse)


@not_interp
def test_nonfinite_inputs_do_not_crash():
    patches, task, tm, pm = make(case="masks")
    patches[0, 3, 0] = float("nan")
    task[1, 0, 1] = float("inf")
    sel, idx, gp, gt = run(ours, patches, task, task_mask=tm, patch_mask=pm, noise_scale=1.0)
    assert idx.min() >= 0 and idx.max() < patches.shape[1]


# ----------------------------------------------------------------------------- Triton


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
@pytest.mark.skipif(not SS.HAVE_TRITON, reason="triton not installed")
@pytest.mark.skipif(os.environ.get(CHILD_ENV) == "1", reason="no recursion")
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(pathlib.Path(__file__)), "-k", "interp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # every *_interp test ran (only this wrapper itself is skipped in the child)
    assert " passed" in proc.stdout and " 1 skipped" in proc.stdout, proc.stdout[-2000:]


def triton_vs_cpu(patches, task, tm, pm, rel, **kw):
    a = run(ours, patches, task, task_mask=tm, patch_mask=pm, backend="triton", **kw)
    kw_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    b = run(ours, patches.cpu(), task.cpu(), task_mask=cpu(tm), patch_mask=cpu(pm), backend="cpu", **kw_cpu)
    assert torch.equal(a[1].cpu(), b[1]), (a[1] != b[1].to(a[1].device)).sum()
    assert torch.equal(a[0], torch.gather(patches, 1, a[1][..., None].expand_as(patches)))
    assert_close_scaled(a[2].cpu(), b[2], rel)
    assert_close_scaled(a[3].cpu(), b[3], rel)
    return a


@interp
@pytest.mark.parametrize("case,ns,noise", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_cpu_interp(case, ns, noise, dtype):
    patches, task, tm, pm = make(B=2, cams=3, per_cam=7, T=10, D=40, dtype=dtype, case=case)
    triton_vs_cpu(patches, task, tm, pm, 1e-5 if dtype == torch.float32 else 2e-3, **noise_kw(patches, ns, noise))


@interp
def test_triton_bf16_and_determinism_interp():
    patches, task, tm, pm = make(B=2, cams=2, per_cam=9, T=20, D=24, dtype=torch.bfloat16, case="masks")
    kw = dict(noise_scale=1.0, seed=torch.tensor([3, 4], dtype=torch.int64))
    a = triton_vs_cpu(patches, task, tm, pm, 2e-2, **kw)
    b = run(ours, patches, task, task_mask=tm, patch_mask=pm, backend="triton", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@interp
def test_triton_seeded_noise_is_philox_interp():
    patches, task, tm, pm = make(B=2, cams=2, per_cam=9, T=5, D=16, case="masks")
    seed = torch.tensor([-(2**63) + 5, 2**33 + 1], dtype=torch.int64)
    U = SS.philox_uniform(seed, *patches.shape[:2])
    ns = torch.tensor(2.0)
    a = ops.select_soft(patches, task, tm, pm, ns, seed, None, "triton")
    b = ops.select_soft(patches, task, tm, pm, ns, None, U, "triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@interp
def test_triton_opcheck_interp():
    patches, task, tm, pm = make(B=1, cams=2, per_cam=8, T=6, D=16, case="masks")
    p = patches.clone().requires_grad_()
    t = task.clone().requires_grad_()
    torch.library.opcheck(ops.select_soft.default, (p, t, tm, pm, torch.tensor(1.0), torch.tensor([1, 2]), None, "triton"))


@gpu
def test_triton_gpu_opcheck():
    """The CUDA-key registrations of select_soft and its backward (the Triton kernels)."""
    opcheck_select_soft("cuda", "triton")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gpu_pi05_shape(dtype):
    patches, task, tm, pm = make(B=2, cams=3, per_cam=256, T=200, D=2048, dtype=dtype, case="masks", device="cuda")
    kw = dict(noise_scale=1.0, seed=torch.tensor([11, 12], dtype=torch.int64, device="cuda"))
    a = triton_vs_cpu(patches, task, tm, pm, 2e-2 if dtype == torch.bfloat16 else 1e-4, **kw)
    b = run(ours, patches, task, task_mask=tm, patch_mask=pm, backend="triton", **kw)
    for x, y in zip(a, b):  # deterministic: no atomics
        assert torch.equal(x, y)


@gpu
def test_triton_gpu_compile():
    """Inductor around the Triton training op: one compile across noise scales and seeds, and
    the eager call's selection and gradient."""
    from torch._dynamo.testing import CompileCounterWithBackend

    patches, task, tm, pm = make(B=2, cams=3, per_cam=16, T=12, D=64, dtype=torch.bfloat16, case="masks", device="cuda")
    cnt = CompileCounterWithBackend("inductor")
    torch._dynamo.reset()

    @torch.compile(backend=cnt, fullgraph=True)
    def step(p, t, ns, seed):
        sel, idx, _ = ops.select_soft(p, t, tm, pm, ns, seed, None)
        return sel.float().square().sum(), idx

    for i, ns in enumerate([1.0, 0.5]):
        p = patches.clone().requires_grad_()
        seed = torch.tensor([i, 0], device="cuda")
        loss, idx = step(p, task, torch.tensor(ns, device="cuda"), seed)
        loss.backward()
        p2 = patches.clone().requires_grad_()
        sel, idx2, _ = ops.select_soft(p2, task, tm, pm, torch.tensor(ns, device="cuda"), seed, None)
        sel.float().square().sum().backward()
        assert torch.equal(idx, idx2)
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-2, atol=1e-3)  # bf16 gradients
    assert cnt.frame_count == 1


@interp
def test_triton_backward_checks_its_own_arguments_interp():
    patches, task = torch.randn(2, 9, 16), torch.randn(2, 4, 16)
    idx, lse = torch.zeros(2, 9, dtype=torch.int64), torch.zeros(2, 9)
    with pytest.raises(ValueError, match="grad must match patches"):
        ops.triton_select_soft_backward(torch.randn(2, 5, 7), patches, task, None, None, None, None, None, idx, lse)
    with pytest.raises(ValueError, match="lse must be torch.float32"):
        ops.triton_select_soft_backward(torch.randn(2, 9, 16), patches, task, None, None, None, None, None, idx,
                                        lse.double())


@interp
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings in the interpreter
def test_triton_nonfinite_inputs_interp():
    patches, task, tm, pm = make(B=2, cams=2, per_cam=8, T=6, D=16, case="masks")
    patches[0, 3, 0] = float("nan")
    task[1, 0, 1] = float("inf")
    sel, idx, gp, gt = run(ours, patches, task, task_mask=tm, patch_mask=pm, noise_scale=1.0, backend="triton")
    assert idx.min() >= 0 and idx.max() < patches.shape[1]


@interp
def test_triton_train_dot_prec_is_checked_interp(monkeypatch):
    """FASTPRUNE_TRITON_TRAIN_DOT_PREC (the training kernels' fp32 dot, PERF_LOG lead 6): a value
    they do not take raises at the launch, naming the variable; tf32x3 runs and selects as the
    CPU op (the interpreter computes its dots in fp32: the product's precision shows on a GPU)."""
    from pi05_fastprune.kernels import select_soft_triton as TK

    patches, task, tm, pm = make(B=1, cams=2, per_cam=8, T=6, D=16, case="masks")
    for prec in ("tf32", "tf32x3"):
        monkeypatch.setenv("FASTPRUNE_TRITON_TRAIN_DOT_PREC", prec)
        TK._dot_prec.cache_clear()
        try:
            if prec == "tf32":
                with pytest.raises(ValueError, match="FASTPRUNE_TRITON_TRAIN_DOT_PREC must be 'ieee' or 'tf32x3'"):
                    ops.select_soft(patches, task, tm, pm, None, None, None, "triton")
            else:
                got = ops.select_soft(patches, task, tm, pm, None, None, None, "triton")
                want = ops.select_soft(patches, task, tm, pm, None, None, None, "cpu")
                assert torch.equal(got[1], want[1])
                torch.testing.assert_close(got[0], want[0])
        finally:
            TK._dot_prec.cache_clear()

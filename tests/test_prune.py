"""The eval ops (select / prune / prune_padded) on the CPU backend against the SPEC.

Every check compares with the eager reference and with the float64 truth: a row passes when
its chosen column scores within 1e-3 of the row's score range of the float64 maximum, and
the outputs must be the exact gather of the op's own selection.
"""

import importlib.util
import math
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pi05_fastprune as fp
from pi05_fastprune import reference as R
from pi05_fastprune.structured import structured_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, N, T, D, dtype=torch.float32, masks="none", seed=0):
    """Random inputs with one of the SPEC's mask situations."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, N, D, generator=g).to(dtype)
    task = torch.randn(B, T, D, generator=g).to(dtype)
    task_mask = patch_mask = None
    if masks in ("padded_prompt", "all"):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        task_mask = torch.arange(T)[None] < lengths[:, None]
    if masks == "invalid_prompt":
        task_mask = torch.zeros(B, T, dtype=torch.bool)
    if masks in ("absent_camera", "all"):
        patch_mask = torch.ones(B, N, dtype=torch.bool)
        patch_mask[-1, N // 3 : 2 * N // 3] = False  # the last sample misses its middle camera
    if masks == "invalid_patches":
        patch_mask = torch.ones(B, N, dtype=torch.bool)
        patch_mask[0] = False
    return patches, task, task_mask, patch_mask


def check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, max_tokens):
    """The outputs are exactly what the reference builds from the op's own selection."""
    expect = R.prune_from_idx(patches, idx, patch_mask, keep_tokens, mask_voters, max_tokens)
    for name, got, want in zip(out._fields, out, expect):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.equal(got, want), name


def check_selection(idx, patches, task, task_mask, patch_mask):
    """``idx`` is int64 [B, N] and every row's pick is within SPEC's tolerance of the float64 best."""
    assert idx.dtype == torch.int64 and idx.shape == patches.shape[:2]
    bad = R.selection_errors(idx, patches, task, task_mask, patch_mask)
    assert not bad.any(), f"{int(bad.sum())} rows miss the float64 maximum"


def well_separated(patches, task, task_mask, patch_mask, rel=1e-3):
    """Rows whose float64 best beats the runner-up by more than rel * row range."""
    truth = R.truth_scores(patches, task, task_mask, patch_mask)
    if truth.shape[-1] < 2:
        return torch.ones(truth.shape[:2], dtype=torch.bool)
    finite = torch.isfinite(truth)
    top2 = truth.topk(2, dim=-1).values
    rng = top2[..., 0] - truth.masked_fill(~finite, float("inf")).min(-1).values
    return (top2[..., 0] - top2[..., 1] > rel * rng) | (finite.sum(-1) == 1)


SHAPES = [  # B, N, T, D
    (1, 1, 1, 64),
    (2, 7, 13, 96),
    (5, 300, 13, 64),
    (1, 768, 200, 96),
    (2, 300, 200, 2048),
    (1, 7, 1, 2048),
]
MASKS = ["none", "padded_prompt", "invalid_prompt", "absent_camera", "invalid_patches", "all"]


def assert_degenerate_cases(select, prune, device="cpu", dtype=torch.float32):
    """SPEC's two degenerate cases, checked against their own definitions rather than the
    reference's float64 truth (which every other selection test shares, so a misread rule there
    would pass them all): a sample with no valid prompt token selects as if it had no
    ``task_mask`` (the seed's uniform weights pick otherwise in most rows); a sample with no valid
    patch allows column 0 alone and keeps nothing. ``select(patches, task, task_mask,
    patch_mask) -> idx [B, N]``; ``prune(...)``, implicit mode, ``-> (pruned, kept_mask,
    kept_idx, counts)``."""
    patches, task, _, _ = make_inputs(2, 40, 6, 32, dtype, seed=3)
    sep = well_separated(patches, task, None, None)  # independent of the rule under test
    patches, task = patches.to(device), task.to(device)
    no_token = torch.zeros(2, 6, dtype=torch.bool, device=device)
    no_token[1, :2] = True  # sample 1 keeps two valid tokens, sample 0 none
    want = select(patches, task, None, None).cpu()
    got = select(patches, task, no_token, None).cpu()
    assert torch.equal(got[0][sep[0]], want[0][sep[0]]), "no valid token must mean the whole prompt"
    assert not torch.equal(got[1], want[1])  # sample 1's mask is honoured (the case has teeth)
    no_patch = torch.ones(2, 40, dtype=torch.bool, device=device)
    no_patch[0] = False
    assert (select(patches, task, None, no_patch).cpu()[0] == 0).all(), "no valid patch: column 0 alone"
    out = prune(patches, task, None, no_patch)
    assert int(out[3][0]) == 0 and not out[1][0].any(), "no valid patch: nothing kept"
    assert int(out[3][1]) > 0


def test_degenerate_cases_follow_the_spec():
    assert_degenerate_cases(lambda p, t, tm, pm: fp.select_tokens(p, t, task_mask=tm, patch_mask=pm),
                            lambda p, t, tm, pm: fp.prune_tokens(p, t, task_mask=tm, patch_mask=pm))
    assert_degenerate_cases(R.select_ref, lambda p, t, tm, pm: R.prune_ref(p, t, tm, pm))


@pytest.mark.parametrize("B,N,T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_matches_truth(B, N, T, D, dtype):
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, "all", seed=N + T)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    assert idx.dtype == torch.int64 and idx.shape == (B, N)
    check_selection(idx, patches, task, task_mask, patch_mask)


@pytest.mark.parametrize("masks", MASKS)
def test_select_identical_to_reference_when_separated(masks):
    """fp32: wherever the float64 top-2 gap is clear, the op picks exactly the reference's."""
    patches, task, task_mask, patch_mask = make_inputs(3, 300, 40, 96, torch.float32, masks, seed=1)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    ref = R.select_ref(patches, task, task_mask, patch_mask)
    truth = R.truth_scores(patches, task, task_mask, patch_mask)
    top2 = truth.topk(2, dim=-1).values
    separated = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert separated.float().mean() > 0.5
    assert torch.equal(idx[separated], ref[separated])
    check_selection(idx, patches, task, task_mask, patch_mask)


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("budget", [None, 1, "N", 0.1, 0.5, 1.0])
@pytest.mark.parametrize("mask_voters", [False, True])
def test_prune_modes(masks, budget, mask_voters):
    B, N, T, D = 3, 96, 17, 64
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, torch.float32, masks, seed=7)
    kwargs = {}
    keep_tokens = None
    if budget == "N":
        kwargs["keep_tokens"] = keep_tokens = N
    elif isinstance(budget, int):
        kwargs["keep_tokens"] = keep_tokens = budget
    elif isinstance(budget, float):
        kwargs["keep_ratio"] = budget
        keep_tokens = math.ceil(budget * N)
    out = fp.prune_tokens(
        patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=mask_voters, **kwargs
    )
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, None)
    ref = R.prune_ref(patches, task, task_mask, patch_mask, keep_tokens, mask_voters)
    assert torch.equal(out.counts, ref.counts)
    valid = patch_mask if patch_mask is not None else torch.ones(B, N, dtype=torch.bool)
    n_valid = valid.sum(-1)
    if keep_tokens is not None:
        assert torch.equal(out.counts, torch.clamp(n_valid, max=keep_tokens))
    # Every kept patch is valid; a sample without valid patches keeps none.
    kept_valid = valid.gather(1, out.kept_idx) | ~out.kept_mask
    assert kept_valid.all()
    assert (out.counts[n_valid == 0] == 0).all()
    assert out.pruned.shape[1] == max(1, int(out.counts.max()))


@pytest.mark.parametrize("max_tokens", [1, 5, 40, 200])
@pytest.mark.parametrize("keep_tokens", [None, 3, 30])
def test_prune_padded_cap(max_tokens, keep_tokens):
    patches, task, task_mask, patch_mask = make_inputs(4, 150, 9, 64, torch.float32, "all", seed=3)
    out = fp.prune_tokens(
        patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=keep_tokens, max_tokens=max_tokens
    )
    assert out.pruned.shape == (4, max_tokens, 64)
    assert (out.counts <= max_tokens).all()
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    check_prune(out, patches, idx, patch_mask, keep_tokens, False, max_tokens)
    uncapped = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=keep_tokens)
    # Within the cap the capped op keeps exactly what the uncapped op keeps.
    fits = uncapped.counts <= max_tokens
    for b in torch.nonzero(fits).flatten().tolist():
        c = int(uncapped.counts[b])
        assert torch.equal(out.kept_idx[b, :c], uncapped.kept_idx[b, :c])


@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_pi05_shape(dtype):
    patches, task, task_mask, patch_mask = structured_inputs(batch=2, dtype=dtype, absent_cameras=((1, 2),))
    out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    check_selection(idx, patches, task, task_mask, patch_mask)
    check_prune(out, patches, idx, patch_mask, None, False, None)
    assert (out.counts > 20).all() and (out.counts < 200).all()
    # The absent camera of sample 1 keeps nothing.
    assert not ((out.kept_idx[1] >= 512) & out.kept_mask[1]).any()
    if dtype == torch.float32:
        ref = R.prune_ref(patches, task, task_mask, patch_mask)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_mask_voters_absent_camera_adds_nothing():
    patches, task, task_mask, patch_mask = structured_inputs(batch=1, absent_cameras=((0, 1),), seed=4)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=True)
    assert (idx[0, 256:512] == -1).all() and (idx[0, :256] >= 0).all()
    assert torch.equal(idx, R.select_ref(patches, task, task_mask, patch_mask, mask_voters=True))
    # The op's own selection with its -1 rows determines its outputs.
    check_prune(
        fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=True),
        patches, idx, patch_mask, None, False, None,
    )
    voted = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, mask_voters=True)
    every = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    assert int(voted.counts) <= int(every.counts)
    ref = R.prune_ref(patches, task, task_mask, patch_mask, mask_voters=True)
    assert all(torch.equal(a, b) for a, b in zip(voted, ref))


def test_deterministic():
    patches, task, task_mask, patch_mask = structured_inputs(batch=3, width=256, seed=9)
    outs = [fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask) for _ in range(3)]
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def assert_ties_go_low(select, prune, device="cpu"):
    """Duplicated patches score exactly alike: every row picks the lower copy. Budgets break vote
    ties low (SPEC "Selection"), at every k: the later copies have no votes and must lose to
    every lower zero-vote patch, and on the CPU's selection k = 3 cuts between two patches of 2
    votes each. ``select(patches, task) -> idx [1, N]``, ``prune(patches, task, k) -> kept_idx
    [1, K]``."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 32, generator=g)
    patches = torch.cat([base, base], dim=1).to(device)  # patch j and j + 8 are identical
    task = torch.randn(1, 5, 32, generator=g).to(device)
    idx = select(patches, task).cpu()
    assert (idx < 8).all(), "ties must go to the lowest index"
    votes = torch.bincount(idx[0], minlength=16).tolist()
    order = sorted(range(16), key=lambda j: (-votes[j], j))
    for k in range(1, 17):
        assert prune(patches, task, k).cpu()[0].tolist() == sorted(order[:k]), k


def test_exact_ties_pick_lowest_index():
    assert_ties_go_low(fp.select_tokens, lambda p, t, k: fp.prune_tokens(p, t, keep_tokens=k).kept_idx)


def assert_nan_columns_never_win(select, nan_cols):
    """``select(patches, task, patch_mask) -> idx [B, N]``. NaN patches at ``nan_cols`` make those
    columns' scores NaN in every row and their own rows' scores NaN in every column. NaN ranks
    below every number: every other row picks what it picks with those columns masked out, never
    one of them, and the NaN rows pick the lowest allowed column, 0. (Also the CUDA emulator's
    test, tests/test_cuda_build.py.)"""
    g = torch.Generator().manual_seed(3)
    patches, task = torch.randn(2, 70, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    patches[:, nan_cols, 5] = float("nan")
    masked = torch.ones(2, 70, dtype=torch.bool)
    masked[:, nan_cols] = False
    idx, want = select(patches, task, None), select(patches, task, masked)
    other = masked[0]
    assert torch.equal(idx[:, other], want[:, other])
    assert (idx[:, nan_cols] == 0).all()
    assert not torch.isin(idx[:, other], torch.tensor(nan_cols)).any()


def test_ties_across_column_groups_pick_lowest_index():
    """The CPU kernel takes a row's maximum per group of 64 columns, then looks for the first group
    and column that reach it. Patches 32-79 repeat as 80-127, so exact ties fall within groups and
    across them: no row picks a repeat."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 32, 48, generator=g), torch.randn(1, 48, 48, generator=g)
    idx = fp.select_tokens(torch.cat([x, y, y], 1), torch.randn(1, 6, 48, generator=g), backend="cpu")
    assert (idx >= 64).any(), "no row picks a patch past the first group: the test has no tie to break"
    assert (idx < 80).all()


@pytest.mark.parametrize("N", [129, 257, 769])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_last_patch_equal_to_an_earlier_one_never_wins(N, dtype):
    """N % 128 == 1 leaves the CPU kernel's last row tile one row high, a matrix-vector product
    whose sums round differently from the other tiles': up to 243 of 769 rows picked the last
    patch, a copy of patch 99, over it (csrc/ties.h). Every row pointed to by the prompt (built
    around patch 99) ties exactly in float64."""
    g = torch.Generator().manual_seed(0)
    D, T = 64, 62
    patches = torch.randn(1, N, D, generator=g)
    patches[0, N - 1] = patches[0, 99]
    patches = patches.to(dtype)
    task = (patches[:, 99:100].float() * 3 + torch.randn(1, T, D, generator=g)).to(dtype)
    truth = R.truth_scores(patches, task)[0]
    assert (truth.argmax(-1) == 99).sum() > N // 2, "the twins are not what most rows point to"
    idx = fp.select_tokens(patches, task, backend="cpu")
    assert not (idx == N - 1).any()


def test_a_copied_patch_never_beats_its_original():
    """The CPU kernel's products (MKL's sgemm) round equal rows differently by their place in the
    product: before later copies were left out of the argmax (csrc/ties.h), some row picked the
    copy in 11 of 300 such shapes (a fuzz run), against SPEC's lowest index on an exact tie."""
    from conftest import copied_patch_case

    for seed in range(150):
        patches, task, a, b = copied_patch_case(seed)
        idx = fp.select_tokens(patches, task, backend="cpu")
        assert not (idx == b).any(), f"seed {seed}: a row picked patch {b}, a copy of patch {a}"
        # With the original not allowed, the copy takes its rows.
        pm = torch.ones(patches.shape[:2], dtype=torch.bool)
        pm[0, a] = False
        if (idx == a).any():
            assert (fp.select_tokens(patches, task, patch_mask=pm, backend="cpu") == b).any()


def test_patches_alike_but_not_copies_all_stay_candidates():
    """csrc/ties.h keys patches by their first 64 bytes: patches equal there but not in their last
    element stay candidates, and copies of several patches, three of one, drop out (checked
    against the float64 truth)."""
    g = torch.Generator().manual_seed(0)
    N, D, T = 48, 64, 9
    patches = torch.randn(1, 1, D, generator=g).repeat(1, N, 1)
    patches[0, :, -1] = torch.randn(N, generator=g) * 4
    for src, dst in ((3, 10), (3, 40), (7, 8), (20, 47)):
        patches[0, dst] = patches[0, src]
    task = torch.randn(1, T, D, generator=g) + patches[:, :T]
    for dtype in (torch.float32, torch.bfloat16):
        x, t = patches.to(dtype), task.to(dtype)
        idx = fp.select_tokens(x, t, backend="cpu")
        check_selection(idx, x, t, None, None)
        assert not torch.isin(idx, torch.tensor([10, 40, 8, 47])).any()
        assert len(idx.unique()) > 4, "the prompt should point at many distinct patches"


@pytest.mark.parametrize("p_rms,t_rms", [(1e-7, 1e-7), (1.0, 1e-10), (1e-10, 1e-10)])
def test_inputs_far_below_the_rmsnorm_eps(p_rms, t_rms):
    """Rows whose mean square is far below RMSNorm's eps shrink S by orders of magnitude; the CPU
    kernel keeps every row at any scale (the GPU kernels do not below ~3e-7: README "Known
    limit", test_emulated_inputs_far_below_the_rmsnorm_eps)."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        patches = torch.randn(2, 64, 64, generator=g) * p_rms
        task = torch.randn(2, 16, 64, generator=g) * t_rms
        assert not R.selection_errors(fp.select_tokens(patches, task, backend="cpu"), patches, task).any()


def test_a_nan_column_never_wins():
    """The CPU kernel's row argmax passes over NaN. The NaN columns sit where its 8 maximum chains
    start (0, 8, 17), end (63: the last of the first 64-column group) and in the second group,
    shorter than one round of the chains (69)."""
    assert_nan_columns_never_win(
        lambda p, t, pm: fp.select_tokens(p, t, patch_mask=pm, backend="cpu"), [0, 8, 17, 63, 69])


def assert_links_openmp(library):
    """at::parallel_for is a header template, compiled into the library that calls it: built
    without OpenMP it is a serial loop there, whatever torch was built with. The CPU kernels'
    row tiles and samples then run on one thread (the select op at pi05 on this 2-core machine:
    1.9 ms serial, 1.3 ms in parallel)."""
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch without OpenMP, or not Linux")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout
    assert "GOMP_parallel" in undefined or "__kmpc_fork_call" in undefined, f"{library} has no OpenMP parallel region"


def test_cpu_kernels_run_parallel_regions():
    assert_links_openmp(importlib.util.find_spec("pi05_fastprune._C").origin)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_inputs_do_not_crash(value):
    assert_nonfinite_inputs_stay_in_range(value)


def assert_nonfinite_inputs_stay_in_range(value, device="cpu", **backend):
    """``value`` (NaN or an infinity) in one patch and one prompt token: the API's calls in every
    mode return, with every index in range (``backend``: the API's ``backend=`` argument)."""
    inputs = make_inputs(2, 40, 6, 32, torch.float32, "all", seed=5)
    inputs[0][0, 3, 1] = value
    inputs[1][1, 0, 0] = value
    patches, task, task_mask, patch_mask = (t.to(device) for t in inputs)
    for kwargs in ({}, {"keep_tokens": 5}, {"max_tokens": 7}):
        out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **backend, **kwargs)
        assert ((out.kept_idx >= 0) & (out.kept_idx < 40)).all()
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **backend)
    assert ((idx >= 0) & (idx < 40)).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_padding_rows_are_zeros_whatever_patch_0_holds(value):
    """Padding rows are zeros (SPEC "Output"), also where patch 0 (what they gather from in the
    reference) is not finite: the reference once padded with patch 0 times 0, NaN there."""
    g = torch.Generator().manual_seed(0)
    patches, task = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    patches[0, 0, 1] = value
    idx = torch.tensor([[2, 2, 2, 2, 2], [0, 1, 2, 3, 4]])  # sample 0 keeps 1 patch, sample 1 all 5
    ref = R.prune_from_idx(patches, idx)
    assert ref.pruned.shape == (2, 5, 4) and torch.equal(ref.pruned[0, 1:], torch.zeros(4, 4))
    out = fp.prune_tokens(patches, task, max_tokens=5, backend="cpu")
    assert torch.equal(out.pruned[~out.kept_mask], torch.zeros(int((~out.kept_mask).sum()), 4))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 70),
    T=st.integers(1, 20),
    D=st.sampled_from([8, 33, 64]),
    dtype=st.sampled_from(DTYPES),
    masks=st.sampled_from(MASKS),
    keep=st.one_of(st.none(), st.floats(0.01, 1.0)),
    mask_voters=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_truth(B, N, T, D, dtype, masks, keep, mask_voters, seed):
    patches, task, task_mask, patch_mask = make_inputs(B, N, T, D, dtype, masks, seed)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    check_selection(idx, patches, task, task_mask, patch_mask)
    out = fp.prune_tokens(
        patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_ratio=keep, mask_voters=mask_voters
    )
    keep_tokens = None if keep is None else max(1, math.ceil(keep * N))
    check_prune(out, patches, idx, patch_mask, keep_tokens, mask_voters, None)


# --- the seed pruner's own outputs on openpi's tiny pi0.5 prefix -------------------------------


@pytest.fixture(scope="module")
def lightvla(data_dir):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(data_dir / "io.safetensors")).items() if k.startswith("lightvla.")}


def _seed_call(v, **kwargs):
    return fp.prune_tokens(
        v["lightvla.in.image_patches"],
        v["lightvla.in.task_tokens"],
        task_mask=v["lightvla.in.task_token_mask"],
        patch_mask=v["lightvla.in.patch_token_mask"],
        **kwargs,
    )


def test_seed_vectors_implicit(lightvla):
    v = lightvla
    idx = fp.select_tokens(
        v["lightvla.in.image_patches"],
        v["lightvla.in.task_tokens"],
        task_mask=v["lightvla.in.task_token_mask"],
        patch_mask=v["lightvla.in.patch_token_mask"],
    )
    assert torch.equal(idx, v["lightvla.implicit.score_argmax"])
    out = _seed_call(v)
    for name in ("kept_idx", "kept_mask", "counts"):
        key = {"kept_idx": "kept_indices", "kept_mask": "kept_mask", "counts": "kept_counts"}[name]
        assert torch.equal(getattr(out, name), v[f"lightvla.implicit.{key}"]), name
    assert torch.equal(out.pruned, v["lightvla.implicit.pruned_patches"])


def test_seed_vectors_keep12(lightvla):
    v = lightvla
    out = _seed_call(v, keep_tokens=12)
    assert torch.equal(out.kept_idx, v["lightvla.keep12.kept_indices"])
    assert torch.equal(out.counts, v["lightvla.keep12.kept_counts"])
    assert torch.equal(out.pruned, v["lightvla.keep12.pruned_patches"])


def test_seed_vectors_keep40_above_tie(lightvla):
    """The seed's cut at 40 falls inside tied vote counts: above the tie both agree exactly,
    the tied part agrees in size (we take the lowest indices, the seed takes topk's order)."""
    v = lightvla
    out = _seed_call(v, keep_tokens=40)
    votes = v["lightvla.implicit.votes"]
    assert torch.equal(out.counts, v["lightvla.keep40.kept_counts"])
    for b in range(votes.shape[0]):
        ours = set(out.kept_idx[b][out.kept_mask[b]].tolist())
        seeds = set(v["lightvla.keep40.kept_indices"][b][v["lightvla.keep40.kept_mask"][b]].tolist())
        kth = int(votes[b, sorted(seeds, key=lambda j: int(votes[b, j]))[0]])
        above = {j for j in seeds if int(votes[b, j]) > kth}
        assert above <= ours
        assert len(ours) == len(seeds)
        tied_ours = sorted(j for j in ours - above)
        assert all(int(votes[b, j]) == kth for j in tied_ours)
        pool = [j for j in range(votes.shape[1]) if int(votes[b, j]) == kth and v["lightvla.in.patch_token_mask"][b, j]]
        assert tied_ours == sorted(pool)[: len(tied_ours)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(keep_tokens=7), dict(max_tokens=12), dict(max_tokens=3), dict(keep_tokens=5, mask_voters=True)],
    ids=["implicit", "budget", "padded", "capped", "mask_voters"],
)
def test_pruned_rows_carry_the_gather_gradient(dtype, kwargs):
    """pruned is patches[kept_idx] with zero padding rows, so it is differentiable as that
    gather (the seed's eval path gathers with torch ops); the selection is piecewise constant:
    task gets no gradient and the index outputs none."""
    from conftest import expected_rows_gradient

    patches, task, task_mask, patch_mask = make_inputs(3, 40, 9, 16, dtype, "all", seed=5)
    patches.requires_grad_(True)
    task.requires_grad_(True)
    out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **kwargs)
    assert not (out.kept_mask.requires_grad or out.kept_idx.requires_grad or out.counts.requires_grad)
    weight = torch.randn(out.pruned.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (out.pruned * weight).sum().backward()
    assert torch.equal(patches.grad, expected_rows_gradient(out, weight, patches.shape))
    assert task.grad is None
    with torch.no_grad():
        again = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **kwargs)
    assert not again.pruned.requires_grad and torch.equal(again.pruned, out.pruned.detach())


def test_prune_gradcheck_float64():
    patches, task, task_mask, patch_mask = make_inputs(2, 24, 7, 8, torch.float64, "all", seed=6)
    patches.requires_grad_(True)
    for kwargs in (dict(), dict(keep_tokens=4), dict(keep_tokens=4, max_tokens=6)):
        def pruned(p):
            return fp.prune_tokens(p, task, task_mask=task_mask, patch_mask=patch_mask, **kwargs).pruned

        assert torch.autograd.gradcheck(pruned, (patches,))


def test_float64_on_cpu_is_the_truth():
    """float64 inputs (float64 models' exactness tests) are computed in float64 on the CPU."""
    patches, task, task_mask, patch_mask = make_inputs(2, 300, 13, 96, torch.float64, "all", seed=11)
    idx = fp.select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    assert torch.equal(idx, R.truth_scores(patches, task, task_mask, patch_mask).argmax(-1))
    out = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=17)
    assert out.pruned.dtype == torch.float64
    check_prune(out, patches, idx, patch_mask, 17, False, None)


def test_package_works_without_triton():
    """triton is optional: without it the package imports and the CPU path runs."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pi05_fastprune as fp\n"
        "assert not hasattr(torch.ops.fastprune, 'triton_select')\n"
        "p, t, tm, pm = fp.structured_inputs(n_cameras=1, patches_per_camera=32, prompt_len=8, valid_prompt=5, width=32)\n"
        "print(int(fp.prune_tokens(p, t, task_mask=tm, patch_mask=pm).counts[0]))\n"
        "s, i = fp.select_soft(p, t, task_mask=tm, patch_mask=pm, noise_scale=0.5)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) > 0

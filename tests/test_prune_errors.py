"""Bad input (SPEC): a clear error naming the argument and the shapes, before any kernel.

The Python API raises ValueError; the ops themselves (for LibTorch and direct callers) raise
RuntimeError with the same wording from csrc/prune_checks.h.
"""

import pytest
import torch

import pi05_fastprune as fp
from pi05_fastprune import reference as R

B, N, T, D = 2, 10, 4, 8


def good():
    return dict(
        patches=torch.randn(B, N, D),
        task=torch.randn(B, T, D),
        task_mask=torch.ones(B, T, dtype=torch.bool),
        patch_mask=torch.ones(B, N, dtype=torch.bool),
    )


CASES = [  # (change, message fragment)
    (dict(patches=torch.randn(N, D)), r"patches must be \[B, N, D\], got shape \(10, 8\)"),
    (dict(task=torch.randn(B, T, D, 1)), r"task must be \[B, T, D\], got shape \(2, 4, 8, 1\)"),
    (dict(task=torch.randn(B + 1, T, D)), r"task \(3, 4, 8\) does not match patches \(2, 10, 8\)"),
    (dict(task=torch.randn(B, T, D + 1)), r"task \(2, 4, 9\) does not match patches \(2, 10, 8\)"),
    (dict(task=torch.randn(B, T, D, dtype=torch.float64)), r"task dtype torch.float64 differs"),
    (dict(patches=torch.ones(B, N, D, dtype=torch.int32), task=torch.ones(B, T, D, dtype=torch.int32)),
     r"patches must be float32, float16 or bfloat16 \(float64 on CPU\), got torch.int32"),
    (dict(patches=torch.randn(B, 0, D)), r"need N, T, D >= 1"),
    (dict(task_mask=torch.ones(B, T)), r"task_mask must be bool, got torch.float32"),
    (dict(task_mask=torch.ones(B, T + 1, dtype=torch.bool)), r"task_mask must be \[2, 4\], got shape \(2, 5\)"),
    (dict(patch_mask=torch.ones(B, dtype=torch.bool)), r"patch_mask must be \[2, 10\], got shape \(2,\)"),
    (dict(keep_tokens=0), r"keep_tokens must be in \[1, 10\]"),
    (dict(keep_tokens=11), r"keep_tokens must be in \[1, 10\] for patches \(2, 10, 8\), got 11"),
    (dict(keep_ratio=0.0), r"keep_ratio must be in \(0, 1\], got 0.0"),
    (dict(keep_ratio=1.5), r"keep_ratio must be in \(0, 1\], got 1.5"),
    (dict(keep_ratio=0.5, keep_tokens=3), r"give keep_tokens or keep_ratio, not both"),
    (dict(max_tokens=0), r"max_tokens must be >= 1, got 0"),
    (dict(backend="gpu"), r"backend must be one of"),
]


@pytest.mark.parametrize("change,message", CASES)
def test_api_rejects(change, message):
    args = good()
    args.update(change)
    patches, task = args.pop("patches"), args.pop("task")
    with pytest.raises(ValueError, match=message) as err:
        fp.prune_tokens(patches, task, **args)
    assert err.value.__suppress_context__ or err.value.__context__ is None  # not the op's error again


@pytest.mark.parametrize("change,message", [c for c in CASES if not {"keep_ratio", "backend"} & set(c[0])])
def test_reference_rejects(change, message):
    """The eager reference is a backend too: the same checks (it takes keep_tokens only)."""
    args = good()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        R.prune_ref(**args)
    if not {"keep_tokens", "max_tokens"} & set(change):
        with pytest.raises(ValueError, match=message):
            R.select_ref(args["patches"], args["task"], args["task_mask"], args["patch_mask"])


OP_CASES = [  # direct op calls: RuntimeError from the C++ checks
    (dict(patches=torch.randn(N, D)), r"patches must be \[B, N, D\], got shape \[10, 8\]"),
    (dict(task=torch.randn(B + 1, T, D)), r"task \[3, 4, 8\] does not match patches \[2, 10, 8\]"),
    (dict(task=torch.randn(B, T, D).half()), r"task dtype Half differs from patches dtype Float"),
    (dict(task_mask=torch.ones(B, T, dtype=torch.int64)), r"task_mask must be bool, got Long"),
    (dict(patch_mask=torch.ones(B, N + 1, dtype=torch.bool)), r"patch_mask must be \[2, 10\], got shape \[2, 11\]"),
    (dict(keep_tokens=N + 1), r"keep_tokens must be in \[1, 10\]"),
    (dict(backend="tpu"), r"backend must be 'auto', 'cpu', 'triton' or 'cuda', got 'tpu'"),
    (dict(backend="cuda"), r"backend='cuda' needs CUDA tensors"),
]


@pytest.mark.parametrize("change,message", OP_CASES)
def test_op_rejects(change, message):
    args = dict(good(), keep_tokens=None, mask_voters=False, backend="auto")
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastprune.prune(
            args["patches"], args["task"], args["task_mask"], args["patch_mask"],
            args["keep_tokens"], args["mask_voters"], args["backend"],
        )


def test_api_passes_other_op_errors_through():
    """The API words an op's rejection of bad input as ValueError (its own check, run after the
    op raised); an op's other errors reach the caller as they are."""
    a = good()
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors"):
        fp.prune_tokens(a["patches"], a["task"], max_tokens=4, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors"):
        fp.select_tokens(a["patches"], a["task"], backend="cuda")


def test_padded_op_rejects_bad_cap():
    a = good()
    with pytest.raises(RuntimeError, match=r"max_tokens must be >= 1, got 0"):
        torch.ops.fastprune.prune_padded(a["patches"], a["task"], None, None, None, 0)


def test_select_rejects_before_kernel():
    a = good()
    with pytest.raises(ValueError, match=r"patch_mask must be bool"):
        fp.select_tokens(a["patches"], a["task"], patch_mask=torch.ones(B, N))
    with pytest.raises(RuntimeError, match=r"task must be \[B, T, D\]"):
        torch.ops.fastprune.select(a["patches"], a["task"][0])


def test_auto_backend_choice(monkeypatch):
    """"auto" on CUDA tensors: FASTPRUNE_BACKEND, else the faster backend measured (run 14): the
    CUDA C++ kernels where built, Triton from AUTO_TRITON_ROWS patch rows on where triton is
    installed, and Triton where the CUDA C++ kernels are not built. Decided without a GPU."""
    from pi05_fastprune import prune as P
    from pi05_fastprune import triton_ops

    cuda = torch.device("cuda")
    monkeypatch.delenv("FASTPRUNE_BACKEND", raising=False)
    assert P.resolve_backend("auto", torch.device("cpu"), 10**6) == "cpu"
    big = P.AUTO_TRITON_ROWS
    for built in (True, False):
        monkeypatch.setattr(P, "cuda_kernels_built", lambda built=built: built)
        for have_triton in (True, False):
            monkeypatch.setattr(triton_ops, "HAVE_TRITON", have_triton)
            assert P.resolve_backend("auto", cuda, big) == ("triton" if have_triton or not built else "cuda")
            assert P.resolve_backend("auto", cuda, big - 1) == ("cuda" if built else "triton")
            assert P.resolve_backend("auto", cuda) == ("cuda" if built else "triton")
    monkeypatch.setattr(P, "cuda_kernels_built", lambda: True)
    monkeypatch.setattr(triton_ops, "HAVE_TRITON", True)
    # pi0.5 (768 patches a sample): B=1 on the CUDA C++ kernels, B=8 and B=64 on Triton (B=2-7,
    # unmeasured, stay on the CUDA C++ kernels).
    assert [P.resolve_backend("auto", cuda, b * 768) for b in (1, 2, 7, 8, 64)] == \
        ["cuda", "cuda", "cuda", "triton", "triton"]
    monkeypatch.setenv("FASTPRUNE_BACKEND", "triton")
    assert P.resolve_backend("auto", cuda) == "triton"
    monkeypatch.setenv("FASTPRUNE_BACKEND", "cuda")
    assert P.resolve_backend("auto", cuda, big) == "cuda"
    assert P.resolve_backend("triton", cuda) == "triton"
    monkeypatch.setenv("FASTPRUNE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTPRUNE_BACKEND must be 'triton' or 'cuda', got 'tpu'"):
        P.resolve_backend("auto", cuda)


def test_api_passes_its_row_count_to_auto(monkeypatch):
    """prune_tokens and select_tokens hand "auto" their B * N patch rows (the threshold above)."""
    from pi05_fastprune import prune as P

    seen = []
    real = P.resolve_backend
    monkeypatch.setattr(P, "resolve_backend", lambda backend, device, rows=None: seen.append(rows) or
                        real(backend, device, rows))
    patches, task = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    P.prune_tokens(patches, task)
    P.prune_tokens(patches, task, max_tokens=2)
    P.select_tokens(patches, task)
    assert seen == [10, 10, 10]


def test_cpp_checks_format_without_iostreams():
    """A TORCH_CHECK whose message has more than one part formats it with c10::str (an
    ostringstream inlined into our library); on the first GPU machine's build every such check
    crashed the process instead of raising. csrc/ formats with FASTPRUNE_CHECK (csrc/check.h)
    and keeps TORCH_CHECK for literal-only messages."""
    import pathlib
    import re

    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    bad = []
    for path in sorted(csrc.glob("*.[ch]*")):
        text = re.sub(r"//[^\n]*", "", path.read_text())  # comments may quote the bad form
        for m in re.finditer(r"\bTORCH_CHECK\(", text):
            depth, i, commas, in_str = 1, m.end(), 0, False
            while depth:  # top-level commas of the macro call; string literals skipped
                ch = text[i]
                if in_str:
                    in_str = not (ch == '"' and text[i - 1] != "\\")
                elif ch == '"':
                    in_str = True
                elif ch in "([{":
                    depth += 1
                elif ch in ")]}":
                    depth -= 1
                elif ch == "," and depth == 1:
                    commas += 1
                i += 1
            if commas > 1:
                bad.append(f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not bad, f"formatted TORCH_CHECK messages (use FASTPRUNE_CHECK): {bad}"

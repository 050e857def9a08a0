"""The eval pruning ops: Python API, input checks and fake (meta) implementations.

`torch.ops.fastprune.{select, prune, prune_padded}` are defined in C++ (csrc/fastprune.cpp);
their CPU kernels live in csrc/prune_cpu.cpp, the Triton ones in kernels/prune_triton.py and
the CUDA C++ ones in kernels/prune_cuda.cu. The fakes here give torch.compile their shapes:
`prune` has a data-dependent row count K, `prune_padded` exactly `max_tokens` rows.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from typing import Optional

import torch

from pi05_fastprune import _C  # noqa: F401  (registers torch.ops.fastprune)
from pi05_fastprune.reference import PruneResult, check_inputs

__all__ = ["PruneResult", "prune_tokens", "select_tokens", "check_inputs", "resolve_backend", "resolve_keep_tokens"]

BACKENDS = ("auto", "cpu", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def cuda_kernels_built() -> bool:
    """Whether pi05_fastprune._C holds the CUDA C++ kernels (built with CUDA torch and nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastprune::prune", "CUDA")


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """pi05_fastprune.triton_ops, which imports this module (so not at its top; the package's
    __init__ imports both)."""
    from pi05_fastprune import triton_ops

    return triton_ops


# "auto" on CUDA sends calls of at least this many patch rows (B * N) to the Triton kernels when
# both backends are there. Run 14 (H200, pi0.5 bf16, static cap, both backends side by side;
# CUDA-graph replay): the CUDA C++ kernels are faster at B=1 (19.8 vs 20.6 µs), the Triton ones
# at B=8 (47.5 vs 48.5) and B=64 (219.2 vs 229.6), and more so with the launch parameters that
# run's sweep measured and the Triton defaults now take (45.0 and 198.7). B=2..7 are not
# measured (gpu_check's bench_auto step times B=1, 2, 4, 8), so the threshold is B=8 of 768
# patches. B=1 with 1536 patches (1536 rows: CUDA C++ by this line) measured Triton ahead (26.9
# vs 28.7 µs); one shape, so the line does not move for it.
AUTO_TRITON_ROWS = 6144


def resolve_backend(backend: str, device: torch.device, rows: Optional[int] = None) -> str:
    """"auto" -> "cpu" on CPU; on CUDA the environment variable FASTPRUNE_BACKEND, else the
    faster backend measured (bench/results/h200-2026-11-28/run14): the CUDA C++ kernels where
    built, except for calls of ``rows`` >= AUTO_TRITON_ROWS patch rows (B * N) when triton is
    installed; Triton where the CUDA C++ kernels are not built. The ops' own "auto" (C++, also
    for LibTorch users) is the CUDA C++ kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "cpu"
    env = os.environ.get("FASTPRUNE_BACKEND")
    if env:
        if env not in ("triton", "cuda"):
            raise ValueError(f"FASTPRUNE_BACKEND must be 'triton' or 'cuda', got {env!r}")
        return env
    if not cuda_kernels_built():
        return "triton"
    if rows is None or rows < AUTO_TRITON_ROWS:
        return "cuda"  # pi0.5 at small batches
    return "triton" if _triton_ops().HAVE_TRITON else "cuda"


def _reword(*args) -> None:
    """After an op raised: bad input raises the API's ValueError instead, without the op's error
    chained to it (the same message twice); other errors go on as they are."""
    try:
        check_inputs(*args)
    except ValueError as bad:
        raise bad from None


def _budget_int(name: str, value):
    """A budget argument as the C++ ops' schema takes it (an int, a numpy integer, a 0-d integer
    tensor; a SymInt when traced), made a Python int for the Triton launch code, which passes it
    to the kernels as is."""
    if value is None or type(value) is int or isinstance(value, torch.SymInt):
        return value
    try:  # not a float (no __index__), which the schema rejects too
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def resolve_keep_tokens(keep_tokens: Optional[int], keep_ratio: Optional[float], n: int) -> Optional[int]:
    if keep_ratio is None:
        return keep_tokens
    if keep_tokens is not None:
        raise ValueError(f"give keep_tokens or keep_ratio, not both (got {keep_tokens} and {keep_ratio})")
    if not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(1, math.ceil(keep_ratio * n))


def select_tokens(
    patches: torch.Tensor,
    task: torch.Tensor,
    *,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    mask_voters: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Row argmax ``idx [B, N]`` int64 of the LightVLA score (lowest index on a tie).

    With ``mask_voters`` the rows of invalid patches do not vote and hold -1.
    """
    backend = resolve_backend(backend, patches.device, _rows(patches))
    try:
        if backend == "triton":
            return _triton_ops().call("select", patches, task, task_mask, patch_mask, mask_voters)
        return torch.ops.fastprune.select(patches, task, task_mask, patch_mask, mask_voters, backend)
    except RuntimeError:
        _reword(patches, task, task_mask, patch_mask)
        raise


def prune_tokens(
    patches: torch.Tensor,
    task: torch.Tensor,
    *,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    keep_tokens: Optional[int] = None,
    keep_ratio: Optional[float] = None,
    mask_voters: bool = False,
    max_tokens: Optional[int] = None,
    backend: str = "auto",
) -> PruneResult:
    """Keep the patches the prompt points to (SPEC "Selection" and "Output").

    patches [B, N, D] and task [B, T, D] (float32/16/bf16, float64 on the CPU); masks [B, N] / [B, T] bool, True
    = valid. No budget: keep every patch some row voted for; ``keep_tokens=k`` (or
    ``keep_ratio=r``, k = ceil(r N)): the k most-voted valid patches. ``max_tokens=M``: a
    static ``[B, M]`` output with no host sync (a sample keeping more keeps its M most-voted).
    Returns PruneResult(pruned [B, K, D], kept_mask [B, K], kept_idx [B, K], counts [B]);
    ``pruned`` carries the gradient of a gather of the kept patches (none to ``task``).
    """
    if keep_ratio is not None:
        keep_tokens = resolve_keep_tokens(keep_tokens, keep_ratio, patches.shape[1] if patches.dim() == 3 else 0)
    backend = resolve_backend(backend, patches.device, _rows(patches))
    try:
        if backend == "triton":
            # The Triton ops (not fastprune::prune's dispatch to them), so that Inductor sees
            # their kernels under torch.compile; eager calls launch the kernels directly.
            keep_tokens, max_tokens = _budget_int("keep_tokens", keep_tokens), _budget_int("max_tokens", max_tokens)
            if max_tokens is None:
                out = _triton_ops().call("prune", patches, task, task_mask, patch_mask, keep_tokens, mask_voters)
            else:
                out = _triton_ops().call(
                    "prune_padded", patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters
                )
        elif max_tokens is None:
            out = torch.ops.fastprune.prune(patches, task, task_mask, patch_mask, keep_tokens, mask_voters, backend)
        else:
            out = torch.ops.fastprune.prune_padded(
                patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters, backend
            )
    except RuntimeError:
        _reword(patches, task, task_mask, patch_mask, keep_tokens, max_tokens)
        raise
    return PruneResult(*out)


def _rows(patches: torch.Tensor) -> Optional[int]:
    """B * N of ``patches`` for resolve_backend; None for a malformed shape, which the op rejects."""
    ps = patches.shape
    return ps[0] * ps[1] if len(ps) == 3 else None


def _prune_outputs(patches: torch.Tensor, K) -> tuple[torch.Tensor, ...]:
    B, _, D = patches.shape
    return (
        patches.new_empty(B, K, D),
        patches.new_empty(B, K, dtype=torch.bool),
        patches.new_empty(B, K, dtype=torch.int64),
        patches.new_empty(B, dtype=torch.int64),
    )


@torch.library.register_fake("fastprune::select")
def _select_fake(patches, task, task_mask=None, patch_mask=None, mask_voters=False, backend="auto"):
    check_inputs(patches, task, task_mask, patch_mask)
    return patches.new_empty(patches.shape[:2], dtype=torch.int64)


@torch.library.register_fake("fastprune::prune")
def _prune_fake(patches, task, task_mask=None, patch_mask=None, keep_tokens=None, mask_voters=False, backend="auto"):
    check_inputs(patches, task, task_mask, patch_mask, keep_tokens)
    K = torch.library.get_ctx().new_dynamic_size(min=1)
    return _prune_outputs(patches, K)


@torch.library.register_fake("fastprune::prune_padded")
def _prune_padded_fake(
    patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters=False, backend="auto"
):
    check_inputs(patches, task, task_mask, patch_mask, keep_tokens, max_tokens)
    return _prune_outputs(patches, max_tokens)

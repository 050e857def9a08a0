"""Eager reference of the fastprune contract (SPEC), in plain PyTorch.

This is the seed's LightVLA pruner written out step by step: it builds the full
``[B, N, N]`` score like the seed does, so it is also the "seed-style eager" provider
of the benchmarks. Every backend is tested against it and against :func:`truth_scores`,
the float64 evaluation of the same formulas.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

EPS = 1e-6


class PruneResult(NamedTuple):
    """Gather-pad output of the eval pruner.

    pruned    [B, K, D]  kept patch embeddings in increasing original index, zero padding
    kept_mask [B, K]     True on real rows
    kept_idx  [B, K]     int64 original patch index of each row (0 on padding)
    counts    [B]        int64 number of kept patches per sample
    """

    pruned: torch.Tensor
    kept_mask: torch.Tensor
    kept_idx: torch.Tensor
    counts: torch.Tensor


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    keep_tokens: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> None:
    """Raises ValueError naming the argument and the shapes seen (SPEC "Bad input").

    The eager reference and the Python launch code run this first. The C++ ops check the same
    (csrc/prune_checks.h, before any kernel) and raise RuntimeError: the API runs this after an
    op raised, for its ValueError, not before every op call (1.7 µs of its ~4 µs per call on
    this CPU). Each tensor attribute is read once (~0.1 µs a read here)."""
    ps, ts = patches.shape, task.shape
    if len(ps) != 3:
        raise ValueError(f"patches must be [B, N, D], got shape {tuple(ps)}")
    if len(ts) != 3:
        raise ValueError(f"task must be [B, T, D], got shape {tuple(ts)}")
    B, N, D = ps
    T = ts[1]
    if ts[0] != B or ts[2] != D:
        raise ValueError(f"task {tuple(ts)} does not match patches {tuple(ps)} in batch or width")
    if N < 1 or T < 1 or D < 1:
        raise ValueError(f"patches {tuple(ps)} and task {tuple(ts)} need N, T, D >= 1")
    dtype, device = patches.dtype, patches.device
    # float64 (CPU only) serves exactness tests of float64 models; it is computed in float64.
    if dtype not in _FLOATS and not (dtype == torch.float64 and device.type == "cpu"):
        raise ValueError(f"patches must be float32, float16 or bfloat16 (float64 on CPU), got {dtype} on {device}")
    if task.dtype != dtype:
        raise ValueError(f"task dtype {task.dtype} differs from patches dtype {dtype}")
    if task.device != device:
        raise ValueError(f"task is on {task.device}, patches on {device}")
    if task_mask is not None:
        _check_mask("task_mask", task_mask, B, T, device)
    if patch_mask is not None:
        _check_mask("patch_mask", patch_mask, B, N, device)
    if keep_tokens is not None and not (1 <= keep_tokens <= N):
        raise ValueError(f"keep_tokens must be in [1, {N}] for patches {tuple(ps)}, got {keep_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")


def _check_mask(name: str, mask: torch.Tensor, B, length, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be bool, got {mask.dtype}")
    ms = mask.shape
    if len(ms) != 2 or ms[0] != B or ms[1] != length:
        raise ValueError(f"{name} must be [{B}, {length}], got shape {tuple(ms)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, patches on {device}")


def rms(x: torch.Tensor) -> torch.Tensor:
    """Weight-free RMSNorm over the last dim, in the dtype of ``x``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def _effective_task_mask(task: torch.Tensor, task_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``task_mask`` with samples that have no valid token treated as fully valid (SPEC)."""
    B, T, _ = task.shape
    if task_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=task.device)
    return task_mask | ~task_mask.any(-1, keepdim=True)


def _allowed_columns(patches: torch.Tensor, patch_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Candidate columns: valid patches; column 0 alone for a sample with none (SPEC)."""
    B, N, _ = patches.shape
    if patch_mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=patches.device)
    allowed = patch_mask.clone()
    allowed[:, 0] |= ~patch_mask.any(-1)
    return allowed


def attend(p: torch.Tensor, t: torch.Tensor, task_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Masked prompt attention ``softmax(p t^T / sqrt(D)) t`` of normalised patches ``p``
    over normalised prompt tokens ``t``: the queries before their RMSNorm."""
    valid = _effective_task_mask(t, task_mask)
    logits = (p @ t.transpose(-1, -2)) / math.sqrt(p.shape[-1])
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ t


def scores(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The LightVLA score ``[B, N, N]`` in ``dtype``; disallowed columns are ``-inf``."""
    p = rms(patches.to(dtype))
    queries = rms(attend(p, rms(task.to(dtype)), task_mask))
    score = (queries @ p.transpose(-1, -2)) / math.sqrt(patches.shape[-1])
    allowed = _allowed_columns(patches, patch_mask)
    return score.masked_fill(~allowed[:, None, :], float("-inf"))


def truth_scores(patches, task, task_mask=None, patch_mask=None) -> torch.Tensor:
    """The float64 truth of the SPEC's equivalence criterion."""
    return scores(patches, task, task_mask, patch_mask, dtype=torch.float64)


def select_ref(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    mask_voters: bool = False,
) -> torch.Tensor:
    """Row argmax ``idx [B, N]`` (int64), lowest column on an exact tie of its float32 scores;
    with ``mask_voters`` the rows of invalid patches do not vote and hold -1 (as the ``select``
    op returns them). A bitwise copy of a patch can score an ulp above its original here (the
    matmul rounds by position): the CPU kernels exclude later copies (csrc/ties.h), this seed-style
    reference does not, so tests check it against the float64 truth's tolerance, not ties."""
    check_inputs(patches, task, task_mask, patch_mask)
    idx = _argmax(patches, task, task_mask, patch_mask)
    if mask_voters and patch_mask is not None:
        idx = idx.masked_fill(~patch_mask, -1)
    return idx


def _argmax(patches, task, task_mask, patch_mask) -> torch.Tensor:
    # torch.argmax returns the first maximal index on CPU and CUDA.
    return scores(patches, task, task_mask, patch_mask).argmax(-1)


def votes_from_idx(
    idx: torch.Tensor, patch_mask: Optional[torch.Tensor] = None, mask_voters: bool = False
) -> torch.Tensor:
    """``v[b, j] = #{i voting : idx[b, i] = j}`` as int64 ``[B, N]``; rows with ``idx = -1``
    (non-voters from ``select``) and, with ``mask_voters``, rows of invalid patches do not vote."""
    voting = idx >= 0
    if mask_voters and patch_mask is not None:
        voting = voting & patch_mask
    votes = torch.zeros(idx.shape, dtype=torch.int64, device=idx.device)
    return votes.scatter_add_(1, idx.clamp(min=0), voting.to(torch.int64))


def keep_mask_from_votes(
    votes: torch.Tensor,
    patch_mask: Optional[torch.Tensor],
    keep_tokens: Optional[int],
    max_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Which patches are kept ``[B, N]`` bool (implicit or budget mode, optional cap)."""
    B, N = votes.shape
    valid = (
        torch.ones_like(votes, dtype=torch.bool) if patch_mask is None else patch_mask.bool()
    )
    implicit = valid & (votes > 0)
    cap = keep_tokens if keep_tokens is not None else N
    if max_tokens is not None:
        cap = min(cap, max_tokens)
    if keep_tokens is None and cap >= N:
        return implicit
    # Budget rule: most votes first, then lower index. Keys are unique, so topk is exact.
    rank_key = votes * (N + 1) + (N - 1 - torch.arange(N, device=votes.device))
    eligible = valid if keep_tokens is not None else implicit
    rank_key = rank_key.masked_fill(~eligible, -1)
    top = rank_key.topk(min(cap, N), dim=-1).indices
    keep = torch.zeros_like(eligible).scatter_(1, top, True)
    return keep & eligible


def gather_pad(patches: torch.Tensor, keep: torch.Tensor, width: Optional[int] = None) -> PruneResult:
    """Compact the kept rows in increasing index, padded to ``width`` (default: max count)."""
    B, N, D = patches.shape
    counts = keep.sum(-1)
    K = width if width is not None else max(1, int(counts.max()) if B else 1)
    # Stable sort puts kept indices first, in increasing order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :K]
    if order.shape[1] < K:
        order = F.pad(order, (0, K - order.shape[1]))
    kept_mask = torch.arange(K, device=patches.device)[None, :] < counts[:, None]
    kept_idx = torch.where(kept_mask, order, 0)
    pruned = torch.gather(patches, 1, kept_idx[..., None].expand(B, K, D))
    # Padding rows gathered patch 0: zero them (a product with the mask left inf * 0 = NaN there).
    pruned = pruned.masked_fill(~kept_mask[..., None], 0)
    return PruneResult(pruned, kept_mask, kept_idx, counts)


def prune_ref(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    keep_tokens: Optional[int] = None,
    mask_voters: bool = False,
    max_tokens: Optional[int] = None,
) -> PruneResult:
    """Eval pruning: select, vote, keep (implicit or budget), gather-pad."""
    check_inputs(patches, task, task_mask, patch_mask, keep_tokens, max_tokens)
    idx = _argmax(patches, task, task_mask, patch_mask)
    return prune_from_idx(patches, idx, patch_mask, keep_tokens, mask_voters, max_tokens)


def prune_from_idx(
    patches: torch.Tensor,
    idx: torch.Tensor,
    patch_mask: Optional[torch.Tensor] = None,
    keep_tokens: Optional[int] = None,
    mask_voters: bool = False,
    max_tokens: Optional[int] = None,
) -> PruneResult:
    """The part of :func:`prune_ref` after the row argmax, for checking any backend's
    outputs against its own selection."""
    votes = votes_from_idx(idx, patch_mask, mask_voters)
    keep = keep_mask_from_votes(votes, patch_mask, keep_tokens, max_tokens)
    return gather_pad(patches, keep, max_tokens)


def select_soft_ref(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    noise_scale: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training straight-through selection, sequence length kept.

    Returns ``(selected [B, N, D], idx [B, N])``: row ``i`` is ``patches[argmax_j score']``
    in the forward, with the gradient of ``softmax(score') @ patches``. ``noise`` is an
    explicit ``[B, N, N]`` U[0, 1) tensor; otherwise it is drawn from ``generator``.
    """
    check_inputs(patches, task, task_mask, patch_mask)
    score = scores(patches, task, task_mask, patch_mask)
    if noise_scale:
        if noise is None:
            noise = torch.rand(score.shape, generator=generator, device=score.device)
        score = score + noise.to(score.dtype) * noise_scale
    idx = score.argmax(-1)
    hard = F.one_hot(idx, score.shape[-1]).to(score.dtype)
    soft = torch.softmax(score, dim=-1)
    weights = hard + soft - soft.detach()
    return (weights @ patches.to(score.dtype)).to(patches.dtype), idx


def selection_errors(
    idx: torch.Tensor,
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    rtol: float = 1e-3,
) -> torch.Tensor:
    """Rows whose choice misses the float64 maximum by more than the SPEC tolerance.

    Returns a bool ``[B, N]``: True where ``truth[i, idx[i]] < max_j truth[i, j] -
    rtol * (max_j - min_j)`` (min over allowed columns), or where ``idx[i]`` is a
    disallowed column.
    """
    truth = truth_scores(patches, task, task_mask, patch_mask)
    finite = torch.isfinite(truth)
    best = truth.max(-1).values
    worst = truth.masked_fill(~finite, float("inf")).min(-1).values
    chosen = truth.gather(-1, idx[..., None])[..., 0]
    return ~(chosen >= best - rtol * (best - worst))

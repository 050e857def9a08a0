#!/usr/bin/env python
"""How far the select kernels' tensor-core products can be trusted (PERF_LOG v59), on the CPU.

Both GPU backends take the row argmax of ``C = A S^T``: ``A`` the prompt attention weights (in
[0, 1]), ``S`` the normalised patch-prompt scores (``|S| <= D``), both fp32. They multiply split
operands on tensor cores. This script rounds the operands as those products do, multiplies in
float32 on the CPU, and counts the rows whose choice misses SPEC's float64 margin
(``reference.selection_errors``):

- ``exact``   the float32 operands as they are (float64 product)
- ``tf32x3``  ``hi = tf32(x)`` (cvt.rna), ``lo = x - hi`` as the MMA reads it (truncated to tf32);
              ``lo.hi + hi.lo + hi.hi`` (both backends until v59)
- ``f16x3``   ``hi = fp16(x)``, ``lo = fp16(x - hi)``; the same three products (v59)
- ``tf32``    one product of tf32-rounded operands (v15 rejected it)

Cases: pi0.5-shaped structured inputs and random ones (bf16), and patches within ``eps`` of one
common vector, where every column scores nearly the same and the margin shrinks with ``eps``.

    python bench/select_precision.py [--quick]      # Markdown table on stdout
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402

PRODUCTS = ("exact", "tf32x3", "f16x3", "tf32")


def _tf32_rna(x: torch.Tensor) -> torch.Tensor:
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & -8192).view(torch.float32)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = x.half()
    return hi.float(), (x - hi.float()).half().float()


def operands(patches, task, task_mask):
    """(A, S) in float32 as the kernels build them: S over the valid prompt tokens (0 elsewhere),
    A = softmax_t(S / sqrt(D)) over them."""
    D = patches.shape[-1]
    p, t = patches.float(), task.float()
    S = (p @ t.transpose(1, 2)) * torch.rsqrt(p.pow(2).mean(-1) + R.EPS)[..., None]
    S = S * torch.rsqrt(t.pow(2).mean(-1) + R.EPS)[:, None, :]
    valid = R._effective_task_mask(task, task_mask)[:, None, :]
    S = torch.where(valid, S, 0.0)
    logits = torch.where(valid, S / math.sqrt(D), -math.inf)
    return torch.softmax(logits, -1), S


def product(A: torch.Tensor, S: torch.Tensor, how: str) -> torch.Tensor:
    St = S.transpose(1, 2)
    if how == "exact":
        return A.double() @ St.double()
    if how == "tf32x3":
        ah, bh = _tf32_rna(A), _tf32_rna(St)
        al, bl = _tf32_trunc(A - ah), _tf32_trunc(St - bh)
        return al @ bh + ah @ bl + ah @ bh
    if how == "f16x3":
        (ah, al), (bh, bl) = _halves(A), _halves(St)
        return al @ bh + ah @ bl + ah @ bh
    if how == "tf32":
        return _tf32_rna(A) @ _tf32_rna(St)
    raise ValueError(f"product must be one of {PRODUCTS}, got {how!r}")


def rows_off(patches, task, task_mask=None, patch_mask=None, how="f16x3") -> int:
    """Rows whose argmax of this product misses the SPEC margin of the float64 truth."""
    A, S = operands(patches, task, task_mask)
    C = product(A, S, how).float()
    C = C.masked_fill(~R._allowed_columns(patches, patch_mask)[:, None, :], -math.inf)
    return int(R.selection_errors(C.argmax(-1), patches, task, task_mask, patch_mask).sum())


def near_common(eps: float, B: int, N: int, T: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(1, 1, D, generator=g) + eps * torch.randn(B, N, D, generator=g)
    return patches, torch.randn(B, T, D, generator=g), None, None


def along_one_direction(B: int, N: int, T: int, D: int, seed: int = 0):
    """Patches and prompt tokens along one direction (plus 1e-2 noise): |S| comes near D, past
    fp16's largest value (65504) for D = 66000, which the kernels' fp16 halves must handle."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    patches = u * torch.randn(B, N, 1, generator=g) + 1e-2 * torch.randn(B, N, D, generator=g)
    return patches, u * torch.randn(B, T, 1, generator=g) + 1e-2 * torch.randn(B, T, D, generator=g), None, None


def random_masked(B: int, N: int, T: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, N, D, generator=g).bfloat16()
    task = torch.randn(B, T, D, generator=g).bfloat16()
    task_mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)
    patch_mask = torch.ones(B, N, dtype=torch.bool)
    patch_mask[-1, N // 3 : 2 * N // 3] = False
    return patches, task, task_mask, patch_mask


def cases(quick: bool):
    if quick:
        yield "structured, bf16, B=1 N=192 D=256", structured_inputs(1, patches_per_camera=64, width=256,
                                                                     dtype=torch.bfloat16)
        for eps in (1e-3, 1e-4):
            yield f"common vector + {eps:g} noise, B=2 N=40 T=12 D=48", near_common(eps, 2, 40, 12, 48)
        return
    for seed in range(2):
        yield f"pi05 structured, bf16, B=4, seed {seed}", structured_inputs(4, dtype=torch.bfloat16, seed=seed)
        yield f"random with masks, bf16, B=4 N=768 T=200 D=2048, seed {seed}", random_masked(4, 768, 200, 2048, seed)
    for eps in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        yield f"common vector + {eps:g} noise, B=2 N=256 T=48 D=256", near_common(eps, 2, 256, 48, 256)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (the test's)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print("| case | rows | " + " | ".join(PRODUCTS) + " |")
    print("|---|---|" + "---|" * len(PRODUCTS))
    for name, inputs in cases(args.quick):
        rows = inputs[0].shape[0] * inputs[0].shape[1]
        print(f"| {name} | {rows} | " + " | ".join(str(rows_off(*inputs, how=h)) for h in PRODUCTS) + " |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Does triton's software pipeline (num_stages > 1) miscompute the Triton scores kernel's D loop?

On an H200 with triton 3.6 the scores kernel (kernels/prune_triton.py) gave wrong and changing S
at 3 stages with 64-row bf16 tiles: at 16 D steps (pi05 B=64, run 7) and at 4 (B=8 in 4 slices,
run 12), while 8 and 2 steps were right; 1 stage was right everywhere, so it runs 1 stage
(PERF_LOG v49, v54), which cost B=64 1.4x. Its loop feeds each loaded tile both to ``tl.dot`` and
to an elementwise sum of squares, the pattern of triton's open issue #6691 ("Ordering of lines
matters with num_stages > 1").

This is that loop alone, small enough to report upstream: per program a 64-row patch tile and a
64-token prompt tile (48 valid, the rest masked), D in steps of 128, the raw dot products and
both sums of squares written out. Variants: stages 1 and 3; the sums of squares before the dot,
after it, or none; 2, 4, 8 and 16 D steps; B = 8 and 64 samples of 768 rows. Each variant runs 5
times; a row reports its error against float64 and whether the 5 outputs are bit-identical.

    python bench/triton_pipeline_repro.py --out DIR            # GPU (gpu_check step triton_repro)
    TRITON_INTERPRET=1 python bench/triton_pipeline_repro.py --quick --out DIR   # CPU: semantics only

Writes DIR/repro.json (every row, environment) and DIR/repro.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402

SUMS = {"none": 0, "before": 1, "after": 2, "reload": 3}
# An error above this share of the float64 values' largest magnitude is a wrong result, not fp32
# rounding (bf16 products are exact in fp32; summation order moves S by ~1e-6 of it).
WRONG = 1e-3


@triton.jit
def _loop_kernel(P, Q, ACC, SSP, SST, N, T, D, SUMS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    p_base = P + b * N * D + rows64[:, None] * D
    # As in the scores kernel: an outer loop over prompt tiles with a run-time bound (one tile
    # here), the D loop inside it with run-time bounds, masked rows on both operands.
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        vt = tt < T
        t_base = Q + b * T * D + tt.to(tl.int64)[:, None] * D
        acc = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        ssp = tl.zeros([BLOCK_M], tl.float32)
        sst = tl.zeros([BLOCK_T], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < D
            p = tl.load(p_base + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            q = tl.load(t_base + kk[None, :], mask=vt[:, None] & km[None, :], other=0.0)
            if SUMS == 1:
                pf = p.to(tl.float32)
                qf = q.to(tl.float32)
                ssp += tl.sum(pf * pf, 1)
                sst += tl.sum(qf * qf, 1)
            if SUMS == 3:
                # The sums from loads of their own (another cache policy, so not merged with the
                # operands' loads): the operands' tiles then have no use in registers.
                pf = tl.load(p_base + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                qf = tl.load(t_base + kk[None, :], mask=vt[:, None] & km[None, :], other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                ssp += tl.sum(pf * pf, 1)
                sst += tl.sum(qf * qf, 1)
            acc = tl.dot(p, tl.trans(q), acc)
            if SUMS == 2:
                pf = p.to(tl.float32)
                qf = q.to(tl.float32)
                ssp += tl.sum(pf * pf, 1)
                sst += tl.sum(qf * qf, 1)
        tl.store(ACC + b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :] - t0, acc, mask=rmask[:, None])
        tl.store(SSP + b * N + rows64, ssp, mask=rmask)
        tl.store(SST + b * BLOCK_T + tt - t0, sst)


def run(p: torch.Tensor, q: torch.Tensor, sums: str, stages: int, block: tuple[int, int, int]):
    """The kernel on patches ``p`` [B, N, D] and valid prompt rows ``q`` [B, T, D] (T <= BLOCK_T):
    (dot products [B, N, BLOCK_T], patch sums of squares [B, N], prompt sums [B, BLOCK_T])."""
    B, N, D = p.shape
    T = q.shape[1]
    bm, bt, bk = block
    acc = torch.full((B, N, bt), float("nan"), device=p.device)
    ssp = torch.full((B, N), float("nan"), device=p.device)
    sst = torch.full((B, bt), float("nan"), device=p.device)
    _loop_kernel[(triton.cdiv(N, bm), B)](p, q, acc, ssp, sst, N, T, D, SUMS=SUMS[sums],
                                          BLOCK_M=bm, BLOCK_T=bt, BLOCK_K=bk, num_warps=4, num_stages=stages)
    return acc, ssp, sst


def truth(p: torch.Tensor, q: torch.Tensor, bt: int):
    pd, qd = p.double(), q.double()
    acc = torch.zeros(p.shape[0], p.shape[1], bt, dtype=torch.float64, device=p.device)
    acc[:, :, : q.shape[1]] = pd @ qd.transpose(1, 2)
    sst = torch.zeros(p.shape[0], bt, dtype=torch.float64, device=p.device)
    sst[:, : q.shape[1]] = (qd * qd).sum(-1)
    return acc, (pd * pd).sum(-1), sst


def rel_error(got: tuple, want: tuple, sums: str) -> float:
    """The largest error of the outputs the variant computes, as a share of each one's largest
    float64 magnitude (NaN, e.g. an output never written, counts as infinitely wrong)."""
    pairs = list(zip(got, want)) if sums != "none" else [(got[0], want[0])]
    worst = 0.0
    for g, w in pairs:
        err = (g.double() - w).abs().nan_to_num(float("inf")).max().item()
        worst = max(worst, err / max(w.abs().max().item(), 1e-30))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:  # odd sizes crossing tile edges; the interpreter has no pipeline (stages ignored)
        block, n, t, batches, steps, dtype = (16, 16, 32), 40, 5, (2,), (1, 3), torch.float32
    else:
        block, n, t, batches, steps, dtype = (64, 64, 128), 768, 48, (8, 64), (2, 4, 8, 16), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows, md = [], ["| B | D steps | stages | sums | error vs float64 | calls bit-identical | verdict |",
                    "|---|---|---|---|---|---|---|"]
    for B in batches:
        for s in steps:
            D = s * block[2]
            p = torch.randn(B, n, D, generator=gen).to(dtype).to(device)
            q = torch.randn(B, t, D, generator=gen).to(dtype).to(device)
            want = truth(p, q, block[1])
            for stages in (1, 3):
                for sums in SUMS:
                    outs = [run(p, q, sums, stages, block) for _ in range(args.calls)]
                    err = max(rel_error(o, want, sums) for o in outs)
                    same = all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))
                    wrong = not err <= WRONG or not same
                    rows.append({"B": B, "N": n, "T": t, "D": D, "steps": s, "stages": stages, "sums": sums,
                                 "rel_error": err, "identical": same, "wrong": wrong})
                    md.append(f"| {B} | {s} | {stages} | {sums} | {err:.2e} | {same} | "
                              f"{'WRONG' if wrong else 'ok'} |")
                    print(md[-1], flush=True)
    env = H.environment(device)
    (out / "repro.json").write_text(json.dumps({"environment": env, "block": block, "rows": rows}, indent=1))
    head = (f"# triton pipeline reproducer ({env.get('gpu') or device}, triton {triton.__version__})\n\n"
            f"Error: the largest |output - float64| over {args.calls} calls, as a share of the outputs' "
            f"largest magnitude; WRONG above {WRONG:g} or when the calls differ.\n\n")
    (out / "repro.md").write_text(head + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

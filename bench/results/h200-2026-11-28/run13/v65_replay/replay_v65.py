"""Run 13's Triton selections replayed on the CPU: v65's reordering reshape, then float64.

v65 (commit 2374467, the code run 13 ran) summed each D step's squares through
``tl.reshape(x * x, [rows, G, 8], can_reorder=True)``. Compiled, that reshape hands each thread's
registers to the result layout in register order (triton's reshape lowering: unpack, then pack).
This script compiles run 13's scores kernel for sm_90 at each shape and variant of run 13's
sweep, reads the two reshapes' layouts from the TTGIR, maps every (warp, lane, register) through
triton's own linear layouts, and so finds, for each result element, the source element whose
square it holds. From those sums of squares it computes the selection in float64 (S, A' and the
row argmax of A'_i . S_j, as the kernels do) and counts the rows off the float64 truth, the
number run 13's sweep printed (``rows_off_truth`` in ../tune/tune.json).

Run from a checkout of this repository with its venv (triton with gluon, as triton 3.7):

    git worktree add /tmp/v65 2374467 && ln -s ../kernels /tmp/v65/pi05_fastprune/kernels
    cp pi05_fastprune/_C*.so /tmp/v65/pi05_fastprune/
    .venv/bin/python bench/results/h200-2026-11-28/run13/v65_replay/replay_v65.py /tmp/v65
"""
import functools
import json
import math
import pathlib
import re
import sys

import torch

V65 = pathlib.Path(sys.argv[1]).resolve()
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(V65), str(V65 / "tests")]

import test_triton_sm90 as C  # noqa: E402  (v65's compile helpers)
from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.kernels import prune_triton as K  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402
from triton._C.libtriton import gluon_ir, ir  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as tcompile  # noqa: E402
from triton.experimental.gluon.language import BlockedLayout  # noqa: E402

ctx = ir.context()
ir.load_dialects(ctx)
builder = gluon_ir.GluonOpBuilder(ctx)

# Run 13's sweep (../tune.log): three shapes, the default and the four variants whose outputs
# differed from it (the others gave the default's outputs bit for bit). bm1=64 is B=64's default.
SHAPES = [(1, 768), (64, 768), (1, 1536)]
VARIANTS = [{}, dict(stages1=3, ssq_loads=1, bk=64, maxnreg1=168), dict(bm1=128, warps1=8),
            dict(bm1=128, warps1=8, bk=64), dict(bm1=64)]
T, VALID, D = 200, 48, 2048


def scores_launch(B, N, tuned):
    """(kernel, args, kwargs) of v65's scores kernel at run 13's shape (bf16, prompt mask, 132 SMs)."""
    rec = C.Recorder()
    real = K._config
    K._config = functools.partial(real, gpu_sms=C.H100_SMS)  # 132, as the H200
    try:
        with K.tuning(**tuned):
            p = torch.empty(B, N, D, dtype=torch.bfloat16)
            K.prune_padded(p, torch.empty(B, T, D, dtype=torch.bfloat16), torch.ones(B, T, dtype=torch.bool), None,
                           None, max(1, N // 3), False, wrap=rec)
    finally:
        K._config = real
    kernel, _, args, kwargs = next(launch for launch in rec.launches if launch[0].fn.__name__ == "_scores_kernel")
    return kernel, args, kwargs


def ttgir(kernel, args, kwargs):
    target, _ = C._target_backend()
    signature, constexprs, attrs = C.specialise(kernel, args, kwargs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return tcompile(src, target=target, options=C._options(kwargs)).asm["ttgir"]


def blocked(text):
    field = lambda k: [int(x) for x in re.search(k + r" = \[([\d, ]+)\]", text).group(1).split(",")]
    return BlockedLayout(field("sizePerThread"), field("threadsPerWarp"), field("warpsPerCTA"), field("order"))


def elements(layout, shape):
    """{(warp, lane, register): element coordinate} of a blocked layout over ``shape``."""
    ll = builder.to_linear_layout(layout._to_ir(builder), shape)
    out = {}
    for w in range(1 << len(ll.warp_bases)):
        for lane in range(1 << len(ll.lane_bases)):
            for r in range(1 << len(ll.reg_bases)):
                c = [0] * len(shape)
                for bases, v in ((ll.reg_bases, r), (ll.lane_bases, lane), (ll.warp_bases, w)):
                    for i, base in enumerate(bases):
                        if v >> i & 1:
                            c = [a ^ b for a, b in zip(c, base)]
                out[(w, lane, r)] = tuple(c)
    return out


def reshape_sources(line, layouts):
    """For ``tt.reshape allow_reorder : tensor<MxK, #src> -> tensor<MxGxE, #dst>``: ``src[m, g * E + e]``,
    the flat index (row * K + column) of the source element held where result (m, g, e) is."""
    m = re.search(r"tensor<(\d+)x(\d+)xf32, #(\w+)> -> tensor<(\d+)x(\d+)x(\d+)xf32, #(\w+)>", line)
    M, K_, s, _, G, E, d = m.groups()
    M, K_, G, E = int(M), int(K_), int(G), int(E)
    have, want = elements(blocked(layouts[s]), [M, K_]), elements(blocked(layouts[d]), [M, G, E])
    src = torch.full((M, G * E), -1, dtype=torch.int64)
    for key, (r, g, e) in want.items():
        sr, sc = have[key]
        assert src[r, g * E + e] in (-1, sr * K_ + sc), "one result element, two sources"
        src[r, g * E + e] = sr * K_ + sc
    assert (src >= 0).all()
    return src, M, K_


def sums_of_squares(x, src, rows, bk, kchunk):
    """Row sums of squares of x [B, M, D] as the kernel added them: per program tile of ``rows``
    rows, per D step of ``bk`` columns, the steps restarting at each slice of ``kchunk``."""
    B, M, _ = x.shape
    sq = x * x
    out = torch.zeros(B, M, dtype=torch.float64)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows) - r0
        for d_lo in range(0, D, kchunk):
            d_hi = min(d_lo + kchunk, D)
            for k0 in range(d_lo, d_hi, bk):
                tile = torch.zeros(B, rows, bk, dtype=torch.float64)
                tile[:, :r1, : min(d_hi, k0 + bk) - k0] = sq[:, r0 : r0 + r1, k0 : min(d_hi, k0 + bk)]
                moved = tile.reshape(B, -1)[:, src.reshape(-1)].reshape(B, rows, -1)
                out[:, r0 : r0 + r1] += moved.sum(-1)[:, :r1]
    return out


def rows_off_truth(inp, ssp, sst):
    """The kernels' selection in float64 from these sums of squares, against the float64 truth."""
    p, t = inp[0].double(), inp[1][:, :VALID].double()
    s = (p @ t.transpose(1, 2)) * torch.rsqrt(ssp / D + 1e-6)[..., None] * torch.rsqrt(sst / D + 1e-6)[:, None, :]
    a = torch.exp(s / math.sqrt(D) - (s / math.sqrt(D)).amax(-1, keepdim=True))
    return int(R.selection_errors((a @ s.transpose(1, 2)).argmax(-1), *inp).sum())


def main():
    run13 = {(r["shape"], json.dumps(r["variant"], sort_keys=True)): r.get("rows_off_truth")
             for r in json.loads((HERE.parent / "tune" / "tune.json").read_text())["rows"]}
    rows, matched = [], 0
    for B, N in SHAPES:
        inp = structured_inputs(batch=B, n_cameras=N // 256, prompt_len=T, valid_prompt=VALID, width=D,
                                dtype=torch.bfloat16, seed=0)
        p, t, tm, _ = inp
        prompt = torch.where(tm[..., None], t.double(), 0.0)  # masked prompt rows load as 0
        for tuned in VARIANTS:
            if B == 64 and tuned == dict(bm1=64):
                continue  # B=64's default
            kernel, args, kwargs = scores_launch(B, N, tuned)
            ir_text = ttgir(kernel, args, kwargs)
            layouts = dict(re.findall(r"^#(\w+) = (#ttg\.blocked<.*>)$", ir_text, re.M))
            lines = [line for line in ir_text.splitlines() if "tt.reshape" in line]
            assert len(lines) == 2 and all("allow_reorder" in line for line in lines), lines
            sp, bm, bk = reshape_sources(next(line for line in lines if "%ssp" in line), layouts)
            st, bt, _ = reshape_sources(next(line for line in lines if "%sst" in line), layouts)
            kchunk = args[8]  # _scores_kernel(P, TK, TMASK, WS, N, T, TS, D, kchunk, ...)
            ssp = sums_of_squares(p.double(), sp, bm, bk, kchunk)
            sst = sums_of_squares(prompt[:, :bt], st, bt, bk, kchunk)[:, :VALID]
            replay = rows_off_truth(inp, ssp, sst)
            gpu = run13[(f"B{B}xN{N}xT{T}({VALID})xD{D}", json.dumps(tuned, sort_keys=True))]
            matched += replay == gpu
            rows.append(dict(B=B, N=N, variant=tuned, block_m=bm, block_k=bk, kchunk=kchunk, replay=replay, run13=gpu))
            print(f"B={B:2d} N={N:4d} {str(tuned):58s} BLOCK_M={bm:3d} BLOCK_K={bk:3d} kchunk={kchunk:4d}: "
                  f"replay {replay:5d} rows off truth, run 13 {gpu:5d}", flush=True)
        # The check of the check: the same arithmetic with each row's own sums of squares.
        right = rows_off_truth(inp, p.double().pow(2).sum(-1), t[:, :VALID].double().pow(2).sum(-1))
        print(f"B={B:2d} N={N:4d} with each row's own sums of squares: {right} rows off truth", flush=True)
        assert right == 0
    print(f"{matched} of {len(rows)} cases replayed to run 13's count exactly")
    (HERE / "replay.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if matched == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

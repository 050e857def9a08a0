#!/usr/bin/env python
"""Launch-parameter sweep of the Triton eval kernels (prune_padded, the CUDA-graph serving mode).

For each shape it runs the call with the defaults of ``_Cfg``, whose selection must be the
float64 truth's (``rows_off_truth``) and repeat itself, then once per variant of one kernel's
launch parameters (``prune_triton.tuning``), the others at their defaults. Per variant:
- the outputs must equal the default's bit for bit (``same``). Where they differ, the variant's
  own selection is checked against the float64 truth (``rows_off_truth``: rows that miss the
  SPEC tolerance), and its outputs against the reference's pruning of that selection
  (``consistent``). A variant that differs but passes both (a near-tie resolved in another fp32
  summation order) may still be the best; any other difference fails the sweep;
- on a GPU, each kernel's device time (CUPTI, through torch.profiler), and the whole call's
  time in a CUDA-graph replay.

    python bench/tune_triton.py --out DIR              # GPU: pi05 at B=1/8/64 and N=1536, bf16
    python bench/tune_triton.py --batches 64 --variant scores:stages1=3 --out DIR   # chosen variants
    TRITON_INTERPRET=1 python bench/tune_triton.py --quick --out DIR   # CPU: tiny shapes, outputs only

Writes DIR/tune.json (every row, environment) and DIR/tune.md (per shape and kernel: default,
best variant, every variant), after each shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402
from bench_prune import DTYPES, shape_label, shape_list  # noqa: E402

from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.kernels import prune_triton as K  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402

KERNELS = ("_scores_kernel", "_select_kernel", "_gather_kernel")

# One kernel's parameters at a time, the others at their defaults. "x<f>" is relative to the
# default (n_split, ksplit: both are sized for one wave of programs, a guess to check).
GPU_VARIANTS = {
    "_scores_kernel": [dict(ksplit=1), dict(ksplit="x2"), dict(ksplit="x4"), dict(bk=64, ksplit="x2"),
                       dict(bm1=16), dict(bm1=32), dict(bm1=64), dict(bk=64), dict(bk=256), dict(warps1=2),
                       dict(warps1=8), dict(stages1=3), dict(stages1=4), dict(prefetch1=0), dict(prefetch1=1),
                       dict(stages1=2, ssq_loads=1), dict(stages1=2, ssq_loads=1, maxnreg1=168),
                       dict(stages1=3, ssq_loads=1), dict(maxnreg1=0), dict(maxnreg1=168),
                       dict(stages1=3, ssq_loads=1, bk=64, maxnreg1=168), dict(ssq_mma=1, stages1=2),
                       dict(ssq_mma=1, stages1=3), dict(ssq_mma=1, stages1=4, bk=64)],
    # Around run 8's 64 x 32 tiles at 4 warps; the first is the default before it.
    "_select_kernel": [dict(bn2=64, warps2=8), dict(bn2=64), dict(warps2=8), dict(bn2=16), dict(bm2=32),
                       dict(bm2=128, warps2=8), dict(stages2=2), dict(n_split="x0.5"), dict(n_split="x2"),
                       dict(sel_prec="f16x4"), dict(sel_prec="tf32x3"), dict(sel_prec="ieee"), dict(a_once=0),
                       dict(bn2=64, maxnreg2=168), dict(s_ahead=0, stages2=2), dict(s_ahead=0, stages2=3)],
    "_gather_kernel": [dict(br=4), dict(br=16), dict(br=32), dict(bd=256), dict(bd=1024), dict(bd=2048),
                       dict(warps3=2), dict(warps3=8)],
}
# The interpreter: tiles its tiny shapes cross (and 1 split, no merge across programs).
CPU_VARIANTS = {
    "_scores_kernel": [dict(bm1=32), dict(bk=64), dict(ksplit=1), dict(ssq_loads=1)],
    "_select_kernel": [dict(bm2=32, bn2=16), dict(n_split=1), dict(sel_prec="f16x4"), dict(sel_prec="tf32x3")],
    "_gather_kernel": [dict(br=4, bd=64)],
}


def resolve(variant: dict, default: K._Cfg) -> dict:
    out = {}
    for k, v in variant.items():
        if isinstance(v, str) and v.startswith("x"):  # "x<factor>" of the default
            v = max(1, int(getattr(default, k) * float(v[1:])))
        out[k] = v
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """``KERNEL:name=value[,name=value]`` (KERNEL: scores, select or gather) as (kernel, variant)."""
    kern, _, params = text.partition(":")
    kernel = f"_{kern}_kernel"
    if kernel not in KERNELS or not params:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected KERNEL:name=value[,name=value] with KERNEL "
                                          f"one of scores, select, gather")
    variant = {}
    for item in params.split(","):
        name, _, value = item.partition("=")
        if name not in K.TUNABLE or not value:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {name!r} is not one of {K.TUNABLE}")
        variant[name] = value if name in K.PRECISIONS or value.startswith("x") else int(value)
    return kernel, variant


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def correct(row: dict) -> bool:
    """Same outputs as the default, or a selection within the SPEC tolerance of the truth whose
    pruning matches the reference's; the default must pass that check and repeat itself."""
    if "rows_off_truth" not in row:
        return row.get("same") is True
    checked_ok = row["rows_off_truth"] == 0 and row.get("consistent") is True
    return checked_ok and (row.get("same") is True or bool(row["variant"]))


def verdict(row: dict) -> str:
    if "rows_off_truth" not in row:
        return str(row["same"])
    return (f"{row['same']} ({row['rows_off_truth']} rows off truth"
            f"{'' if row['consistent'] else ', pruning inconsistent'})")


def markdown(rows: list[dict]) -> str:
    md = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        md += [f"\n## {shape}\n", "| kernel | variant | kernel µs | vs default | call graph µs | same output |",
               "|---|---|---|---|---|---|"]
        base = next(r for r in rows if r["shape"] == shape and r["variant"] == {})
        for kern in KERNELS:
            mine = [r for r in rows if r["shape"] == shape and (r["variant"] == {} or r["kernel"] == kern)]
            for r in mine:
                t, t0 = r.get("kernel_us", {}).get(kern), base.get("kernel_us", {}).get(kern)
                ratio = f"{t0 / t:.2f}x" if t and t0 else "—"
                var = "default" if not r["variant"] else ", ".join(f"{k}={v}" for k, v in r["variant"].items())
                if "error" in r:
                    md.append(f"| {kern} | {var} | error: {r['error'][:80]} | | | |")
                    continue
                graph = f"{r['graph_us']:.1f}" if r.get("graph_us") else "—"
                md.append(f"| {kern} | {var} | {t:.1f} | {ratio} | {graph} | {verdict(r)} |" if t else
                          f"| {kern} | {var} | — | — | {graph} | {verdict(r)} |")
            timed = [r for r in mine if correct(r) and r.get("kernel_us", {}).get(kern)]
            if timed:
                best = min(timed, key=lambda r: r["kernel_us"][kern])
                md.append(f"| **{kern} best** | {best['variant'] or 'default'} | **{best['kernel_us'][kern]:.1f}** | | | |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke test)")
    ap.add_argument("--shapes", choices=("pi05", "short"), default="short")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="bf16 on GPU, fp32 on CPU by default")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes: only these shapes")
    ap.add_argument("--variant", action="append", type=parse_variant, default=None,
                    help="KERNEL:name=value[,name=value], repeatable: these variants instead of the sweep")
    ap.add_argument("--reps", type=int, default=30, help="profiled calls per variant")
    ap.add_argument("--budget-s", type=float, default=None, help="start no variant past this many seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = H.pick_device(args.device)
    gpu = device.type == "cuda"
    if not gpu and not K.INTERPRET:
        ap.error("on the CPU the Triton kernels run only with TRITON_INTERPRET=1")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    variants = GPU_VARIANTS if gpu else CPU_VARIANTS
    if args.variant:
        variants = {}
        for kern, v in args.variant:
            variants.setdefault(kern, []).append(v)
    out = pathlib.Path(args.out) if args.out else H.default_out_dir("tune")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    env = H.environment(device)

    def save():
        (out / "tune.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (out / "tune.md").write_text(f"# Triton launch-parameter sweep ({env.get('gpu', device.type)}, "
                                     f"{str(dtype).replace('torch.', '')}, prune_padded)\n" + markdown(rows))

    out_of_time = False
    shapes = shape_list(argparse.Namespace(quick=args.quick, shapes=args.shapes))
    if args.batches:
        shapes = [s for s in shapes if s["B"] in {int(b) for b in args.batches.split(",")}]
        if not shapes:
            ap.error(f"--batches {args.batches}: no {args.shapes} shape has that batch size")
    # The targets' shapes first (pi05 at B=1, then B=64), in case the budget runs out.
    shapes.sort(key=lambda s: (s["B"] != 1 or s["cams"] != 3, s["B"] != 64))
    for s in shapes:
        if out_of_time:
            break
        N = s["cams"] * s["ppc"]
        inp = structured_inputs(batch=s["B"], n_cameras=s["cams"], patches_per_camera=s["ppc"], prompt_len=s["T"],
                                valid_prompt=s["Tv"], width=s["D"], dtype=dtype, device=device, seed=0)
        cap = max(1, N // 3)

        def fn():
            return K.prune_padded(*inp, None, cap, False)

        default = K._config(inp[0], s["T"])
        ref = fn()
        todo = [(None, {})] + [(kern, v) for kern, vs in variants.items() for v in vs]
        seen = set()
        for kern, v in todo:
            if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                print(f"[tune] budget of {args.budget_s:.0f} s spent: stopping", flush=True)
                out_of_time = True
                break
            v = resolve(v, default)
            if kern is not None and all(getattr(default, k) == x for k, x in v.items()):
                continue  # the default itself
            key = (kern, tuple(sorted(v.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"shape": shape_label(s), "kernel": kern, "variant": v}
            try:
                with K.tuning(**v):
                    got = fn()
                    row["same"] = same(got, ref)
                    if kern is None or not row["same"]:
                        idx = K.select(*inp, False)
                        row["rows_off_truth"] = int(R.selection_errors(idx, *inp).sum())
                        row["consistent"] = same(got, R.prune_from_idx(inp[0], idx, inp[3], None, False, cap))
                    if gpu:
                        fn()  # compiled and warm
                        row["kernel_us"], row["launches"] = H.kernel_times(fn, args.reps)
                        row.update(H.time_cuda_graph(fn, inner=20, replays=10))
                    else:
                        row.update(H.time_cpu(fn, reps=2, warmup=0))
            except Exception as e:  # a variant that does not compile (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            ktxt = " ".join(f"{k.strip('_').removesuffix('_kernel')} {t:.1f}" for k, t in row.get("kernel_us", {}).items())
            print(f"[tune] {row['shape']} {kern or 'default'} {v}: same={row.get('same')} {ktxt} "
                  f"graph={row.get('graph_us', float('nan')):.1f} {row.get('error', '')}", flush=True)
        save()
        del inp
    print(markdown(rows))
    for r in rows:
        if r.get("same") is False or r.get("rows_off_truth"):
            print(f"[tune] {r['shape']} {r['variant'] or 'default'}: same as default {r.get('same')}, "
                  f"{r.get('rows_off_truth', '?')} rows off the float64 truth", flush=True)
    return 1 if [r for r in rows if "same" in r and not correct(r)] else 0


if __name__ == "__main__":
    sys.exit(main())

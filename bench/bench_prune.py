#!/usr/bin/env python
"""Op benchmark of the eval pruner: seed-style eager reference, torch.compile of it, and the
fastprune backends, at the pi0.5 shape and a B x N grid, implicit / budget / static-cap modes.

    python bench/bench_prune.py                 # full grid on the GPU (B in 1,8,64 x N in 256,768,1536)
    python bench/bench_prune.py --short         # pi0.5 shape at B=1/8/64 and N=1536 (bench/gpu_check)
    python bench/bench_prune.py --quick         # tiny CPU smoke run (seconds)
    python bench/bench_prune.py --profile ...   # for nsys/ncu, see bench/README.md

Providers (``--providers`` picks):
- ``eager-ref``        pi05_fastprune.reference.prune_ref (builds the [B, N, N] score, like the seed)
- ``compile-ref``      torch.compile of the same function
- ``fastprune-triton`` torch.ops.fastprune.prune / prune_padded(..., backend="triton") (on CUDA the
                        C++ replay of the call's launch plan); CUDA, or on CPU only under
                        TRITON_INTERPRET=1, as a smoke test
- ``fastprune-cpu``    the fused C++ CPU op (CPU only)
- ``fastprune-cuda``   the CUDA C++ op (``backend="cuda"``), listed where _C was built with it
Modes: ``implicit`` (no budget), ``budget`` (keep_tokens = N/8), ``padded`` (implicit with a
static cap max_tokens = N/3: no host sync, so it is also timed as a CUDA-graph replay), and
``select`` (the select op alone: the row argmax, ``reference.select_ref`` for the references;
graph-timed too).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402

import pi05_fastprune  # noqa: E402,F401
from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.prune import cuda_kernels_built  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402

try:
    from pi05_fastprune import triton_ops  # noqa: F401  (registers fastprune::triton_*)

    HAVE_TRITON_OPS = triton_ops.HAVE_TRITON
except Exception:
    HAVE_TRITON_OPS = False

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("implicit", "budget", "padded", "select")


# ----------------------------------------------------------------------------- shapes


def shape_list(args) -> list[dict]:
    """Each shape: batch, cameras x 256 patches, prompt 200 (48 valid), width 2048."""
    if args.quick:
        return [dict(B=1, cams=2, ppc=32, T=24, Tv=8, D=64), dict(B=2, cams=3, ppc=16, T=24, Tv=8, D=64)]
    pi05 = dict(B=1, cams=3, ppc=256, T=200, Tv=48, D=2048)
    if args.shapes == "pi05":
        return [pi05]
    if args.shapes == "pi05_b64":  # the B=1 and B=64 targets (gpu_check's per-kernel ncu step)
        return [pi05, dict(pi05, B=64)]
    if args.shapes == "b64":  # the B=64 target alone (gpu_check's ncu_src step)
        return [dict(pi05, B=64)]
    if args.shapes == "batches":  # where "auto" switches backend (gpu_check's bench_auto step)
        return [dict(pi05, B=B) for B in (1, 2, 4, 8)]
    if args.shapes == "short":
        return [pi05, dict(pi05, B=8), dict(pi05, B=64), dict(pi05, cams=6)]
    return [dict(pi05, B=B, cams=N // 256) for B in (1, 8, 64) for N in (256, 768, 1536)]


def shape_label(s: dict) -> str:
    return f"B{s['B']}xN{s['cams'] * s['ppc']}xT{s['T']}({s['Tv']})xD{s['D']}"


def work(s: dict, dtype: torch.dtype, kept_rows: int) -> dict:
    """The floor of bench/README.md: S and selection FLOPs; read patches + valid prompt,
    write the kept rows."""
    B, N, Tv, D = s["B"], s["cams"] * s["ppc"], s["Tv"], s["D"]
    es = torch.empty((), dtype=dtype).element_size()
    flops = B * (2 * N * Tv * D + 2 * N * N * Tv)
    nbytes = B * (N * D + Tv * D) * es + B * kept_rows * D * es
    return {"flops": flops, "bytes": nbytes}


# ----------------------------------------------------------------------------- providers


def mode_args(mode: str, N: int) -> tuple[Optional[int], Optional[int]]:
    """(keep_tokens, max_tokens) of a mode."""
    if mode in ("implicit", "select"):
        return None, None
    if mode == "budget":
        return max(1, N // 8), None
    if mode == "padded":
        return None, max(1, N // 3)
    raise ValueError(mode)


_compiled_ref = None


def provider_fns(device: torch.device) -> dict[str, Callable]:
    """name -> make(inputs, mode, keep_tokens, max_tokens) -> zero-argument callable."""
    global _compiled_ref
    out: dict[str, Callable] = {}

    def eager(inp, mode, keep, cap):
        if mode == "select":
            return lambda: R.select_ref(*inp)
        return lambda: R.prune_ref(*inp, keep, False, cap)

    out["eager-ref"] = eager

    def compiled(inp, mode, keep, cap):
        global _compiled_ref
        if _compiled_ref is None:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            # The reference's .item() calls break its graph, as they would the seed's; dynamo's
            # warning about each (20 lines a run) says nothing the results do not.
            torch._logging.set_logs(dynamo=logging.ERROR)
            _compiled_ref = {"select": torch.compile(R.select_ref), "prune": torch.compile(R.prune_ref)}
        if mode == "select":
            return lambda: _compiled_ref["select"](*inp)
        return lambda: _compiled_ref["prune"](*inp, keep, False, cap)

    out["compile-ref"] = compiled

    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if HAVE_TRITON_OPS and (device.type == "cuda" or interp):

        def triton_fn(inp, mode, keep, cap):
            # The public ops: on CUDA they replay the call's launch plan from C++ (csrc/triton_plan.h).
            if mode == "select":
                return lambda: torch.ops.fastprune.select(*inp, False, "triton")
            if cap is None:
                return lambda: torch.ops.fastprune.prune(*inp, keep, False, "triton")
            return lambda: torch.ops.fastprune.prune_padded(*inp, keep, cap, False, "triton")

        out["fastprune-triton"] = triton_fn

    def op_backend(backend):
        def make(inp, mode, keep, cap):
            if mode == "select":
                return lambda: torch.ops.fastprune.select(*inp, False, backend)
            if cap is None:
                return lambda: torch.ops.fastprune.prune(*inp, keep, False, backend)
            return lambda: torch.ops.fastprune.prune_padded(*inp, keep, cap, False, backend)

        return make

    if device.type == "cpu":
        out["fastprune-cpu"] = op_backend("cpu")
    else:
        # The CUDA C++ op, where _C was built with it (CUDA torch and nvcc). Asked of the
        # dispatcher, not by a launch: under `ncu -c N` a probe call's kernels were the ones
        # profiled (run 10's ncu_src). A build whose kernels cannot run here fails per row.
        if cuda_kernels_built():
            out["fastprune-cuda"] = op_backend("cuda")
        else:
            print("[prune] fastprune-cuda not available here: _C was built without the CUDA kernels", flush=True)
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few reps (CPU smoke test)")
    ap.add_argument("--short", action="store_true", help="same as --shapes short")
    ap.add_argument("--shapes", choices=("pi05", "pi05_b64", "b64", "batches", "short", "grid"), default="grid")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="bf16 on GPU, fp32 on CPU by default")
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="output folder (default bench/out/prune-<time>)")
    ap.add_argument("--profile", action="store_true", help="run each config a few times for nsys/ncu; no timing")
    ap.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timing")
    ap.add_argument("--rep-ms", type=float, default=100.0)
    args = ap.parse_args(argv)
    if args.short:
        args.shapes = "short"

    device = H.pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    h = H.Harness("prune", device, quick=args.quick, profile=args.profile, graph=not args.no_graph,
                  rep_ms=args.rep_ms, warmup_ms=min(25.0, args.rep_ms / 4))
    providers = provider_fns(device)
    if args.providers:
        wanted = args.providers.split(",")
        missing = [w for w in wanted if w not in providers]
        if missing:  # e.g. fastprune-triton on a CPU without TRITON_INTERPRET=1
            print(f"[prune] not available here, left out: {missing} (available: {list(providers)})", flush=True)
        providers = {k: v for k, v in providers.items() if k in wanted}
    elif args.quick:
        providers.pop("compile-ref", None)  # compiling takes longer than the whole smoke run
    modes = [m for m in args.modes.split(",") if m]
    print(f"[prune] device {device}, dtype {dtype}, providers {list(providers)}, modes {modes}", flush=True)

    for s in shape_list(args):
        N = s["cams"] * s["ppc"]
        with H.nvtx_range(f"inputs {shape_label(s)}", color="gray"):
            inp = structured_inputs(batch=s["B"], n_cameras=s["cams"], patches_per_camera=s["ppc"],
                                    prompt_len=s["T"], valid_prompt=s["Tv"], width=s["D"], dtype=dtype,
                                    device=device, seed=0)
        for mode in modes:
            keep, cap = mode_args(mode, N)
            kept_rows = None
            for name, make in providers.items():
                if name == "compile-ref" and args.shapes == "short" and shape_label(s) != shape_label(shape_list(args)[0]):
                    continue  # compile time: the pi05 shape only in --short
                try:
                    fn = make(inp, mode, keep, cap)
                    if kept_rows is None:
                        res = fn()
                        kept_rows = 0 if mode == "select" else int(res[0].shape[1])
                except Exception as e:
                    h.rows.append({"bench": "prune", "provider": name, "shape": shape_label(s), "mode": mode,
                                   "dtype": str(dtype).replace("torch.", ""), "error": f"{type(e).__name__}: {e}"[:500]})
                    print(f"[prune] {name} {shape_label(s)} {mode}: ERROR {e}", flush=True)
                    continue
                config = {"shape": shape_label(s), "mode": mode, "dtype": str(dtype).replace("torch.", "")}
                h.measure(name, config, fn, work=work(s, dtype, kept_rows or 0),
                          graph=cap is not None or mode == "select",  # a host sync cannot be captured
                          kernels=name.startswith("fastprune"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inp

    for baseline in ("eager-ref", "compile-ref"):
        for r in h.ratios(baseline):
            if r["provider"].startswith("fastprune"):
                mem = f", peak memory {r['memory_ratio']:.3f}x" if "memory_ratio" in r else ""
                print(f"[prune] {r['provider']} vs {baseline} at {r['shape']} {r['mode']}: "
                      f"{r['speedup']:.1f}x faster{mem}", flush=True)
    out = pathlib.Path(args.out) if args.out else H.default_out_dir("prune")
    h.save(out, plot_by=("mode", "dtype"), x="shape")
    print(h.markdown())
    failed = [r for r in h.rows if "error" in r]
    return 1 if failed and args.quick else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training-path benchmark: forward + backward of the straight-through selection.

    python bench/bench_train.py                # pi0.5 shape, B in 8, 32, bf16 (GPU; very slow on CPU)
    python bench/bench_train.py --quick        # small CPU shape, seconds
    python bench/bench_train.py --batches 8    # one batch size

Providers:
- ``eager-ref``   reference.select_soft_ref (the seed: [B, N, N] score, noise, one-hot, softmax,
                  ``(hard + soft - soft.detach()) @ patches``), then ``backward``
- ``compile-ref`` torch.compile of the same (``--compile``; compile time is long)
- ``fastprune``   pi05_fastprune.select_soft (C++ on CPU, Triton on CUDA), then ``backward``

Each call: fresh leaf tensors of patches and task (requires_grad), the forward with
``noise_scale`` 1.0 (the first step of the seed's schedule; the noise is drawn inside), and
``selected.backward(G)`` for a fixed upstream gradient ``G``.

Peak extra memory of one call (the gradients it returns included; inputs and ``G`` not): the
harness's ``peak_extra_mib`` (CUDA allocator peak; on CPU the resident-set high-water mark), and
on CPU also ``peak_tensor_mib``, the peak of live tensor bytes from the profiler's allocator
events (``profile_memory=True``) summed in time order. Speedups and memory ratios against
``eager-ref`` come from ``Harness.ratios`` (results.md, "Ratios"). Results: bench/harness.py's
JSON + Markdown in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402

import pi05_fastprune  # noqa: E402,F401
SS = importlib.import_module("pi05_fastprune.select_soft")  # noqa: E402
from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shape_list(args) -> list[dict]:
    if args.quick:
        return [dict(B=2, cams=3, ppc=32, T=24, Tv=8, D=128), dict(B=4, cams=3, ppc=64, T=48, Tv=12, D=256)]
    return [dict(B=B, cams=3, ppc=256, T=200, Tv=48, D=2048) for B in args.batches]


def shape_label(s: dict) -> str:
    return f"B{s['B']}xN{s['cams'] * s['ppc']}xT{s['T']}({s['Tv']})xD{s['D']}"


def make_inputs(s: dict, dtype, device):
    patches, task, task_mask, patch_mask = structured_inputs(
        batch=s["B"], n_cameras=s["cams"], patches_per_camera=s["ppc"], prompt_len=s["T"],
        valid_prompt=s["Tv"], width=s["D"], dtype=dtype, device=device, seed=0,
    )
    g = torch.randn(patches.shape, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    return patches, task, task_mask, patch_mask, g


_compiled = None


def make_fn(provider: str, inp):
    """A zero-argument forward+backward call of ``provider``."""
    global _compiled
    patches, task, task_mask, patch_mask, g = inp

    if provider == "eager-ref":
        fwd = lambda p, t: R.select_soft_ref(p, t, task_mask, patch_mask, noise_scale=1.0)[0]  # noqa: E731
    elif provider == "compile-ref":
        if _compiled is None:
            _compiled = torch.compile(R.select_soft_ref)
        fwd = lambda p, t: _compiled(p, t, task_mask, patch_mask, noise_scale=1.0)[0]  # noqa: E731
    elif provider == "fastprune":
        ns = torch.tensor(1.0, device=patches.device)
        fwd = lambda p, t: SS.select_soft(p, t, task_mask=task_mask, patch_mask=patch_mask, noise_scale=ns)[0]  # noqa: E731
    else:
        raise ValueError(provider)

    def fn():
        p = patches.detach().requires_grad_()
        t = task.detach().requires_grad_()
        fwd(p, t).backward(g)
        return p.grad, t.grad

    return fn


def peak_tensor_cpu(fn) -> int:
    """Peak of live CPU tensor bytes allocated during one call (profiler memory events: every
    allocation and free of the CPU allocator, summed in time order), outputs included."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        grads = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    del grads
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU shapes, few reps")
    ap.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[8, 32])
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    # fastprune first: a run cut short by its time limit (gpu_check's step) still has our numbers.
    ap.add_argument("--providers", default="fastprune,eager-ref")
    ap.add_argument("--compile", action="store_true", help="add compile-ref")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cpu-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = H.pick_device(args.device)
    dtype = DTYPES[args.dtype]
    providers = [p for p in args.providers.split(",") if p] + (["compile-ref"] if args.compile else [])
    h = H.Harness("train", device, quick=args.quick, graph=False, cpu_reps=args.cpu_reps, host_reps=1,
                  rep_ms=200, warmup_ms=50)
    print(f"[train] device {device}, dtype {dtype}, providers {providers}", flush=True)
    out = pathlib.Path(args.out) if args.out else H.default_out_dir("train")
    for s in shape_list(args):
        inp = make_inputs(s, dtype, device)
        config = {"shape": shape_label(s), "dtype": args.dtype}
        for provider in providers:
            fn = make_fn(provider, inp)
            # time, host latency, peak_extra_mib; on a GPU the device time per kernel of ours
            row = h.measure(provider, config, fn, kernels=provider.startswith("fastprune"))
            if args.no_memory or "error" in row or device.type != "cpu":
                continue
            try:  # CPU: also the allocator-level tensor peak (the RSS high-water mark is coarser)
                row["peak_tensor_mib"] = round(peak_tensor_cpu(fn) / 2**20, 1)
                print(f"[train] {provider} {config['shape']}: peak extra RSS {row.get('peak_extra_mib')} MiB, "
                      f"tensors {row['peak_tensor_mib']} MiB", flush=True)
            except Exception as e:  # recorded, never raised
                row["memory_error"] = f"{type(e).__name__}: {e}"[:300]
        h.save(out)  # after each shape, so that a run cut short keeps what it measured
    for r in h.ratios("eager-ref", keys=("shape", "dtype")):
        base = next(x for x in h.rows if x["provider"] == "eager-ref" and x["shape"] == r["shape"])
        ours = next(x for x in h.rows if x["provider"] == r["provider"] and x["shape"] == r["shape"])
        if base.get("peak_tensor_mib") and ours.get("peak_tensor_mib") is not None:
            r["tensor_memory_ratio"] = ours["peak_tensor_mib"] / base["peak_tensor_mib"]
        print(f"[train] {r['shape']} {r['provider']} vs eager-ref: "
              + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float)), flush=True)
    h.save(out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

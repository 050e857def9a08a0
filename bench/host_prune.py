#!/usr/bin/env python
"""Where the host time of one eager ``prune_padded`` call goes, layer by layer, at the pi0.5
shape (bench_prune's ``host_us`` is the total: 230-500 us for the Triton provider on an H200,
against a 40 us target).

    python bench/host_prune.py --out DIR        # GPU: both backends; CPU: the CPU op only
    python bench/host_prune.py --out DIR --fake-driver   # CPU: the Triton path's host side

Layers timed (wall time per call from a synced start: median, p20, p80; every layer of every
backend measured interleaved, harness.host_times):
- ``api``        prune_tokens(..., max_tokens, backend): the Python API (checks; Triton: eager
                 calls go to the ``op`` on CUDA, elsewhere launch the kernels, triton_ops.call)
- ``op``         torch.ops.fastprune.prune_padded(..., backend): the C++ dispatcher entry (Triton on
                 CUDA: the C++ replay of the call's launch plan, csrc/triton_plan.h)
- ``call``       triton_ops.call("prune_padded", ...): what ``api`` runs for Triton, without
                 prune_tokens' own Python (its checks of what traces the call, then the ``op``:
                 run 14 had api 46.5 us against op 33.5, CUDA C++ 38.9 against 36.0)
- ``triton_op``  torch.ops.fastprune.triton_prune_padded: the torch.library op (Triton only)
- ``launches``   kernels.prune_triton.prune_padded: allocations and the launches, no library
- ``jit_run``    the same, every launch through JITFunction.run (without the eager launch cache)
- ``no_launch``  the same with the launches left out: allocations and Python
- ``gather``     one launch of the gather kernel alone
- ``empty``      one torch.empty on the device (the launch code makes 5 per call)
Each layer is timed twice: one call from a synced start (the median of ``--reps``), and the
mean of BURST calls back to back from one (the host's cost per call in a loop that does not wait
for the device, as a model's forward calls the op; a quarter as many samples). Then a cProfile of
``api`` calls (top functions by total time) into profile_<backend>.txt.

``--fake-driver`` (a machine without a GPU): the Triton layers on CPU tensors, with kernels
compiled for sm_90 and launches that run nothing (bench/triton_fake_driver.py). The host side of
every launch runs for real, except triton's C launcher and the driver's launch call, so these
numbers are the Python share of the host time, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pathlib
import pstats
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402

import pi05_fastprune  # noqa: E402,F401
from pi05_fastprune.prune import prune_tokens  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402


class _JitRun:
    """A kernel seen through this wrapper launches through JITFunction.run every time."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self.kernel[grid]


class _NoLaunch:
    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


BURST = 20  # calls back to back per sample of the second timing


def layers(backend: str, inp, cap: int) -> dict:
    p, t, tm, pm = inp
    out = {
        "api": lambda: prune_tokens(p, t, task_mask=tm, patch_mask=pm, max_tokens=cap, backend=backend),
        "op": lambda: torch.ops.fastprune.prune_padded(p, t, tm, pm, None, cap, False, backend),
    }
    if backend == "triton":
        from pi05_fastprune import triton_ops  # registers fastprune::triton_*
        from pi05_fastprune.kernels import prune_triton as K

        out["call"] = lambda: triton_ops.call("prune_padded", p, t, tm, pm, None, cap, False)
        out["triton_op"] = lambda: torch.ops.fastprune.triton_prune_padded(p, t, tm, pm, None, cap, False)
        out["launches"] = lambda: K.prune_padded(p, t, tm, pm, None, cap, False)
        out["jit_run"] = lambda: K.prune_padded(p, t, tm, pm, None, cap, False, wrap=_JitRun)
        out["no_launch"] = lambda: K.prune_padded(p, t, tm, pm, None, cap, False, wrap=_NoLaunch)
        counts, ws, cfg = K._run_select(p, t, tm, pm, False, False, cap, False, K._identity)
        out["gather"] = lambda: K._run_gather(p, ws, counts, cap, cfg, K._identity)
    out["empty"] = lambda: torch.empty(1024, device=p.device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny shape (CPU smoke test)")
    ap.add_argument("--fake-driver", action="store_true",
                    help="no GPU: the Triton path's host side with launches that run nothing")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = H.pick_device(None)
    with contextlib.ExitStack() as stack:
        if args.fake_driver:
            stack.enter_context(_fake_driver())
        return _measure(args, out, device)


@contextlib.contextmanager
def _fake_driver():
    from triton_fake_driver import FakeDriver

    from pi05_fastprune.kernels import prune_triton as K

    real_config = K._config
    K._config = functools.partial(real_config, gpu_sms=132)  # an H100's launch parameters
    try:
        with FakeDriver(record=False):
            yield
    finally:
        K._config = real_config
        for cached in K._CACHED.values():
            cached.compiled.clear()
            cached.kernel.device_caches.clear()


def _measure(args, out: pathlib.Path, device: torch.device) -> int:
    if args.quick:
        shape = dict(batch=1, n_cameras=2, patches_per_camera=32, prompt_len=24, valid_prompt=8, width=64)
    else:
        shape = dict(batch=1, n_cameras=3, patches_per_camera=256, prompt_len=200, valid_prompt=48, width=2048)
    dtype = torch.bfloat16 if device.type == "cuda" or args.fake_driver else torch.float32
    inp = structured_inputs(**shape, dtype=dtype, device=device, seed=0)
    N = shape["n_cameras"] * shape["patches_per_camera"]
    cap = max(1, N // 3)
    backends = ["triton"] if args.fake_driver else ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    fns = {}
    for backend in backends:
        try:
            fns[backend] = layers(backend, inp, cap)
            for fn in fns[backend].values():  # compile and warm up
                for _ in range(3):
                    fn()
        except Exception as e:  # e.g. _C built without the CUDA kernels
            fns.pop(backend, None)
            print(f"[host] {backend}: not available ({str(e).splitlines()[0][:120]})", flush=True)
    # Every layer of every backend in one interleaved measurement (harness.host_times): one call
    # from a synced start, then BURST calls back to back from one.
    every = {(b, layer): fn for b, layer_fns in fns.items() for layer, fn in layer_fns.items()}
    times = H.host_times(every, device, args.reps)
    loop_times = H.host_times(every, device, max(3, args.reps // 4), burst=BURST)
    rows = []
    md = [f"| backend | layer | host µs per call | p20 | p80 | back to back ({BURST} calls), µs per call | p20 "
          "| p80 |", "|---|---|---|---|---|---|---|---|"]
    for (backend, layer), ts in times.items():
        med, p20, p80 = H._quantiles(ts)
        lmed, lp20, lp80 = H._quantiles(loop_times[backend, layer])
        rows.append({"backend": backend, "layer": layer, "host_us": med, "p20_us": p20, "p80_us": p80,
                     "loop_us": lmed, "loop_p20_us": lp20, "loop_p80_us": lp80})
        cells = " | ".join(f"{x:.1f}" for x in (med, p20, p80, lmed, lp20, lp80))
        md.append(f"| {backend} | {layer} | {cells} |")
        print(f"[host] {backend:7s} {layer:10s} {med:8.1f} us (p20 {p20:.1f}, p80 {p80:.1f}); back to back "
              f"{lmed:.1f} us (p20 {lp20:.1f}, p80 {lp80:.1f})", flush=True)
    for backend, layer_fns in fns.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            layer_fns["api"]()
        prof.disable()
        H._sync(device)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
        (out / f"profile_{backend}.txt").write_text(f"{args.reps} calls of api\n" + text.getvalue())
    env = H.environment(device)
    if args.fake_driver:
        env["fake_driver"] = "kernels compiled for sm_90, launches run nothing (bench/triton_fake_driver.py)"
    (out / "host.json").write_text(json.dumps({"environment": env, "shape": shape, "rows": rows}, indent=1))
    (out / "host.md").write_text(f"# host time per eager prune_padded call ({env['gpu'] or device})\n\n"
                                 + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

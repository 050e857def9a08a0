"""Benchmark harness shared by every benchmark of pi05_fastprune.

What it measures per (provider, config):
- device time: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls;
  median and 20/80 % quantiles), plus CUDA-graph replay of the call (one graph holding
  ``graph_inner`` calls, timed with events, divided), which removes launch gaps and host
  overhead; a provider that syncs or allocates data-dependently cannot be captured and gets
  ``graph_us = None`` with the reason in ``graph_error``.
- host latency per call: wall time of one call from a synced start until it returns (no sync
  after; a call that syncs internally, e.g. a data-dependent output size, includes it);
  bench/host_prune.py also times calls back to back (``host_times(..., burst=)``).
- on CPU: ``time.perf_counter`` medians and quantiles (so it runs, and is smoke-tested, here).

Every call runs inside NVTX ranges ``<provider>`` / ``<phase>`` (the ``nvtx`` package; a
no-op without it — ``torch.cuda.nvtx`` raises on CPU builds), so Nsight filters by provider:
see bench/README.md for the exact ``nsys``/``ncu`` command lines (``--profile`` mode runs each
config a few times between ``cudaProfilerStart``/``Stop`` instead of timing it).

Results: ``results.json`` (environment: GPU name, torch/triton/python versions, git commit,
FASTPRUNE_* settings; one row per measurement), ``results.md`` (a Markdown table) and PNG plots
(matplotlib if installed) in the output folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

try:  # NVTX ranges: the `nvtx` package works on every build; a no-op without it.
    import nvtx as _nvtx

    def nvtx_range(name: str, color: str = "blue"):
        return _nvtx.annotate(name, color=color)

    HAVE_NVTX = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_NVTX = False

    def nvtx_range(name: str, color: str = "blue"):  # noqa: ARG001
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- environment


def git_commit() -> str:
    """FASTPRUNE_COMMIT where the caller names the commit (bench/gpu_check on a copied tree),
    else HEAD, with -dirty for uncommitted changes."""
    if os.environ.get("FASTPRUNE_COMMIT"):
        return os.environ["FASTPRUNE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "nvtx": HAVE_NVTX,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   gpu_cc=f"{p.major}.{p.minor}")
    else:
        env["gpu"] = None
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    env["settings"] = settings()
    return env


def settings() -> dict:
    """The FASTPRUNE_* variables that select kernel variants or launch parameters (gpu_check's
    variant steps set them), so that a result says what it measured."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTPRUNE_") and k != "FASTPRUNE_COMMIT"}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]  # median, p20, p80


def time_cpu(fn: Callable[[], Any], reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    med, p20, p80 = _quantiles(ts)
    return {"median_us": med, "p20_us": p20, "p80_us": p80, "reps": reps, "timer": "perf_counter"}


def time_cuda(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> dict:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3, "timer": "do_bench"}


def time_cuda_graph(fn: Callable[[], Any], inner: int, replays: int) -> dict:
    """Device time per call from replaying a CUDA graph of ``inner`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    med, p20, p80 = _quantiles(ts)
    return {"graph_us": med, "graph_p20_us": p20, "graph_p80_us": p80}


def kernel_label(name: str) -> str:
    """A kernel's name without namespaces, template and call arguments:
    ``void ns::(anonymous namespace)::scores_kernel<__half, true>(Args)`` -> ``scores_kernel``.

    Read at template depth 0 up to the call's "(": template arguments may hold parentheses
    themselves (ATen's ``elementwise_kernel<..., gpu_kernel_impl<...>(TensorIteratorBase&)::
    {lambda(int)#1}>``), so cutting at the first "(" and then stripping ``<...>`` pairs would
    leave an unclosed "<"."""
    head, depth = [], 0
    for ch in name.replace("(anonymous namespace)", ""):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            if ch == "(":
                break
            head.append(ch)
    words = "".join(head).split("::")[-1].split()
    return words[-1] if words else name


def kernel_times(fn: Callable[[], Any], reps: int) -> tuple[dict[str, float], float]:
    """Device µs per call of each kernel ``fn`` launches (CUPTI through torch.profiler: kernel
    durations only, no launch gaps), summed over launches of the same kernel in one call; and
    the device work items (kernels, memsets, copies) per call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    launches = 0
    for e in prof.key_averages():
        total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if total:
            label = kernel_label(e.key)
            times[label] = times.get(label, 0.0) + total / reps
            launches += e.count
    return times, launches / reps


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hands glibc's free heap pages back to the OS (malloc_trim), so that a call's buffers
    must fault in fresh pages and show in the resident-set high-water mark."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Memory one call needs beyond what exists before it, in MiB: on CUDA the caching
    allocator's peak; on Linux CPUs the resident-set high-water mark (reset through
    /proc/self/clear_refs, after returning free heap pages to the OS). None where neither
    is available. ``fn`` should have run once before (measure() times it first): a first call
    also counts one-off allocations (torch's own on a fresh process: ~11 MiB on this CPU)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - before) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    del out
    return None if before is None or peak is None else max(0, peak - before) / 1024


def host_latency(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall time of one call from a synced start, in µs."""
    return statistics.median(host_times({"fn": fn}, device, reps)["fn"])


def host_times(fns: dict[Any, Callable[[], Any]], device: torch.device, reps: int,
               burst: int = 1) -> dict[Any, list[float]]:
    """``reps`` wall times (µs) of one call of each of ``fns``, each from a synced start, measured
    in rounds that call every function once in a shuffled order (seeded): so that drift of the
    machine (clocks, other processes) spreads over all of them alike instead of landing on
    whichever was measured last. Measured one function after another, run 13's CUDA C++ API
    call took 28.1 µs and the op it calls 34.4.

    ``burst`` > 1: each time is the mean of that many calls back to back from the synced start,
    the host's cost per call in a loop that does not wait for the device (as a model's forward
    calls it), without the first call's return from a sync; while the host is the slower side
    (pi0.5's calls: ~35 µs of host to ~20 of device), the device never holds the calls back."""
    order = list(fns)
    rng = random.Random(0)
    ts: dict[Any, list[float]] = {name: [] for name in order}
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            ts[name].append((time.perf_counter() - t0) * 1e6 / burst)
    _sync(device)
    return ts


# ----------------------------------------------------------------------------- harness


class Harness:
    """Collects measurements of one benchmark; ``save`` writes JSON, Markdown and plots."""

    def __init__(self, name: str, device: torch.device | str, *, quick: bool = False, profile: bool = False,
                 graph: bool = True, graph_inner: int = 10, warmup_ms: float = 25, rep_ms: float = 100,
                 cpu_reps: int = 20, host_reps: int = 30):
        self.name = name
        self.device = torch.device(device)
        self.quick, self.profile = quick, profile
        self.graph = graph and self.device.type == "cuda"
        self.graph_inner = graph_inner
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cpu_reps = max(3, cpu_reps // 4) if quick else cpu_reps
        self.host_reps = max(3, host_reps // 4) if quick else host_reps
        self.rows: list[dict] = []
        self.summary: list[dict] = []  # ratios between providers (see ``ratios``)
        self.env = environment(self.device)

    def measure(self, provider: str, config: dict, fn: Callable[[], Any], *,
                work: Optional[dict] = None, graph: Optional[bool] = None, kernels: bool = False) -> dict:
        """Times ``fn`` (no arguments) for ``provider`` at ``config`` (a flat dict of labels).

        ``work = {"flops": ..., "bytes": ...}`` adds the floor-relative columns (achieved
        GFLOP/s and GB/s from the median). ``kernels``: on a GPU, also each kernel's device time
        per call (``kernels_us``) and the device work items per call (``launches``: kernels,
        memsets, copies). Errors are recorded, never raised.
        """
        row: dict = {"bench": self.name, "provider": provider, **config}
        label = f"{provider}/" + ",".join(f"{k}={v}" for k, v in config.items())
        try:
            with nvtx_range(provider, color="green"):
                with nvtx_range("warmup", color="gray"):
                    fn()
                    _sync(self.device)
                if self.profile:
                    # A few plain calls for nsys/ncu; nothing is timed.
                    with nvtx_range("profile", color="red"):
                        if self.device.type == "cuda":
                            torch.cuda.cudart().cudaProfilerStart()
                        for _ in range(3):
                            fn()
                        _sync(self.device)
                        if self.device.type == "cuda":
                            torch.cuda.cudart().cudaProfilerStop()
                    row["profiled"] = True
                    self.rows.append(row)
                    return row
                with nvtx_range("time", color="blue"):
                    if self.device.type == "cuda":
                        row.update(time_cuda(fn, self.warmup_ms, self.rep_ms))
                    else:
                        row.update(time_cpu(fn, self.cpu_reps, warmup=2 if self.quick else 3))
                with nvtx_range("host", color="yellow"):
                    row["host_us"] = host_latency(fn, self.device, self.host_reps)
                with nvtx_range("memory", color="orange"):
                    row["peak_extra_mib"] = peak_extra_mib(fn, self.device)
                if kernels and self.device.type == "cuda":
                    with nvtx_range("kernels", color="cyan"):
                        try:
                            row["kernels_us"], row["launches"] = kernel_times(fn, reps=5 if self.quick else 20)
                        except Exception as e:  # no CUPTI here: the timings above still stand
                            row["kernels_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                if (self.graph if graph is None else graph) and self.device.type == "cuda":
                    with nvtx_range("graph", color="purple"):
                        try:
                            row.update(time_cuda_graph(fn, self.graph_inner, replays=10 if self.quick else 30))
                        except Exception as e:  # e.g. a host sync inside the call
                            torch.cuda.synchronize()
                            row["graph_us"] = None
                            row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            row["traceback"] = traceback.format_exc()[-2000:]
            with contextlib.suppress(Exception):
                _sync(self.device)
        if work and "median_us" in row:
            sec = row["median_us"] * 1e-6
            row["gflops"] = work.get("flops", 0) / sec / 1e9
            row["gbps"] = work.get("bytes", 0) / sec / 1e9
        print(f"[{self.name}] {label}: " + _summary(row), flush=True)
        self.rows.append(row)
        return row

    def ratios(self, baseline: str, keys: Iterable[str] = ("shape", "mode", "dtype")) -> list[dict]:
        """Every provider against ``baseline`` at the same ``keys``, measured in this run:
        ``speedup`` = baseline median / provider median (device time; graph replay where both
        have it: ``graph_speedup``), ``memory_ratio`` = provider / baseline peak extra memory.
        Stored with the results (JSON and Markdown)."""
        keys = tuple(keys)
        base = {tuple(r.get(k) for k in keys): r for r in self.rows if r["provider"] == baseline and "median_us" in r}
        out = []
        for r in self.rows:
            ref = base.get(tuple(r.get(k) for k in keys))
            if r["provider"] == baseline or ref is None or "median_us" not in r:
                continue
            row = {k: r.get(k) for k in keys}
            row.update(provider=r["provider"], baseline=baseline, speedup=ref["median_us"] / r["median_us"])
            if r.get("graph_us") and ref.get("graph_us"):
                row["graph_speedup"] = ref["graph_us"] / r["graph_us"]
            if r.get("peak_extra_mib") is not None and ref.get("peak_extra_mib"):
                row["memory_ratio"] = r["peak_extra_mib"] / ref["peak_extra_mib"]
            out.append(row)
        self.summary.extend(out)
        return out

    # ------------------------------------------------------------------ output

    def save(self, out_dir: str | os.PathLike, plot_by: Iterable[str] = (), x: str = "shape") -> pathlib.Path:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"bench": self.name, "environment": self.env, "quick": self.quick, "profile": self.profile,
                   "rows": self.rows, "summary": self.summary}
        (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
        (out / "results.md").write_text(self.markdown())
        if not self.profile:
            self.plot(out, list(plot_by), x)
        print(f"[{self.name}] wrote {out}/results.json, results.md", flush=True)
        return out

    def markdown(self) -> str:
        cols = ["provider"]
        keys = []
        for r in self.rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
        skip = {"bench", "provider", "traceback", "reps", "timer", "profiled", "graph_p20_us", "graph_p80_us",
                "kernels_us", "kernels_error", "launches"}
        labels = [k for k in keys if k not in skip and not k.endswith("_us")
                  and k not in ("gflops", "gbps", "peak_extra_mib", "error", "graph_error")]
        nums = [k for k in ("median_us", "p20_us", "p80_us", "graph_us", "host_us", "peak_extra_mib", "gflops", "gbps")
                if k in keys]
        cols = labels + ["provider"] + nums + ["note"]
        env = self.env
        lines = [
            f"# {self.name}",
            "",
            f"{env.get('gpu') or env.get('cpu')} · torch {env['torch']} · triton {env.get('triton')} · "
            f"commit {env['git_commit'][:12]} · {env['date']}"
            + "".join(f" · {k}={v}" for k, v in env.get("settings", {}).items()),
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        for r in self.rows:
            note = r.get("error") or r.get("graph_error") or ""
            cells = []
            for c in cols:
                if c == "note":
                    cells.append(str(note).replace("|", "/")[:80])
                elif c in nums:
                    v = r.get(c)
                    cells.append("—" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}"))
                else:
                    cells.append(str(r.get(c, "")))
            lines.append("| " + " | ".join(cells) + " |")
        per_kernel = [r for r in self.rows if r.get("kernels_us")]
        if per_kernel:
            lines += ["", "## Device time per kernel (µs per call, CUPTI: no launch gaps)", "",
                      "| " + " | ".join(labels) + " | provider | kernels | sum | launches |",
                      "|" + "|".join("---" for _ in labels) + "|---|---|---|---|"]
            for r in per_kernel:
                ks = r["kernels_us"]
                n = r.get("launches")
                lines.append("| " + " | ".join(str(r.get(c, "")) for c in labels) + f" | {r['provider']} | "
                             + ", ".join(f"{k} {v:.1f}" for k, v in ks.items()) + f" | {sum(ks.values()):.1f} | "
                             + ("—" if n is None else f"{n:g}") + " |")
        if self.summary:
            cols = list(dict.fromkeys(k for r in self.summary for k in r))
            lines += ["", "## Ratios (measured side by side in this run)", "",
                      "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
            for r in self.summary:
                lines.append("| " + " | ".join(
                    f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, out: pathlib.Path, group_by: list[str], x: str) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            print(f"[{self.name}] matplotlib not installed: no plots", flush=True)
            return
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            if "median_us" in r:
                groups.setdefault(tuple(r.get(k) for k in group_by), []).append(r)
        for key, rows in groups.items():
            fig, ax = plt.subplots(figsize=(8, 4.5))
            xs = list(dict.fromkeys(str(r.get(x)) for r in rows))
            for provider in dict.fromkeys(r["provider"] for r in rows):
                pts = {str(r.get(x)): r for r in rows if r["provider"] == provider}
                ys = [pts[s]["median_us"] if s in pts else math.nan for s in xs]
                ax.plot(xs, ys, marker="o", label=provider)
                gys = [pts[s].get("graph_us") if s in pts and pts[s].get("graph_us") else math.nan for s in xs]
                if any(not math.isnan(v) for v in gys):
                    ax.plot(xs, gys, marker="x", linestyle="--", label=f"{provider} (graph)")
            ax.set_yscale("log")
            ax.set_ylabel("time per call [us]")
            ax.set_xlabel(x)
            title = ", ".join(f"{k}={v}" for k, v in zip(group_by, key))
            ax.set_title(f"{self.name} {title}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
            fig.tight_layout()
            fname = "plot_" + ("_".join(f"{k}-{v}" for k, v in zip(group_by, key)) or "all") + ".png"
            fig.savefig(out / fname.replace("/", "-").replace(" ", ""), dpi=110)
            plt.close(fig)


def _summary(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"].splitlines()[0][:200]
    if row.get("profiled"):
        return "profiled"
    parts = [f"median {row['median_us']:.1f} us [{row['p20_us']:.1f}, {row['p80_us']:.1f}]"]
    if row.get("graph_us") is not None:
        parts.append(f"graph {row['graph_us']:.1f} us")
    elif "graph_error" in row:
        parts.append("graph n/a")
    if "host_us" in row:
        parts.append(f"host {row['host_us']:.1f} us")
    if row.get("peak_extra_mib") is not None:
        parts.append(f"peak +{row['peak_extra_mib']:.2f} MiB")
    return ", ".join(parts)


def default_out_dir(name: str) -> pathlib.Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "bench" / "out" / f"{name}-{stamp}"


def pick_device(arg: Optional[str]) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":  # tiny self-test: python bench/harness.py
    h = Harness("selftest", pick_device(None), quick=True)
    x = torch.randn(256, 256, device=h.device)
    h.measure("matmul", {"shape": "256x256"}, lambda: x @ x, work={"flops": 2 * 256**3, "bytes": 3 * 256 * 256 * 4})
    print(h.markdown())
    sys.exit(0)

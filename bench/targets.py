#!/usr/bin/env python
"""The GPU targets of issues #3 (Triton) and #4 (CUDA C++) against one bench/gpu_check run:
measured, limit, met.

    python bench/targets.py RUN_DIR [--out FILE.md]

RUN_DIR is a gpu_check output folder: its op benchmark (``bench/results.json``), host-time
breakdown (``host/host.json``) and step summary (``summary.json``: whether the GPU tests passed,
without which no time counts as met); a target whose numbers the run lacks reads "not measured".
All at the pi0.5 shape (``B?xN768xT200(48)xD2048``, bf16) in the static-cap mode (``padded``, max_tokens =
N/3, the mode a CUDA graph can hold):
- B=1 device time, CUDA-graph replay: Triton <= 10 µs; CUDA C++ <= 8 µs and not above Triton's;
  also CUDA C++ with the opt-in one-cluster kernel (``bench_one_cluster/results.json``, PERF_LOG
  v80) against 8 µs;
- B=64 within 3x of the floor: graph replay <= 3 x the bytes the call must move (patches, valid
  prompt, M = N/3 rows written; bench/README.md "The floor") at the card's HBM peak; also CUDA C++
  with the one-cluster kernel, a cluster a sample (v81);
- eager at B=1 (median per call, host included): Triton >= 30x the eager reference and >= 5x its
  torch.compile, measured in the same run (the benchmark's ratios);
- host time per eager call of ``prune_tokens`` (host_prune's ``api`` layer): Triton <= 40 µs,
  read both from a synced start and back to back (``loop_us``, in runs of 493cafe and later).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

PI05 = re.compile(r"B(\d+)xN768xT200\(48\)xD2048")
# HBM peak bytes/s by card name (spec sheets); the first match wins.
HBM_PEAK = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))


def _load(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def floor_us(shape: str, gpu: str) -> float | None:
    """The padded mode's memory floor of ``shape`` (B{B}xN{N}xT{T}({Tv})xD{D}, bf16) on ``gpu``, µs."""
    peak = next((bw for name, bw in HBM_PEAK if name in gpu), None)
    m = re.fullmatch(r"B(\d+)xN(\d+)xT\d+\((\d+)\)xD(\d+)", shape)
    if peak is None or m is None:
        return None
    B, N, Tv, D = map(int, m.groups())
    return B * (N + Tv + N // 3) * D * 2 / peak * 1e6


def gpu_tests_status(run: pathlib.Path) -> str:
    """The gpu_tests step's status in the run's summary.json ("ok", "FAILED", ...), or "not run"."""
    summary = _load(run / "summary.json") or {"steps": []}
    return next((s["status"] for s in summary["steps"] if s["step"] == "gpu_tests"), "not run")


def targets(run: pathlib.Path) -> tuple[dict, list[dict]]:
    """(environment, rows): each row a target with backend, measured, limit and met (None when
    the run lacks the numbers; False for every time when its GPU tests did not pass)."""
    empty = {"rows": [], "summary": [], "environment": {}}
    bench = _load(run / "bench" / "results.json") or empty
    one_cluster = _load(run / "bench_one_cluster" / "results.json") or empty
    host = _load(run / "host" / "host.json") or {"rows": []}
    env = dict(bench["environment"] or host.get("environment", {}), gpu_tests=gpu_tests_status(run))
    gpu = env.get("gpu") or ""
    right = env["gpu_tests"] == "ok"

    def pi05_padded(row: dict, batch: int) -> bool:
        m = PI05.fullmatch(row.get("shape", ""))
        return row.get("mode") == "padded" and m is not None and int(m.group(1)) == batch

    def graph(provider: str, batch: int, results: dict = bench) -> tuple[str, float | None]:
        row = next((r for r in results["rows"] if r.get("provider") == provider and pi05_padded(r, batch)), None)
        return (f"B{batch}xN768xT200(48)xD2048", None) if row is None else (row["shape"], row.get("graph_us"))

    def speedup(provider: str, baseline: str) -> float | None:
        return next((r["speedup"] for r in bench["summary"]
                     if r.get("provider") == provider and r.get("baseline") == baseline and pi05_padded(r, 1)), None)

    def host_us(backend: str, key: str) -> float | None:
        return next((r.get(key) for r in host["rows"] if r["backend"] == backend and r["layer"] == "api"), None)

    rows = []

    def add(target: str, backend: str, measured: float | None, limit: float | None, at_most: bool = True):
        met = None if measured is None or limit is None else (measured <= limit if at_most else measured >= limit)
        met = met and right if met is not None else None
        rows.append({"target": target, "backend": backend, "measured": measured, "limit": limit,
                     "at_most": at_most, "met": met})

    _, tri1 = graph("fastprune-triton", 1)
    _, cu1 = graph("fastprune-cuda", 1)
    add("B=1 graph replay, µs", "triton", tri1, 10.0)
    add("B=1 graph replay, µs", "cuda", cu1, 8.0)
    add("B=1 graph replay, µs, not above Triton's", "cuda", cu1, tri1)
    add("B=1 graph replay, µs, one cluster (opt-in)", "cuda", graph("fastprune-cuda", 1, one_cluster)[1], 8.0)
    for provider, backend, results, name in (
            ("fastprune-triton", "triton", bench, ""), ("fastprune-cuda", "cuda", bench, ""),
            ("fastprune-cuda", "cuda", one_cluster, ", one cluster a sample (opt-in)")):
        shape, t64 = graph(provider, 64, results)
        floor = floor_us(shape, gpu)
        add(f"B=64 graph replay, µs, <= 3x the floor{name}", backend, t64, None if floor is None else 3 * floor)
    add("B=1 eager, x the eager reference", "triton", speedup("fastprune-triton", "eager-ref"), 30.0, False)
    add("B=1 eager, x torch.compile of it", "triton", speedup("fastprune-triton", "compile-ref"), 5.0, False)
    add("host per prune_tokens call from a synced start, µs", "triton", host_us("triton", "host_us"), 40.0)
    add("host per prune_tokens call back to back, µs", "triton", host_us("triton", "loop_us"), 40.0)
    return env, rows


def markdown(env: dict, rows: list[dict]) -> str:
    def num(x):
        return "not measured" if x is None else f"{x:.1f}"

    lines = [f"# Targets against {env.get('gpu') or 'an unnamed device'}, commit {str(env.get('git_commit'))[:12]}",
             "", f"GPU tests: {env['gpu_tests']} (a time counts as met only where they passed)", "",
             "| target | backend | measured | limit | met |", "|---|---|---|---|---|"]
    for r in rows:
        limit = "—" if r["limit"] is None else ("<= " if r["at_most"] else ">= ") + num(r["limit"])
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['target']} | {r['backend']} | {num(r['measured'])} | {limit} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a bench/gpu_check output folder")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    text = markdown(*targets(pathlib.Path(args.run)))
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

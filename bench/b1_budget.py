#!/usr/bin/env python
"""PERF_LOG lead 1's budget (one launch of a 16-CTA cluster for pi0.5 at B=1) from the pieces
that bench/b1_probe.cu measured: whether that design can meet the CUDA C++ target of 8 µs.

    python bench/b1_budget.py RUN_DIR/b1_probe.json [--out FILE.md]

Every probe row is device time per launch (CUDA-graph replay), its own launch included, so each
piece below is its row less ``launch_cluster16_us``, and the launch is counted once:
- streaming: each CTA's 192 KB of patches, by bulk copies or 16-byte loads (the faster), with the
  whole valid prompt read by every CTA (``_task``) or, at best, shared by a multicast (patches only);
- the S products (48 rows x 48 tokens x 2048 a CTA) and the f16x3 selection products (48 rows x
  768 columns x 48 tokens x 3) on warp-level MMA, unpadded at best, in whole 64-tiles at worst;
- the all-gather of S out of distributed shared memory;
- five cluster barriers (the prompt norms, S done, the all-gather read, the votes, the kept list).
Best case: the streaming and the S products overlap (the MMAs run as the tiles land) and the
prompt is multicast; worst case: every piece one after the other. The dependent round trips
(``chain_ns``) are listed beside them: the serial ends (votes, the keep rule, the list) are
chains of such trips, which the pieces do not include.

Where the same run's op benchmark measured the three CUDA C++ kernels at B=1 (graph replay, via
bench/targets.py), both cases are also set against that: a design that misses 8 µs may still be
worth building if even its worst case beats the kernels it would replace at B=1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import targets  # noqa: E402

TARGET_US = 8.0  # issue #4: CUDA C++ device time at pi05 B=1
BARRIERS = 5


def budget(probe: dict, current_us: float | None = None) -> dict:
    """Pieces, best and worst totals (µs) and a verdict from one b1_probe.json; a piece whose
    row is missing or failed (negative) makes the totals None. current_us: the three CUDA C++
    kernels at pi05 B=1 (graph replay) measured in the same run, if any."""
    launch = probe.get("launch_cluster16_us", -1.0)
    stream, mma = probe.get("stream_us", {}), probe.get("mma_us", {})

    def net(x):
        return x - launch if x is not None and x >= 0 and launch >= 0 else None

    def fastest(*rows):  # of the ways that ran
        vals = [v for v in (net(stream.get(r)) for r in rows) if v is not None]
        return min(vals) if vals else None

    sync = probe.get("cluster_sync_us", -1.0)
    pieces = {
        "launch (one 16-CTA cluster)": launch if launch >= 0 else None,
        "streaming, prompt multicast (patches only)": fastest("bulk_cluster16", "load_cluster16"),
        "streaming, every CTA reads the prompt": fastest("bulk_cluster16_task", "load_cluster16_task"),
        "S products, unpadded": net(mma.get("s_share")),
        "S products, 64-tiles": net(mma.get("s_share_padded")),
        "all-gather of S (DSMEM)": net(probe.get("allgather_us")),
        "selection products, unpadded": net(mma.get("select_share")),
        "selection products, 64-tiles": net(mma.get("select_share_padded")),
        f"{BARRIERS} cluster barriers": BARRIERS * sync if sync >= 0 else None,
    }
    p = list(pieces.values())
    best = worst = None
    if None not in p:
        launch_us, multicast, task, s, s_pad, gather, sel, sel_pad, barriers = p
        best = launch_us + max(multicast, s) + gather + sel + barriers
        worst = launch_us + task + s_pad + gather + sel_pad + barriers
    fits16 = probe.get("max_active_clusters", {}).get("16", 0)
    if fits16 <= 0:
        verdict = "no 16-CTA cluster fits at 200 KB of shared memory: the design needs 8-CTA clusters"
    elif best is None:
        verdict = "not measured: a piece is missing or its launch failed"
    elif best > TARGET_US:
        verdict = f"cannot meet {TARGET_US:g} µs even at best: more SMs, or fewer round trips in the three kernels"
    elif worst <= TARGET_US:
        verdict = f"meets {TARGET_US:g} µs even with every piece in series"
    else:
        verdict = f"meets {TARGET_US:g} µs only with the streaming overlapped and the prompt multicast"
    against = None
    if current_us is not None and best is not None:
        if worst < current_us:
            against = f"even the worst case beats the three kernels' {current_us:.1f} µs"
        elif best < current_us:
            against = f"only the best case beats the three kernels' {current_us:.1f} µs"
        else:
            against = f"even the best case does not beat the three kernels' {current_us:.1f} µs"
    return {"gpu": probe.get("gpu"), "pieces": pieces, "best_us": best, "worst_us": worst, "verdict": verdict,
            "against_current": against, "chain_ns": probe.get("chain_ns", {}),
            "max_active_clusters": probe.get("max_active_clusters", {})}


def markdown(b: dict) -> str:
    def us(x):
        return "—" if x is None else f"{x:.2f}"

    lines = [f"# Lead 1's budget at pi05 B=1 ({b['gpu']})", "", "| piece | µs |", "|---|---|"]
    lines += [f"| {name} | {us(v)} |" for name, v in b["pieces"].items()]
    lines += [f"| **best case** (streaming and S overlapped, prompt multicast) | **{us(b['best_us'])}** |",
              f"| **worst case** (in series, every CTA reads the prompt, 64-tiles) | **{us(b['worst_us'])}** |",
              "", f"Target {TARGET_US:g} µs: {b['verdict']}.", ""]
    if b["against_current"]:
        lines += [f"Against the same run's CUDA C++ kernels at B=1: {b['against_current']}.", ""]
    clusters = b["max_active_clusters"]
    lines.append(f"Clusters held at once at 200 KB a CTA: {clusters.get('8', '—')} of 8 CTAs, "
                 f"{clusters.get('16', '—')} of 16.")
    chain = b["chain_ns"]
    if chain:
        lines.append("One dependent round trip, ns: "
                     + ", ".join(f"{k} {v:.0f}" if v >= 0 else f"{k} failed" for k, v in chain.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe_json", type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    _, rows = targets.targets(args.probe_json.parent)  # the gpu_check run folder the probe wrote into
    current = next((r["measured"] for r in rows if r["target"] == "B=1 graph replay, µs" and r["backend"] == "cuda"),
                   None)
    text = markdown(budget(json.loads(args.probe_json.read_text()), current))
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

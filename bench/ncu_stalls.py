#!/usr/bin/env python
"""Where each kernel's warps wait, from Nsight Compute's per-SASS-instruction stall samples.

    ncu --import REPORT --page source --csv --print-source sass > sass.csv
    python bench/ncu_stalls.py sass.csv --out stalls.md [--top 20]

The export is one block per profiled launch (a "Kernel Name" line, a header, one line per SASS
instruction) and runs to ~4 MB per launch, too much to commit; this summary is what a reader
needs from it. Per kernel name (its first launch; the count of launches beside it):
- the share of warp stall samples by reason;
- the kernel cut into phases at its block and cluster barriers (BAR.SYNC, UCGABAR_WAIT) and at
  its global atomics, the samples of each phase and its top reasons: which step of a fused kernel
  the warps wait in;
- the instructions with the most samples, with their top two reasons.
Samples count warps, not time: a phase that one block runs (a finishing step) weighs little
here even when it is long on the timeline.
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
# Instructions after which a new phase starts: block barriers, the wait of a cluster barrier (the
# one-cluster kernel's phases), and global atomics (the merges and arrivals between a kernel's main
# loop and its finishing step).
PHASE_ENDS = ("BAR.SYNC", "UCGABAR_WAIT", "ATOMG", "RED.")


def read_launches(path: pathlib.Path) -> list[dict]:
    """[{"name", "header", "rows"}] per profiled launch, in the export's order."""
    launches: list[dict] = []
    header: list[str] | None = None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                launches.append({"name": row[1], "header": None, "rows": []})
            elif row[0] == "Address":
                header = row
                if launches:
                    launches[-1]["header"] = row
            elif launches:
                launches[-1]["rows"].append(row)
    for launch in launches:
        launch["header"] = launch["header"] or header
        if launch["header"] is None or SAMPLES not in launch["header"]:
            raise ValueError(f"{path}: no '{SAMPLES}' column (export with --page source --csv --print-source sass)")
    return launches


def _int(text: str) -> int:
    text = text.replace(",", "").strip()
    return int(float(text)) if text not in ("", "-") else 0


def summarize(launch: dict) -> dict:
    col = {h: i for i, h in enumerate(launch["header"])}
    reasons = [h for h in launch["header"] if h.startswith("stall_") and "(Not Issued)" not in h]
    total = collections.Counter()
    instructions = []
    phases = []
    phase = {"first": 0, "samples": 0, "reasons": collections.Counter()}
    for n, row in enumerate(launch["rows"]):
        samples = _int(row[col[SAMPLES]])
        by_reason = {r[len("stall_"):]: _int(row[col[r]]) for r in reasons}
        total.update(by_reason)
        source = " ".join(row[col["Source"]].split())
        executed = _int(row[col[EXECUTED]]) if EXECUTED in col else 0
        instructions.append((samples, n, source, by_reason))
        phase["samples"] += samples
        phase["reasons"].update(by_reason)
        if any(p in source for p in PHASE_ENDS) and executed > 0:
            phase.update(last=n, end=source)
            phases.append(phase)
            phase = {"first": n + 1, "samples": 0, "reasons": collections.Counter()}
    if phase["samples"]:
        phase.update(last=len(launch["rows"]) - 1, end="(end)")
        phases.append(phase)
    return {"samples": sum(i[0] for i in instructions), "reasons": total, "phases": phases,
            "instructions": instructions}


def _top(counter: collections.Counter, k: int, total: int) -> str:
    return ", ".join(f"{r} {100 * v / total:.0f}%" for r, v in counter.most_common(k) if v) if total else "—"


def report(launches: list[dict], top: int) -> str:
    counts = collections.Counter(l["name"] for l in launches)
    out = ["# Warp stall samples per kernel (ncu source page, SASS)", ""]
    seen = set()
    for launch in launches:
        if launch["name"] in seen:
            continue
        seen.add(launch["name"])
        s = summarize(launch)
        total = s["samples"]
        out += [f"## {launch['name']}", "",
                f"{counts[launch['name']]} launch(es) profiled; the first: {total} samples over "
                f"{len(launch['rows'])} SASS instructions.", "",
                f"Reasons: {_top(s['reasons'], 8, total)}", "",
                "| phase (SASS lines) | ends at | samples | top reasons |", "|---|---|---|---|"]
        for p in s["phases"]:
            if p["samples"]:
                out.append(f"| {p['first']}-{p['last']} | `{p['end'][:48]}` | {100 * p['samples'] / total:.1f}% | "
                           f"{_top(p['reasons'], 3, p['samples'])} |")
        out += ["", "| line | instruction | samples | top reasons |", "|---|---|---|---|"]
        for samples, n, source, by_reason in sorted(s["instructions"], key=lambda i: (-i[0], i[1]))[:top]:
            if samples:
                reasons = collections.Counter(by_reason)
                out.append(f"| {n} | `{source[:64]}` | {100 * samples / total:.1f}% | {_top(reasons, 2, samples)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=pathlib.Path, help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="Markdown file (default: stdout)")
    ap.add_argument("--top", type=int, default=20, help="instructions listed per kernel")
    args = ap.parse_args(argv)
    launches = read_launches(args.csv)
    if not launches:
        print(f"{args.csv}: no profiled launch", file=sys.stderr)
        return 1
    text = report(launches, args.top)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side by side: two results of a benchmark of this folder (bench_prune, bench_train, ...).

    python bench/compare.py BASE NEW [--out FILE.md]

BASE and NEW are results.json files or the folders that hold them, e.g. two gpu_check runs
(``bench/results/<dir>/run5/bench run6/bench``) or one run's default against a variant
(``run6/bench run6/bench_cluster/auto``). Rows match on their labels (provider, shape, mode,
dtype, ...); for each match the table gives the times that both have (median, CUDA-graph replay,
host per call, each kernel's CUPTI time) as BASE -> NEW and NEW / BASE. Rows only one side has are
listed after the table. A comparison is meaningful only on the same card: both files' GPU names
head the output.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

TIMES = ("median_us", "graph_us", "host_us")


def load(path: str) -> dict:
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise SystemExit(f"compare.py: no results.json at {path}")
    return json.loads(p.read_text())


FIRST = ("provider", "shape", "mode", "dtype")


def label(row: dict) -> tuple[str, ...]:
    """The row's identity: every text field but the benchmark's name and timer, FIRST first."""
    rest = sorted(k for k, v in row.items() if isinstance(v, str) and k not in FIRST + ("bench", "timer"))
    return tuple(str(row[k]) for k in FIRST + tuple(rest) if k in row)


def times(row: dict) -> dict[str, float]:
    out = {k: row[k] for k in TIMES if isinstance(row.get(k), (int, float))}
    for name, us in (row.get("kernels_us") or {}).items():
        out[f"kernel {name}"] = us
    return out


def card(res: dict) -> str:
    """The device, the commit and the FASTPRUNE_* settings (results before they were recorded
    have none)."""
    env = res.get("environment", {})
    out = f"{env.get('gpu') or env.get('device') or 'unknown device'} (commit {env.get('git_commit', '?')})"
    return out + "".join(f" {k}={v}" for k, v in (env.get("settings") or {}).items())


def compare(base: dict, new: dict) -> str:
    b_rows = {label(r): r for r in base["rows"]}
    n_rows = {label(r): r for r in new["rows"]}
    lines = [f"BASE: {card(base)}", f"NEW:  {card(new)}", "",
             "| row | time | BASE µs | NEW µs | NEW / BASE |", "|---|---|---|---|---|"]
    for key in [k for k in b_rows if k in n_rows]:
        name = " ".join(key)
        tb, tn = times(b_rows[key]), times(n_rows[key])
        for t in [t for t in tb if t in tn]:
            ratio = tn[t] / tb[t] if tb[t] > 0 else float("nan")
            lines.append(f"| {name} | {t} | {tb[t]:.1f} | {tn[t]:.1f} | {ratio:.2f} |")
    for side, only in (("BASE", [k for k in b_rows if k not in n_rows]), ("NEW", [k for k in n_rows if k not in b_rows])):
        if only:
            lines += ["", f"Only in {side}:"] + ["- " + " ".join(k) for k in only]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    text = compare(load(args.base), load(args.new))
    sys.stdout.write(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

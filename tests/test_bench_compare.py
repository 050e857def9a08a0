"""bench/compare.py on committed GPU results (run 4 against run 5, run 5's default against its
bench_nopdl variant) and on made-up rows."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "results" / "h200-2026-11-26"
sys.path.insert(0, str(ROOT / "bench"))
import compare  # noqa: E402


def test_run4_against_run5():
    text = compare.compare(compare.load(RUNS / "run4" / "bench"), compare.load(RUNS / "run5" / "bench"))
    assert text.startswith("BASE: NVIDIA H200 (commit ") and "NEW:  NVIDIA H200 (commit 946dcea)" in text
    row = "| fastprune-cuda B1xN768xT200(48)xD2048 implicit bfloat16 | kernel scores_kernel | 38.7 | 20.5 | 0.53 |"
    assert row in text, text[:3000]


def test_variant_rows_only_on_one_side(tmp_path):
    """run 5's bench_nopdl has the CUDA provider's pi05 rows only: the rest are listed as BASE's."""
    out = tmp_path / "cmp.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), str(RUNS / "run5" / "bench"),
                           str(RUNS / "run5" / "bench_nopdl"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == proc.stdout
    table, only = proc.stdout.split("Only in BASE:")
    assert "Only in NEW" not in proc.stdout
    assert all(" fastprune-cuda B1xN768xT200(48)xD2048 " in line for line in table.splitlines() if line.startswith("| f"))
    assert "- eager-ref B64xN768xT200(48)xD2048 padded bfloat16" in only


def test_made_up_rows(tmp_path):
    def res(rows, settings=None):
        return {"environment": {"gpu": "G", "git_commit": "abc", "settings": settings or {}}, "rows": rows}

    base = res([{"provider": "p", "shape": "s", "median_us": 10.0, "graph_us": 4.0, "kernels_us": {"k": 2.0}},
                {"provider": "q", "shape": "s", "median_us": 1.0}])
    new = res([{"provider": "p", "shape": "s", "median_us": 5.0, "kernels_us": {"k": 3.0, "k2": 1.0}}],
              {"FASTPRUNE_CUDA_CLUSTER": "0"})
    lines = compare.compare(base, new).splitlines()
    assert lines[:2] == ["BASE: G (commit abc)", "NEW:  G (commit abc) FASTPRUNE_CUDA_CLUSTER=0"]
    assert "| p s | median_us | 10.0 | 5.0 | 0.50 |" in lines
    assert "| p s | kernel k | 2.0 | 3.0 | 1.50 |" in lines
    assert not any("graph_us" in line or "k2" in line for line in lines)  # only times both sides have
    assert lines[-2:] == ["Only in BASE:", "- q s"]
    (tmp_path / "r.json").write_text(json.dumps(new))
    assert compare.load(tmp_path / "r.json") == new
    with pytest.raises(SystemExit, match="no results.json"):
        compare.load(tmp_path / "missing")

"""bench/tune_triton.py, the GPU sweep of the Triton kernels' launch parameters: its CPU run
under the interpreter (every variant's outputs equal the default's) and its report."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("triton")


def test_quick_sweep_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_triton.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {None, "_scores_kernel", "_select_kernel", "_gather_kernel"}
    assert all(r["same"] is True for r in rows), [r for r in rows if not r.get("same")]
    assert all(r["rows_off_truth"] == 0 and r["consistent"] for r in rows if r["kernel"] is None)  # the defaults
    assert "| _select_kernel | bm2=32, bn2=16 |" in (tmp_path / "tune.md").read_text()


def test_chosen_shapes_and_variants(tmp_path):
    """--batches and --variant narrow a run to one shape and the variants named (gpu_check's
    GPU_CHECK_TUNE_ARGS); a malformed variant is an error naming it."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, str(ROOT / "bench" / "tune_triton.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--batches", "2", "--variant", "scores:ksplit=1", "--variant", "select:n_split=1,bm2=32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert [(r["shape"], r["kernel"], r["variant"]) for r in rows] == [
        ("B2xN48xT24(8)xD64", None, {}), ("B2xN48xT24(8)xD64", "_scores_kernel", {"ksplit": 1}),
        ("B2xN48xT24(8)xD64", "_select_kernel", {"n_split": 1, "bm2": 32})]
    for bad, says in [("scores", "expected KERNEL:name=value"), ("scores:bm9=2", "'bm9' is not one of"),
                      ("fused:bm1=2", "KERNEL one of scores, select, gather")]:
        proc = subprocess.run(cmd + ["--variant", bad], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and says in proc.stderr, (bad, proc.stderr[-500:])


def test_a_wrong_default_fails_the_sweep():
    """The default's own selection is checked too: one off the truth, or not the same twice, fails."""
    import tune_triton as T

    base = {"shape": "s", "kernel": None, "variant": {}, "same": True, "rows_off_truth": 0, "consistent": True}
    assert T.correct(base)
    assert not T.correct(dict(base, rows_off_truth=162))
    assert not T.correct(dict(base, same=False))
    assert T.correct(dict(base, kernel="_scores_kernel", variant={"bk": 64}, same=False))


def test_report_names_the_fastest_variant_with_equal_outputs():
    import tune_triton as T

    def row(kernel, variant, scores, same=True):
        return {"shape": "s", "kernel": kernel, "variant": variant, "same": same, "graph_us": 30.0,
                "kernel_us": {"_scores_kernel": scores, "_select_kernel": 20.0, "_gather_kernel": 3.0}}

    md = T.markdown([row(None, {}, 20.0), row("_scores_kernel", {"bk": 256}, 8.0),
                     row("_scores_kernel", {"bm1": 64}, 5.0, same=False)])
    assert "| _scores_kernel | bk=256 | 8.0 | 2.50x | 30.0 | True |" in md
    assert "| **_scores_kernel best** | {'bk': 256} | **8.0** |" in md  # the faster one differs
    assert "| **_select_kernel best** | default | **20.0** |" in md


def test_a_differing_variant_is_judged_by_the_float64_truth():
    import tune_triton as T

    def row(variant, scores, same=True, off=None, consistent=True):
        r = {"shape": "s", "kernel": "_scores_kernel" if variant else None, "variant": variant, "same": same,
             "graph_us": 30.0, "kernel_us": {"_scores_kernel": scores, "_select_kernel": 20.0, "_gather_kernel": 3.0}}
        if off is not None:
            r.update(rows_off_truth=off, consistent=consistent)
        return r

    md = T.markdown([row({}, 20.0), row({"bm1": 64}, 5.0, same=False, off=0),
                     row({"bk": 64}, 4.0, same=False, off=3), row({"bk": 256}, 3.0, same=False, off=0, consistent=False)])
    assert "| _scores_kernel | bm1=64 | 5.0 | 4.00x | 30.0 | False (0 rows off truth) |" in md
    assert "| _scores_kernel | bk=64 | 4.0 | 5.00x | 30.0 | False (3 rows off truth) |" in md
    assert "| _scores_kernel | bk=256 | 3.0 | 6.67x | 30.0 | False (0 rows off truth, pruning inconsistent) |" in md
    assert "| **_scores_kernel best** | {'bm1': 64} | **5.0** |" in md  # the faster two are wrong


def test_pipeline_repro_under_the_interpreter(tmp_path):
    """bench/triton_pipeline_repro.py (PERF_LOG v58) on tiny shapes: every variant matches
    float64 and repeats itself (the interpreter has no pipeline); its check flags a wrong output
    and one never written."""
    import torch
    import triton_pipeline_repro as R

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_pipeline_repro.py"), "--quick", "--calls", "2",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "repro.json").read_text())["rows"]
    assert {(r["stages"], r["sums"]) for r in rows} == {(s, m) for s in (1, 3) for m in R.SUMS}
    assert not [r for r in rows if r["wrong"]]

    want = (torch.rand(2, 3, 4, dtype=torch.float64) + 1, torch.rand(2, 3, dtype=torch.float64) + 1,
            torch.rand(2, 4, dtype=torch.float64) + 1)
    assert R.rel_error(tuple(w.float() for w in want), want, "before") < 1e-6
    off = [w.float() for w in want]
    off[1][0, 0] += 0.1
    assert R.rel_error(tuple(off), want, "after") > R.WRONG
    assert R.rel_error(tuple(off), want, "none") < 1e-6  # without sums only the dot products count
    off[0][1, 2, 3] = float("nan")
    assert R.rel_error(tuple(off), want, "none") == float("inf")

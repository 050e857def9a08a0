"""bench/targets.py: the issues' GPU targets read from a gpu_check run, checked against the numbers
of the committed H200 runs (README "Measured on a GPU") and a run that lacks some."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import targets  # noqa: E402

RUNS = ROOT / "bench" / "results" / "h200-2026-11-28"


def table(run):
    """(environment, {(target, backend): (measured to 0.1, met)})."""
    env, rows = targets.targets(run)
    return env, {(r["target"], r["backend"]): (None if r["measured"] is None else round(r["measured"], 1), r["met"])
                 for r in rows}


def test_run14():
    env, t = table(RUNS / "run14")
    assert env["gpu"] == "NVIDIA H200" and env["gpu_tests"] == "ok"
    assert t[("B=1 graph replay, µs", "triton")] == (20.6, False)
    assert t[("B=1 graph replay, µs", "cuda")] == (19.8, False)
    assert t[("B=1 graph replay, µs, not above Triton's", "cuda")] == (19.8, True)  # Triton's: 20.6
    assert t[("B=1 graph replay, µs, one cluster (opt-in)", "cuda")] == (None, None)  # the kernel came after run 14
    assert t[("B=64 graph replay, µs, <= 3x the floor", "triton")] == (219.2, False)
    assert t[("B=64 graph replay, µs, <= 3x the floor", "cuda")] == (229.6, False)
    assert t[("B=64 graph replay, µs, <= 3x the floor, one cluster a sample (opt-in)", "cuda")] == (None, None)
    assert t[("B=1 eager, x the eager reference", "triton")] == (34.5, True)
    assert t[("B=1 eager, x torch.compile of it", "triton")] == (13.1, True)
    assert t[("host per prune_tokens call from a synced start, µs", "triton")] == (46.5, False)
    # host_prune's loop_us came after run 14
    assert t[("host per prune_tokens call back to back, µs", "triton")] == (None, None)
    # 3x the padded mode's floor at B=64 on an H200 (bench/README.md: 59 µs, <= 176)
    assert round(targets.floor_us("B64xN768xT200(48)xD2048", "NVIDIA H200"), 1) == 58.5
    assert targets.floor_us("B64xN768xT200(48)xD2048", "an unknown card") is None


def test_failed_gpu_tests_meet_nothing():
    """Run 13's Triton eval kernels were wrong (its GPU tests failed): its 51x over the eager
    reference is no target met."""
    env, t = table(RUNS / "run13")
    assert env["gpu_tests"] == "FAILED"
    assert t[("B=1 eager, x the eager reference", "triton")][0] > 30
    assert t[("B=1 eager, x the eager reference", "triton")][1] is False


def test_missing_numbers(tmp_path, capsys):
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "host.json").write_text(json.dumps({"environment": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": [
        {"backend": "triton", "layer": "api", "host_us": 45.0, "loop_us": 31.0}]}))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [{"step": "gpu_tests", "status": "ok"}]}))
    (tmp_path / "bench_one_cluster").mkdir()  # gpu_check's bench_one_cluster step: the CUDA provider alone
    (tmp_path / "bench_one_cluster" / "results.json").write_text(json.dumps({"environment": {}, "summary": [], "rows": [
        {"provider": "fastprune-cuda", "mode": "padded", "shape": "B1xN768xT200(48)xD2048", "graph_us": 7.5},
        {"provider": "fastprune-cuda", "mode": "padded", "shape": "B64xN768xT200(48)xD2048", "graph_us": 150.0}]}))
    assert targets.main([str(tmp_path), "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert text == capsys.readouterr().out
    assert "| B=1 graph replay, µs | triton | not measured | <= 10.0 | — |" in text
    assert "| B=1 graph replay, µs, one cluster (opt-in) | cuda | 7.5 | <= 8.0 | yes |" in text
    assert "| B=64 graph replay, µs, <= 3x the floor | cuda | not measured | <= 251.7 | — |" in text  # H100
    assert "| B=64 graph replay, µs, <= 3x the floor, one cluster a sample (opt-in) | cuda | 150.0 | <= 251.7 | yes |" in text
    assert "| host per prune_tokens call back to back, µs | triton | 31.0 | <= 40.0 | yes |" in text
    assert "| host per prune_tokens call from a synced start, µs | triton | 45.0 | <= 40.0 | no |" in text
    assert round(targets.floor_us("B64xN768xT200(48)xD2048", "NVIDIA H100 80GB HBM3"), 1) == 83.9

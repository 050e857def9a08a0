"""CPU smoke test of bench/bench_pi05.py: its quickest mode (dummy pi0.5, eager, 2 Euler steps)
into a tmp folder; the JSON has every provider, phase and summary entry, without errors."""

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

import bench_pi05 as bench  # noqa: E402


def test_bench_pi05_quick(tmp_path):
    grad = torch.is_grad_enabled()
    try:
        rc = bench.main(["--quick", "--cases", "implicit", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_grad_enabled(grad)
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").exists() and "## Summary" in (tmp_path / "results.md").read_text()
    rows = data["rows"]
    assert not [r for r in rows if "error" in r], [r.get("error") for r in rows if "error" in r]
    assert data["final"] and "fatal" not in data["meta"]
    got = {(r["provider"], r["case"], r["phase"]) for r in rows}
    want = {("unpruned-compiled", "unpruned", ph) for ph in ("sample_actions", "vision", "prefix", "denoise")}
    for p in ("seed-eager", "fastprune-dynamic", "fastprune-static-graph"):
        want |= {(p, "implicit", ph) for ph in ("sample_actions", "vision", "prune", "prefix", "denoise")}
    assert got == want, got ^ want
    for r in rows:
        assert r["median_us"] > 0 and r["size"] == "dummy" and r["compile"] == "eager"
    e2e = {r["provider"]: r for r in rows if r["phase"] == "sample_actions"}
    assert all(r["finite"] for r in e2e.values())
    # The structured case keeps ~100 of 768 (94 at the dummy width); the static cap pads to 128.
    N, T = 768, 48
    assert e2e["unpruned-compiled"]["kept"] == N and e2e["unpruned-compiled"]["prefix_len"] == N + T
    kept = e2e["fastprune-dynamic"]["kept"]
    assert 50 <= kept <= 150 and e2e["seed-eager"]["kept"] == kept
    assert e2e["fastprune-dynamic"]["prefix_len"] == kept + T
    assert e2e["fastprune-static-graph"]["kept"] == kept and e2e["fastprune-static-graph"]["prefix_len"] == 128 + T
    assert e2e["fastprune-dynamic"]["kv_mib"] < e2e["unpruned-compiled"]["kv_mib"]

    (case,) = data["summary"]["cases"]
    assert case["case"] == "implicit" and not data["summary"]["targets_applicable"]
    summ = {p["provider"]: p for p in case["providers"]}
    assert set(summ) == set(bench.PROVIDERS)
    assert summ["unpruned-compiled"]["speedup_vs_unpruned"] == 1.0
    for name in ("fastprune-dynamic", "fastprune-static-graph"):
        p = summ[name]
        assert 0 < p["prune_share"] and p["speedup_vs_unpruned"] > 0 and p["phase_sum_ms"] > 0
        assert p["target_speedup"].startswith("n/a") and p["target_prune_share"].startswith("n/a")


def test_bench_pi05_from_checkpoint(tmp_path):
    """--from-checkpoint: the benchmarked model is the one Pi05.from_openpi loads back."""
    ckpt = tmp_path / "model.safetensors"
    grad = torch.is_grad_enabled()
    try:
        rc = bench.main(["--quick", "--cases", "budget64", "--providers", "fastprune-dynamic", "--steps", "1",
                         "--device", "cpu", "--from-checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    finally:
        torch.set_grad_enabled(grad)
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["checkpoint"]["bytes"] == ckpt.stat().st_size > 0
    assert meta["checkpoint"]["load_s"] >= 0

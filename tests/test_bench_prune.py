"""CPU smoke tests of the op and training benchmarks and the shared harness (the GPU run is
bench/gpu_check)."""

import json
import pathlib
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_prune  # noqa: E402
import harness  # noqa: E402


def test_bench_prune_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTPRUNE_CUDA_CLUSTER", "0")  # recorded (the CPU provider ignores it)
    monkeypatch.setenv("FASTPRUNE_COMMIT", "abc")  # the commit, not a setting
    assert bench_prune.main(["--quick", "--providers", "eager-ref,fastprune-cpu,fastprune-gpu9",
                             "--out", str(tmp_path)]) == 0
    assert "not available here, left out: ['fastprune-gpu9']" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    settings = result["environment"]["settings"]
    assert settings["FASTPRUNE_CUDA_CLUSTER"] == "0" and "FASTPRUNE_COMMIT" not in settings
    assert "· FASTPRUNE_CUDA_CLUSTER=0" in (tmp_path / "results.md").read_text().splitlines()[2]
    rows = result["rows"]
    assert {r["provider"] for r in rows} == {"eager-ref", "fastprune-cpu"}
    assert not [r for r in rows if "error" in r]
    assert all(r["median_us"] > 0 and r["peak_extra_mib"] is not None for r in rows)
    assert result["environment"]["torch"] == torch.__version__
    ratios = result["summary"]
    assert {r["mode"] for r in ratios} == {"implicit", "budget", "padded", "select"}
    assert all(r["provider"] == "fastprune-cpu" and r["baseline"] == "eager-ref" for r in ratios)
    assert "## Ratios" in (tmp_path / "results.md").read_text()


def test_peak_memory_sees_a_buffer():
    def fn():
        return torch.ones(1024, 1024)

    fn()  # warmed first, as measure() does: a first call also counts torch's one-off allocations
    mib = harness.peak_extra_mib(fn, torch.device("cpu"))
    if mib is None:
        pytest.skip("no /proc/self/clear_refs: the resident-set high-water mark cannot be reset here")
    assert 3.5 <= mib <= 8, mib


def test_kernel_labels():
    label = harness.kernel_label
    assert label("void fastprune_cuda::(anonymous namespace)::scores_kernel<__nv_bfloat16, true>("
                 "fastprune_cuda::(anonymous namespace)::Args)") == "scores_kernel"
    assert label("_select_kernel") == "_select_kernel"
    assert label("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, "
                 "std::array<char*, 1ul> >(int, at::native::FillFunctor<int>, std::array<char*, 1ul>)") == \
        "vectorized_elementwise_kernel"
    # a "(" inside the template arguments (backward passes launch these): bench_train hung here
    assert label("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
                 "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() "
                 "const::{lambda()#7}::operator()() const::{lambda(float)#1}>(at::TensorIteratorBase&, "
                 "{lambda(float)#1} const&)::{lambda(int)#1}>(int, {lambda(int)#1})") == "elementwise_kernel"
    assert label("Memcpy DtoH (Device -> Pinned)") == "DtoH"


def test_markdown_lists_device_time_per_kernel():
    h = harness.Harness("prune", "cpu", quick=True)
    h.rows.append({"bench": "prune", "provider": "fastprune-cuda", "shape": "B1", "mode": "padded", "median_us": 60.0,
                   "kernels_us": {"scores_kernel": 11.5, "select_kernel": 14.25, "gather_kernel": 3.0}, "launches": 3.0})
    md = h.markdown()
    assert "## Device time per kernel" in md
    assert "| B1 | padded | fastprune-cuda | scores_kernel 11.5, select_kernel 14.2, gather_kernel 3.0 | 28.8 | 3 |" in md
    assert "launches" not in md.split("## Device time per kernel")[0]  # not a column of the main table


def test_host_times_interleave_and_burst(monkeypatch):
    """host_times: every function once per round in a shuffled order; with ``burst`` a sample is
    the mean over that many calls back to back, from one synced start."""
    calls, syncs = [], []
    monkeypatch.setattr(harness, "_sync", lambda device: syncs.append(len(calls)))
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 1e-6))
    fns = {name: (lambda name=name: (calls.append(name), next(clock))) for name in "abc"}
    ts = harness.host_times(fns, torch.device("cpu"), reps=3, burst=4)
    assert syncs == list(range(0, 37, 4))  # one before every burst (and one after), none inside
    assert all(calls[i:i + 4] == calls[i:i + 1] * 4 for i in range(0, 36, 4))  # a burst is one function
    assert all(sorted(calls[i:i + 12:4]) == list("abc") for i in range(0, 36, 12))  # each once a round
    assert {name: len(t) for name, t in ts.items()} == {"a": 3, "b": 3, "c": 3}
    # 4 calls, each advancing the clock by one tick of 1 µs, between the two clock reads: (4 + 1) / 4 µs
    assert all(t == [1.25] * 3 for t in ts.values())


def test_host_breakdown_quick(tmp_path):
    import host_prune

    assert host_prune.main(["--quick", "--reps", "5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["api", "op", "empty"] and all(r["host_us"] > 0 for r in rows)
    assert all(r["loop_us"] > 0 for r in rows)
    assert "fastprune.prune_padded" in (tmp_path / "profile_cpu.txt").read_text()


def test_bench_train_quick(tmp_path, monkeypatch):
    """bench/bench_train.py on the CPU: both providers at both quick shapes, ours first (a GPU run
    cut short by its time limit keeps our numbers: results are saved after each shape), and the
    ratios against the eager reference."""
    import bench_train

    saved = []  # the providers measured at each save
    real_save = harness.Harness.save

    def save(self, out, *args, **kwargs):
        saved.append([r["provider"] for r in self.rows])
        return real_save(self, out, *args, **kwargs)

    monkeypatch.setattr(harness.Harness, "save", save)
    assert bench_train.main(["--quick", "--cpu-reps", "2", "--no-memory", "--out", str(tmp_path)]) == 0
    assert saved[0] == ["fastprune", "eager-ref"] and len(saved) == 3  # after each shape, then with the ratios
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [(r["shape"], r["provider"]) for r in rows] == [
        (shape, p) for shape in ("B2xN96xT24(8)xD128", "B4xN192xT48(12)xD256") for p in ("fastprune", "eager-ref")]
    assert all(r["median_us"] > 0 for r in rows)
    assert {r["provider"] for r in result["summary"]} == {"fastprune"}

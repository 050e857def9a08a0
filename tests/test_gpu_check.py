"""bench/gpu_check on the CPU (GPU_CHECK_DRY_RUN=1): the script only does its real work on a
GPU machine, where every minute is scarce, so its step logic, logs, summary, archive and step
selection are checked here. The dry run executes env, import, errors and the CPU path of the
sanitizer workload for real and only logs the GPU steps."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU_STEPS = ["build", "bench", "bench_one_cluster", "bench_pdl", "bench_ksplit", "bench_nocluster", "bench_auto", "probe_b1",
             "triton_repro", "host", "host_nocluster", "tune", "ncu_src", "ncu_one_cluster", "gpu_tests", "memcheck", "racecheck",
             "sanitize_nocluster", "sanitize_one_cluster", "bench_train", "bench_pi05"]


def run_gpu_check(out, archive, **env):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", GPU_CHECK_ARCHIVE=str(archive), **env)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_dry_run_all_steps(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "gpu_check.tgz"
    summary = run_gpu_check(out, archive)
    steps = {s["step"]: s for s in summary["steps"]}
    for name in ["env", "import", "errors", "sanitize_cpu", *GPU_STEPS]:
        assert steps[name]["status"] == "ok", (name, (out / f"{name}.log").read_text()[-2000:])
    assert "sanitize_prune OK" in (out / "sanitize_cpu.log").read_text()
    assert "passed" in (out / "errors.log").read_text()
    assert "(dry run: not executed)" in (out / "gpu_tests.log").read_text()
    assert "pytest tests -m gpu" in (out / "gpu_tests.log").read_text()
    with tarfile.open(archive) as tar:  # everything done so far, in one file
        names = set(tar.getnames())
    assert {f"out/{name}.log" for name in steps} <= names
    assert "out/summary.md" in names and "out/targets.md" in names
    # nothing timed in a dry run: every target reads "not measured"
    assert (out / "targets.md").read_text().count("not measured") == 11


def test_step_selection(tmp_path):
    summary = run_gpu_check(tmp_path / "out", tmp_path / "a.tgz", GPU_CHECK_STEPS="import")
    assert [s["step"] for s in summary["steps"]] == ["env", "import"]


def test_budget_skips_late_steps(tmp_path):
    summary = run_gpu_check(tmp_path / "out", tmp_path / "a.tgz", GPU_CHECK_BUDGET_S="20")
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    assert statuses["env"] == "ok"
    assert statuses["bench_pi05"] == "skipped"


def test_torch_check_probe(tmp_path):
    """The probe gpu_check runs when a bad-input check crashes: on a sound build both of its
    failing checks raise, and it says so."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "torch_check_probe"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mode 1: raised: probe: literal message" in proc.stdout
    assert "mode 2: raised: probe: formatted message, mode=2, shape [2, 3]" in proc.stdout
    assert "mode 3: raised: probe: std::string message, mode=3" in proc.stdout
    assert "mode 4: raised: probe: snprintf message, mode=4, dim 2" in proc.stdout

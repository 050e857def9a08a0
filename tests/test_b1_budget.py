"""bench/b1_budget.py: lead 1's budget from a b1_probe.json, on made-up probe numbers."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import b1_budget  # noqa: E402


def probe(**over):
    """A b1_probe.json with round numbers (every row includes a 2 µs cluster launch)."""
    p = {"gpu": "NVIDIA H200", "sms": 132, "launch_us": 1.5, "launch_cluster16_us": 2.0,
         "max_active_clusters": {"8": 16, "16": 7},
         "stream_us": {"load_cluster16": 4.0, "load_cluster16_task": 6.0, "load_grid128_4MB": 3.0,
                       "bulk_cluster16": 3.5, "bulk_cluster16_task": 5.0, "bulk_grid128_4MB": 2.5},
         "allgather_us": 3.0, "cluster_sync_us": 0.1,
         "mma_us": {"s_share": 3.0, "select_share": 3.2, "s_share_padded": 4.0, "select_share_padded": 4.4},
         "chain_ns": {"l2": 600.0, "dsmem": 200.0, "atomic_gpu": 900.0}}
    p.update(over)
    return p


def test_pieces_and_totals():
    b = b1_budget.budget(probe())
    pieces = b["pieces"]
    assert pieces["streaming, prompt multicast (patches only)"] == pytest.approx(1.5)  # bulk 3.5 - 2
    assert pieces["streaming, every CTA reads the prompt"] == pytest.approx(3.0)  # bulk 5.0 - 2
    assert pieces["5 cluster barriers"] == pytest.approx(0.5)
    # best: 2 + max(1.5, S 1.0) + gather 1.0 + select 1.2 + 0.5; worst: 2 + 3 + 2 + 1 + 2.4 + 0.5
    assert b["best_us"] == pytest.approx(6.2)
    # a way of streaming that failed leaves the other
    failed_bulk = dict(probe()["stream_us"], bulk_cluster16=-1.0)
    assert b1_budget.budget(probe(stream_us=failed_bulk))["pieces"][
        "streaming, prompt multicast (patches only)"] == pytest.approx(2.0)  # load 4.0 - 2
    assert b["worst_us"] == pytest.approx(10.9)
    assert "only with the streaming overlapped" in b["verdict"]


@pytest.mark.parametrize("over, verdict", [
    (dict(allgather_us=6.0), "cannot meet 8 µs even at best"),
    (dict(stream_us={"load_cluster16": 2.5, "load_cluster16_task": 2.5, "bulk_cluster16": 2.5,
                     "bulk_cluster16_task": 2.5}, mma_us={"s_share": 2.2, "select_share": 2.2,
                                                          "s_share_padded": 2.5, "select_share_padded": 2.5}),
     "meets 8 µs even with every piece in series"),
    (dict(max_active_clusters={"8": 16, "16": 0}), "no 16-CTA cluster fits"),
    (dict(allgather_us=-1.0), "not measured"),
    (dict(stream_us={"load_cluster16": -1.0, "load_cluster16_task": -1.0, "bulk_cluster16": -1.0,
                     "bulk_cluster16_task": -1.0}), "not measured"),
])
def test_verdicts(over, verdict):
    assert verdict in b1_budget.budget(probe(**over))["verdict"]


@pytest.mark.parametrize("current, against", [
    (11.0, "even the worst case beats"), (8.0, "only the best case beats"), (6.0, "even the best case does not")])
def test_against_the_three_kernels(current, against):
    assert b1_budget.budget(probe(), current)["against_current"].startswith(against)
    assert b1_budget.budget(probe())["against_current"] is None


def test_markdown_from_the_command_line(tmp_path, capsys):
    src = tmp_path / "b1_probe.json"
    src.write_text(json.dumps(probe(chain_ns={"l2": 612.4, "dsmem": -1.0, "atomic_gpu": 880.0})))
    assert b1_budget.main([str(src), "--out", str(tmp_path / "b1_budget.md")]) == 0
    text = (tmp_path / "b1_budget.md").read_text()
    assert text == capsys.readouterr().out
    assert "| **best case** (streaming and S overlapped, prompt multicast) | **6.20** |" in text
    assert "l2 612, dsmem failed, atomic_gpu 880" in text


def test_reads_the_three_kernels_from_the_run(tmp_path):
    """gpu_check writes b1_probe.json into the run folder, beside the op benchmark's rows."""
    run14 = ROOT / "bench" / "results" / "h200-2026-11-28" / "run14"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text((run14 / "bench" / "results.json").read_text())
    (tmp_path / "b1_probe.json").write_text(json.dumps(probe()))
    assert b1_budget.main([str(tmp_path / "b1_probe.json"), "--out", str(tmp_path / "b1_budget.md")]) == 0
    text = (tmp_path / "b1_budget.md").read_text()
    assert "Against the same run's CUDA C++ kernels at B=1: even the worst case beats the three kernels' 19.8 µs" in text

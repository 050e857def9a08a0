"""bench/ncu_stalls.py: the stall-sample summary gpu_check writes beside each ncu source export."""

import gzip
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import ncu_stalls  # noqa: E402

RUN8 = ROOT / "bench" / "results" / "h200-2026-11-27" / "run8" / "ncu_src_sass.csv.gz"
REASONS = ["stall_barrier", "stall_long_sb", "stall_wait"]


def export(kernels):
    """An ncu source-page CSV: per kernel a name line, its own header, one line per instruction
    (source, samples, executed, samples by reason in REASONS' order)."""
    lines = []
    for name, extra, rows in kernels:
        lines.append(f'"Kernel Name","{name}",')
        header = ["Address", "Source", ncu_stalls.SAMPLES, *extra, ncu_stalls.EXECUTED, *REASONS]
        lines.append(",".join(f'"{h}"' for h in header))
        for n, (src, samples, executed, by_reason) in enumerate(rows):
            cells = [hex(n), src, str(samples), *["0"] * len(extra), str(executed), *map(str, by_reason)]
            lines.append(",".join(f'"{c}"' for c in cells))
    return "\n".join(lines) + "\n"


def test_phases_split_at_executed_barriers_and_atomics(tmp_path):
    rows = [("LDG.E.128 R4, [R2]", 6, 8, (0, 6, 0)),
            ("BAR.SYNC.DEFER_BLOCKING 0x0", 2, 8, (2, 0, 0)),
            ("HMMA.1684.F32.TF32 R20, R10, R33, R20", 4, 8, (0, 0, 4)),
            ("ATOMG.E.ADD.S32.STRONG.GPU PT, R2, [R2], R5", 1, 1, (1, 0, 0)),
            ("BAR.SYNC.DEFER_BLOCKING 0x0", 0, 0, (0, 0, 0)),  # never executed: no phase ends here
            ("EXIT", 7, 8, (0, 0, 7))]
    # A second kernel whose header has a column more: its reasons are read by its own header.
    other = [("LDS R7, [R5]", 3, 4, (3, 0, 0))]
    path = tmp_path / "sass.csv"
    path.write_text(export([("select_kernel", [], rows), ("scores_kernel", ["Extra"], other),
                            ("select_kernel", [], rows)]))
    launches = ncu_stalls.read_launches(path)
    assert [l["name"] for l in launches] == ["select_kernel", "scores_kernel", "select_kernel"]
    s = ncu_stalls.summarize(launches[0])
    assert s["samples"] == 20
    assert [(p["first"], p["last"], p["samples"]) for p in s["phases"]] == [(0, 1, 8), (2, 3, 5), (4, 5, 7)]
    assert s["reasons"] == {"barrier": 3, "long_sb": 6, "wait": 11}
    assert ncu_stalls.summarize(launches[1])["reasons"]["barrier"] == 3
    out = tmp_path / "stalls.md"
    assert ncu_stalls.main([str(path), "--out", str(out), "--top", "2"]) == 0
    text = out.read_text()
    assert "2 launch(es) profiled; the first: 20 samples over 6 SASS instructions." in text
    assert "| 0-1 | `BAR.SYNC.DEFER_BLOCKING 0x0` | 40.0% | long_sb 75%, barrier 25% |" in text
    assert "| 5 | `EXIT` | 35.0% | wait 100% |" in text
    assert "| 0 | `LDG.E.128 R4, [R2]` | 30.0% | long_sb 100% |" in text


def test_cluster_barrier_waits_end_phases(tmp_path):
    """The one-cluster kernel's phases are cut at its cluster barriers' waits (sm_90 SASS
    UCGABAR_ARV, then UCGABAR_WAIT), not at the arrivals."""
    rows = [("LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]", 5, 8, (0, 5, 0)),
            ("UCGABAR_ARV", 1, 8, (1, 0, 0)),
            ("UCGABAR_WAIT", 3, 8, (3, 0, 0)),
            ("HMMA.16816.F32 R8, R12, R16, R8", 4, 8, (0, 0, 4))]
    path = tmp_path / "sass.csv"
    path.write_text(export([("one_cluster_kernel", [], rows)]))
    s = ncu_stalls.summarize(ncu_stalls.read_launches(path)[0])
    assert [(p["first"], p["last"], p["samples"]) for p in s["phases"]] == [(0, 2, 9), (3, 3, 4)]


def test_an_export_without_samples_is_named(tmp_path):
    path = tmp_path / "details.csv"
    path.write_text('"Kernel Name","k",\n"Address","Source"\n"0x0","EXIT"\n')
    with pytest.raises(ValueError, match="Warp Stall Sampling"):
        ncu_stalls.read_launches(path)


def test_run8_export(tmp_path):
    """Run 8's export (H200, pi05 B=1): the CUDA select kernel waits most on its tile loads, its
    tensor-core product and its row merge, a third of the samples before its first barrier."""
    csv = tmp_path / "sass.csv"
    csv.write_bytes(gzip.decompress(RUN8.read_bytes()))
    launches = ncu_stalls.read_launches(csv)
    names = [l["name"] for l in launches]
    assert len(names) == 16 and names.count("_select_kernel") == 4  # 4 calls, 2 kernels, 2 backends
    select = next(l for l in launches if l["name"].startswith("fastprune_cuda::<unnamed>::select_kernel"))
    s = ncu_stalls.summarize(select)
    assert s["samples"] == 887
    first = s["phases"][0]
    assert (first["first"], first["last"]) == (0, 408) and first["reasons"].most_common(1)[0][0] == "long_sb"
    assert 0.3 < first["samples"] / s["samples"] < 0.4

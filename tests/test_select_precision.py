"""bench/select_precision.py (PERF_LOG v59): the select kernels' split tensor-core products
against SPEC's float64 margin, at small shapes on the CPU."""

import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import select_precision as SP  # noqa: E402


def test_fp16_halves_hold_the_margin_where_tf32_operands_miss_it():
    """Patches within 1e-4 of one vector: f16x3 (both backends' product since v59) and tf32x3
    choose within the margin on every row, one product of tf32-rounded operands on none."""
    inputs = SP.near_common(1e-4, 2, 40, 12, 48)
    assert [SP.rows_off(*inputs, how=h) for h in SP.PRODUCTS] == [0, 0, 0, 80]


def test_products_round_as_the_tensor_cores_read_them():
    # tf32 keeps 10 mantissa bits: 2^-11 above 1 is half a unit, 3 * 2^-12 three quarters.
    x = torch.tensor([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-12, 1.0 / 3.0, -2.5e-6, 40000.0])
    assert SP._tf32_rna(x)[:2].tolist() == [1.0 + 2.0**-10] * 2  # a tie rounds away from zero
    assert SP._tf32_trunc(x)[:2].tolist() == [1.0, 1.0]
    hi, lo = SP._halves(x)
    assert torch.equal(hi, x.half().float()) and torch.all((hi + lo - x).abs() <= x.abs() * 2.0**-21 + 3e-8)
    A = torch.rand(1, 3, 5)
    S = torch.randn(1, 4, 5)
    want = A.double() @ S.transpose(1, 2).double()
    for how in ("tf32x3", "f16x3"):
        assert torch.allclose(SP.product(A, S, how).double(), want, rtol=0, atol=1e-5), how


def test_quick_table():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "select_precision.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| case | rows | exact | tf32x3 | f16x3 | tf32 |" and len(lines) == 5
    assert lines[-1].endswith("| 80 | 0 | 0 | 0 | 80 |"), lines[-1]

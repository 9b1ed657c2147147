"""The scan benchmark's floors and table: the arithmetic floor at a measured peak, and its ratios."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import benchmark_scan  # noqa: E402


def test_arithmetic_floor_is_the_flops_at_the_peak():
    # 50 flops per b d l n element at the fixed 182 GFLOP/s of earlier tables: 0.27 ns per element
    elements = 2 * 64 * 1600 * benchmark_scan.N_STATE
    floor = benchmark_scan.arithmetic_floor_ms(2, 64, 1600, benchmark_scan.REFERENCE_GFLOPS)
    assert floor * 1e6 / elements == pytest.approx(0.2747, abs=1e-4)
    # half the peak, twice the floor
    assert benchmark_scan.arithmetic_floor_ms(2, 64, 1600, 91.0) == pytest.approx(2 * floor)


def test_rounds_time_every_function_in_turn_and_the_peak_is_the_fastest_matmul(monkeypatch):
    monkeypatch.setattr(benchmark_scan, "PEAK_SIZE", 64)
    calls = []
    times = benchmark_scan.rotated_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                                       "matmul": benchmark_scan.matmul()}, repeats=3)
    assert calls == ["a", "b"] * 4  # a warm-up round, then three
    assert [len(t) for t in times.values()] == [3, 3, 3]
    peak = benchmark_scan.peak_gflops(times["matmul"])
    assert math.isfinite(peak) and peak == pytest.approx(2 * 64 ** 3 / (min(times["matmul"]) * 1e6))
    assert benchmark_scan.peak_gflops([2.0, 1.0, 4.0]) == pytest.approx(2 * 64 ** 3 / 1e6)  # 1 ms: the fastest


def test_table_gives_the_ratio_at_this_runs_peak_and_at_the_reference():
    row = {"shape": (2, 64, 1600), "ref": None, "torch_fwd": 20.0, "torch": 60.0, "numba_fwd": 4.0, "numba": 12.0,
           "gflops": 91.0, "eager": 6.0, "torch_peak_mib": 12.0, "numba_peak_mib": 6.0}
    row["arithmetic"] = benchmark_scan.arithmetic_floor_ms(2, 64, 1600, row["gflops"])  # 1.80 ms
    row["arithmetic_ref"] = benchmark_scan.arithmetic_floor_ms(2, 64, 1600, benchmark_scan.REFERENCE_GFLOPS)  # 0.90 ms
    header, _, line = benchmark_scan.table([row]).splitlines()
    assert "| peak GFLOP/s | arithmetic floor ms | numba x arithmetic | numba x arithmetic at 182 GFLOP/s |" in header
    assert line == ("| (2, 64, 1600) | — | 20.0 | 60.0 | 4.0 | 12.0 | 5.0x | 91 | 1.80 | 6.7x | 13.3x | 6.0 | 2.0x "
                    "| 10.0x | 12 / 6 |")

"""The step benchmark times LKM-UNet once per memory option and reports each step against the one without."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import benchmark_step  # noqa: E402


def test_each_memory_option_builds_its_network():
    for option, expected in (("none", (False, False)), ("checkpointing", (True, False)), ("both", (True, True))):
        net = benchmark_step.build("demo", True, option)
        pim = net.encoder.lkm_stages[0].pim
        assert (pim.checkpointing, pim.mixer.autocast) == expected, option


def test_step_table_reports_the_cost_against_no_options():
    row = {"case": "demo", "backend": "numba", "params_m": 17.5, "min_s": 1.0, "max_s": 4.0, "steps": 3, "first_s": 5.0}
    results = [{**row, "net": "backbone", "backend": "—", "median_s": 1.0},
               {**row, "net": "LKM-UNet", "option": "none", "median_s": 2.0},
               {**row, "net": "LKM-UNet", "option": "checkpointing", "median_s": 2.5}]
    lines = benchmark_step.step_table(results).splitlines()
    assert lines[0].endswith("| x backbone | x none |")
    assert lines[2].endswith("| 1.00x | — |") and "| backbone | — | — | 17.5 |" in lines[2]
    assert lines[3].endswith("| 2.00x | 1.00x |") and "| none |" in lines[3]
    assert lines[4].endswith("| 2.50x | 1.25x |") and "| checkpointing |" in lines[4]
    assert "memory option" not in benchmark_step.step_table(results[:1])

"""The step benchmark times LKM-UNet once per memory option and reports each step against its backbone
(the same network without PiM and PaM), nnU-Net's ResidualEncoderUNet and the step without options."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import benchmark_step  # noqa: E402


def test_each_memory_option_builds_its_network():
    for option, expected in (("none", (False, False)), ("checkpointing", (True, False)), ("both", (True, True))):
        net = benchmark_step.build("demo", "LKM-UNet", option)
        pim = net.encoder.lkm_stages[0].pim
        assert (pim.checkpointing, pim.mixer.autocast) == expected, option


def test_the_backbone_is_lkm_unet_without_pim_and_pam():
    """Same encoder and residual decoder: the parameters differ by exactly PiM's and PaM's."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    lkm, backbone = benchmark_step.build("demo", "LKM-UNet"), benchmark_step.build("demo", "backbone")
    resenc = benchmark_step.build("demo", "ResidualEncoderUNet")
    assert count(backbone) == count(lkm) - count(lkm.encoder.lkm_stages) == 9_697_264
    assert count(backbone.encoder) - count(backbone.encoder.lkm_stages) == count(resenc.encoder)
    assert count(resenc.decoder) < count(backbone.decoder)  # nnU-Net's plain decoder is the lighter one
    with pytest.raises(ValueError, match="net='resenc'; valid: ResidualEncoderUNet, backbone, LKM-UNet"):
        benchmark_step.build("demo", "resenc")


def test_step_table_reports_the_cost_against_the_backbone_resenc_and_no_options():
    row = {"case": "demo", "backend": "numba", "params_m": 17.5, "min_s": 1.0, "max_s": 4.0, "steps": 3, "first_s": 5.0}
    results = [{**row, "net": "ResidualEncoderUNet", "backend": "—", "median_s": 0.5},
               {**row, "net": "backbone", "backend": "—", "median_s": 1.0},
               {**row, "net": "LKM-UNet", "option": "none", "median_s": 2.0},
               {**row, "net": "LKM-UNet", "option": "checkpointing", "median_s": 2.5}]
    lines = benchmark_step.step_table(results).splitlines()
    assert lines[0].endswith("| x backbone | x ResEnc | x none |")
    assert lines[2].endswith("| 0.50x | 1.00x | — |") and "| ResidualEncoderUNet | — | — | 17.5 |" in lines[2]
    assert lines[3].endswith("| 1.00x | 2.00x | — |") and "| backbone | — | — | 17.5 |" in lines[3]
    assert lines[4].endswith("| 2.00x | 4.00x | 1.00x |") and "| none |" in lines[4]
    assert lines[5].endswith("| 2.50x | 5.00x | 1.25x |") and "| checkpointing |" in lines[5]
    without = benchmark_step.step_table(results[1:2])
    assert "memory option" not in without and "x ResEnc" not in without


def test_conv_table_times_torch_against_numba(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(benchmark_step, "CONV_SHAPES", ((2, 8, 40),))
    lines = benchmark_step.conv_table(repeats=1).splitlines()
    assert lines[0] == "| (b, d, l) | torch conv1d + SiLU fwd+bwd ms | numba fwd+bwd ms | speed-up |"
    assert len(lines) == 3 and lines[2].startswith("| (2, 8, 40) |") and lines[2].endswith("x |")


def test_breakdown_categories_name_the_ops_of_a_mixer():
    """A profiled Mamba forward and backward: the scan, the conv and the projections land in their rows."""
    pytest.importorskip("numba")
    import torch

    import lkm_unet

    model = lkm_unet.Mamba(16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(torch.randn(2, 40, 16)).sum().backward()
    totals = benchmark_step._categorised_ms(prof)
    assert list(totals) == [name for name, _ in benchmark_step.CATEGORIES]
    for name in ("selective scan", "Mamba causal conv1d + SiLU (numba op)", "Mamba projections (bmm, mm)"):
        assert totals[name] > 0, name
    assert totals["convolutions (oneDNN, forward and backward)"] == 0


def test_inference_networks_have_one_output_at_the_patch_size():
    """What nnU-Net predicts with: deep supervision off, one (1, classes, *patch) map per net."""
    import torch

    for net in benchmark_step.NETS:
        model = benchmark_step.build("demo", net, deep_supervision=False).eval()
        with torch.inference_mode():
            out = model(torch.zeros(1, 1, 96, 96))
        assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 96, 96), net
    pytest.importorskip("numba")
    rows = benchmark_step.time_inference("demo", repeats=1)
    assert [(r["net"], r["backend"]) for r in rows] == list(benchmark_step.INFERENCE_RUNS)
    assert all(r["min_s"] == r["median_s"] == r["max_s"] > 0 and r["steps"] == 1 and r["first_s"] > 0 for r in rows)


def test_inference_table_reports_ms_against_the_backbone_and_resenc():
    row = {"case": "demo", "min_s": 0.1, "max_s": 0.4, "steps": 5, "first_s": 0.5}
    results = [{**row, "net": "ResidualEncoderUNet", "backend": "—", "median_s": 0.05},
               {**row, "net": "backbone", "backend": "—", "median_s": 0.1},
               {**row, "net": "LKM-UNet", "backend": "numba", "median_s": 0.18}]
    lines = benchmark_step.inference_table(results).splitlines()
    assert lines[0].startswith("| network | net | scan backend | patch | forward ms (median) |")
    assert lines[2] == "| demo | ResidualEncoderUNet | — | 96 x 96 | 50 | 100-400 | 5 | 500 | 0.50x | 1.00x |"
    assert lines[4] == "| demo | LKM-UNet | numba | 96 x 96 | 180 | 100-400 | 5 | 500 | 1.80x | 3.60x |"

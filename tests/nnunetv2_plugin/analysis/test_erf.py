"""ERF maps: PiM and PaM widen the effective receptive field of the same backbone."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "nets"))
from test_lkm_unet import small_net  # noqa: E402

from nnunetv2_plugin.analysis.erf import erf_area, erf_map, random_inputs, write_erf_figure  # noqa: E402


def _pair():
    torch.manual_seed(0)
    lkm = small_net(2, "window", ds=False, input_channels=1)
    torch.manual_seed(0)
    conv = small_net(2, "window", ds=False, input_channels=1, use_pim=False, use_pam=False)
    return lkm, conv


def test_erf_without_pim_and_pam_is_smaller(tmp_path):
    lkm, conv = _pair()
    inputs = random_inputs((1, 1, 48, 48), 3)
    maps = {"LKM-UNet": erf_map(lkm, inputs), "no Mamba": erf_map(conv, inputs)}
    assert maps["LKM-UNet"].shape == (48, 48) and maps["LKM-UNet"].max() == 1.0
    areas = {name: erf_area(m) for name, m in maps.items()}
    # measured (seed 0, untrained, nnU-Net's init): PiM/PaM more than double the area above 0.01
    assert areas["LKM-UNet"] == pytest.approx(0.0595, abs=0.004)
    assert areas["no Mamba"] == pytest.approx(0.0269, abs=0.004)
    assert areas["no Mamba"] * 2 < areas["LKM-UNet"]
    write_erf_figure(maps, tmp_path / "erf.png")
    assert (tmp_path / "erf.png").stat().st_size > 10_000


def test_erf_of_an_encoder_stage_and_in_3d():
    lkm, conv = _pair()
    stage0 = erf_map(conv, random_inputs((1, 1, 32, 32), 1), stage=0)
    assert erf_area(stage0) < erf_area(erf_map(lkm, random_inputs((1, 1, 32, 32), 1), stage=0))
    with pytest.raises(ValueError, match=r"stage 5 does not exist; the encoder has stages 0..2"):
        erf_map(conv, random_inputs((1, 1, 32, 32), 1), stage=5)
    torch.manual_seed(0)
    net3d = small_net(3, "window", ds=False, input_channels=1)
    erf3d = erf_map(net3d, random_inputs((1, 1, 8, 16, 16), 1))
    assert erf3d.shape == (8, 16, 16) and np.isclose(erf3d.max(), 1.0)

"""The memory benchmark compares LKM-UNet with the same backbone: both must build from a preset."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import benchmark_memory  # noqa: E402
from lkm_unet import LKMUNet  # noqa: E402


def test_backbone_encoder_is_the_preset_encoder_without_pim_and_pam():
    """ResidualEncoderUNet (the issue's reference) shares LKM-UNet's encoder; its decoder is the plain-conv
    one, where LKM-UNet's is residual."""
    backbone = benchmark_memory.build({"config": "2d", "network": "backbone", "preset": "paper"})
    no_mamba = LKMUNet.from_preset("paper", "abdomen_mr_2d", input_channels=1, num_classes=14,
                                   deep_supervision=True, use_pim=False, use_pam=False)
    assert sum(p.numel() for p in backbone.encoder.parameters()) == \
        sum(p.numel() for p in no_mamba.encoder.parameters())

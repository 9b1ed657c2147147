"""LKM-UNet: Large Kernel Vision Mamba UNet (Wang et al., MICCAI 2024), importable without nnU-Net.

``import lkm_unet`` never needs mamba-ssm, triton or a GPU; the selective scan uses mamba-ssm's
CUDA kernel when it is installed and the tensors are on CUDA, else its Triton kernels, else its own
PyTorch scan (``lkm_unet.available_backends()`` says which work here).
"""
from lkm_unet.modules.bimamba import BiMamba
from lkm_unet.modules.mamba import Mamba
from lkm_unet.modules.patch_ssm import PatchSSM
from lkm_unet.modules.pixel_ssm import PixelSSM
from lkm_unet.nets.lkm_unet import LKMUNet
from lkm_unet.ops import available_backends, scan_backend, selective_scan, selective_scan_ref
from lkm_unet.presets import derive_kernel_sizes, load_config, stage_feature_sizes

__version__ = "0.1.0"

__all__ = [
    "BiMamba", "LKMUNet", "Mamba", "PatchSSM", "PixelSSM", "available_backends", "derive_kernel_sizes",
    "load_config", "scan_backend", "selective_scan", "selective_scan_ref", "stage_feature_sizes",
]

"""Selective-scan operators (mamba-ssm's ``selective_scan_fn`` semantics)."""
from lkm_unet.ops.selective_scan import available_backends, scan_backend, selective_scan
from lkm_unet.ops.selective_scan_ref import selective_scan_ref

__all__ = ["available_backends", "scan_backend", "selective_scan", "selective_scan_ref"]

"""LKM-UNet architectures in nnU-Net plans: derive them, write them, validate edited ones.

A configuration's ``architecture`` becomes::

    {"network_class_name": "lkm_unet.nets.lkm_unet.LKMUNet",
     "arch_kwargs": {...the planned backbone..., "pim_kernel_sizes": [[...], ...], "pam_pool_sizes": [...],
                     "pim_grouping": "window", "shape_policy": "error", "d_state": 16, "d_conv": 4, "expand": 2},
     "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

Presets (docs/presets.md): ``auto`` derives window and pool sizes for the planned patch and strides
with the paper's rule (:func:`lkm_unet.derive_kernel_sizes`); ``paper`` and ``official`` take the
stored tables of the paper's set-up of the same dimensionality verbatim (3D: abdomen CT, 2D: abdomen
MR) and fail if they do not fit the plan. Each preset also fixes the block counts
(:func:`preset_blocks`), so a preset names one network for a given plan.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from lkm_unet import LKMUNet, derive_kernel_sizes, load_config
from lkm_unet.nets.lkm_unet import DEFAULT_MEMORY_OPTIONS
from lkm_unet.presets import PRESETS
from nnunetv2_plugin.patch_sizes import patch_stride_errors


LKM_NETWORK_CLASS = "lkm_unet.nets.lkm_unet.LKMUNet"
PLANS_PRESETS = ("auto", *PRESETS)
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
STORED_CONFIG_OF_DIM = {3: "abdomen_ct_3d", 2: "abdomen_mr_2d"}
BLOCK_KEYS = ("n_blocks_per_stage", "n_conv_per_stage_decoder")
LKM_KEYS = ("pim_kernel_sizes", "pam_pool_sizes", "pim_grouping", "shape_policy", "d_state", "d_conv", "expand",
            "use_pim", "use_pam", "bidirectional", *DEFAULT_MEMORY_OPTIONS)
# The ablation switches (lkm_unet.ablations), written explicitly so that a user can flip them in the JSON.
ABLATION_DEFAULTS = {"use_pim": True, "use_pam": True, "bidirectional": True}
# Backbone kwargs shared by nnU-Net's U-Nets and LKMUNet; everything else of the source plan is dropped.
BACKBONE_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage_decoder",
                 "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
                 "nonlin_kwargs", "n_blocks_per_stage", "stem_channels")


class PlansError(ValueError):
    """An LKM-UNet plans entry that cannot work; the message names file, configuration, key and stage.

    ``messages`` holds every problem found (one per stage, block and axis); ``str()`` joins them by lines.
    """

    def __init__(self, *messages: str) -> None:
        super().__init__("\n".join(messages))
        self.messages = list(messages)


def is_lkm_architecture(configuration: ConfigurationManager) -> bool:
    return configuration.network_arch_class_name.split(".")[-1] == "LKMUNet"


def lkm_architecture(configuration: ConfigurationManager, preset: str = "auto",
                     shape_policy: str = "error") -> dict[str, Any]:
    """An LKM-UNet ``architecture`` entry for a planned configuration (nnU-Net's or an LKM one).

    The backbone (stages, features, strides, conv kernels, norms) is the planned one; the preset fixes
    the block counts (:func:`preset_blocks`) and the LKM sizes.
    """
    if preset not in PLANS_PRESETS:
        raise PlansError(f"preset {preset!r} is not known; valid: {', '.join(PLANS_PRESETS)}")
    source = configuration.network_arch_init_kwargs
    kwargs = {k: copy.deepcopy(source[k]) for k in BACKBONE_KEYS if k in source}
    patch = list(configuration.patch_size)
    if preset == "auto":
        lkm = derive_kernel_sizes(patch, kwargs["strides"], "paper")
    else:
        name = STORED_CONFIG_OF_DIM[len(patch)]
        stored = load_config(name)
        lkm = {k: copy.deepcopy(v) for k, v in stored["presets"][preset].items() if k not in BLOCK_KEYS}
        if len(lkm["pim_kernel_sizes"]) != kwargs["n_stages"]:
            raise PlansError(f"preset {preset!r} holds the {len(lkm['pim_kernel_sizes'])}-stage tables of the "
                             f"paper's {name} set-up, but this plan has {kwargs['n_stages']} stages; "
                             f"use preset 'auto' to derive sizes for this plan")
    kwargs.update(preset_blocks(preset, source, len(patch)))
    kwargs.update(lkm)
    kwargs.update({"shape_policy": shape_policy, "d_state": 16, "d_conv": 4, "expand": 2, **ABLATION_DEFAULTS,
                   **DEFAULT_MEMORY_OPTIONS})
    return {"network_class_name": LKM_NETWORK_CLASS, "arch_kwargs": kwargs,
            "_kw_requires_import": list(REQUIRES_IMPORT)}


def preset_blocks(preset: str, source: dict[str, Any], ndim: int) -> dict[str, list[int]]:
    """Encoder residual blocks and decoder blocks per stage that ``preset`` builds on a plan.

    - ``official``: as the released code, one residual block per planned conv: ``n_conv_per_stage``
      (``n_blocks_per_stage`` in a residual-encoder plan) and ``n_conv_per_stage_decoder``.
    - ``paper``: the stored counts of the paper's set-up of the plan's dimensionality.
    - ``auto``: the planned number of encoder convolutions, as residual blocks of two convs
      (``max(1, n // 2)``; a residual-encoder plan's blocks as planned), decoder as planned.
    """
    decoder = [int(n) for n in source["n_conv_per_stage_decoder"]]
    if preset == "paper":
        stored = load_config(STORED_CONFIG_OF_DIM[ndim])["presets"]["paper"]
        if len(stored["n_blocks_per_stage"]) != source["n_stages"]:
            raise PlansError(f"preset 'paper' holds the block counts of the paper's "
                             f"{len(stored['n_blocks_per_stage'])}-stage set-up, but this plan has "
                             f"{source['n_stages']} stages; use preset 'auto' to derive sizes for this plan")
        return {k: list(stored[k]) for k in BLOCK_KEYS}
    if "n_blocks_per_stage" in source:
        encoder = [int(n) for n in source["n_blocks_per_stage"]]
    elif preset == "official":
        encoder = [int(n) for n in source["n_conv_per_stage"]]
    else:
        encoder = [max(1, int(n) // 2) for n in source["n_conv_per_stage"]]
    return {"n_blocks_per_stage": encoder, "n_conv_per_stage_decoder": decoder}


def validate_architecture(architecture: dict[str, Any], patch_size: list[int], where: str) -> list[dict]:
    """Build the network on the meta device and check it against ``patch_size``.

    Returns the per-stage table (:meth:`LKMUNet.validate_input_size`); raises :class:`PlansError` with
    every problem found, each prefixed with ``where`` (file and configuration): each patch axis the
    strides do not divide or, if there is none, each stage, block and axis whose size does not divide its
    feature map.
    """
    kwargs = architecture.get("arch_kwargs", {})
    for key in ("pim_kernel_sizes", "pam_pool_sizes"):
        if key not in kwargs:
            raise PlansError(f"{where}: arch_kwargs has no {key!r} (per stage, one size per axis); "
                             f"`lkm-unet plans` writes it")
    missing_imports = [k for k in REQUIRES_IMPORT if k in kwargs and k not in architecture.get("_kw_requires_import", [])]
    if missing_imports:
        raise PlansError(f"{where}: _kw_requires_import must list {missing_imports} (they are class names)")
    try:
        with torch.device("meta"):
            network = LKMUNet(input_channels=1, num_classes=2, **kwargs)
    except (TypeError, ValueError) as error:
        raise PlansError(f"{where}: {error}") from None
    # A patch the strides do not divide has no well-defined stage maps: report it alone, windows after.
    errors = patch_stride_errors(patch_size, kwargs["strides"]) or network.input_size_errors(patch_size)
    if errors:
        raise PlansError(*(f"{where}: {error}" for error in errors))
    return network.validate_input_size(patch_size)


def resolve_architecture(configuration: ConfigurationManager, where: str, preset: str = "auto",
                         overrides: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], str, list[dict]]:
    """The architecture to build for a configuration, where it came from ('plans' or 'derived ...'),
    and its validated per-stage table. ``overrides`` (an ablation trainer's kwargs) replace arch_kwargs."""
    if is_lkm_architecture(configuration):
        architecture = {"network_class_name": configuration.network_arch_class_name,
                        "arch_kwargs": configuration.network_arch_init_kwargs,
                        "_kw_requires_import": list(configuration.network_arch_init_kwargs_req_import)}
        origin = "plans"
    else:
        architecture = lkm_architecture(configuration, preset)
        origin = f"derived ({preset}) from {configuration.network_arch_class_name.split('.')[-1]}"
    if overrides:
        architecture = {**architecture, "arch_kwargs": {**architecture["arch_kwargs"], **overrides}}
        origin += f" with {', '.join(f'{k}={v}' for k, v in overrides.items())}"
    rows = validate_architecture(architecture, list(configuration.patch_size), where)
    return architecture, origin, rows


def stage_table(rows: list[dict], grouping: Optional[str] = None) -> str:
    """The per-stage table printed by the commands and logged by the trainer."""
    lines = [f"{'stage':>5}  {'feature map':<16} {'PiM kernel':<14} {'PaM pool':<14} padding"]
    for r in rows:
        pads = "none" if not any(r["pim_padding"] + r["pam_padding"]) else \
            f"PiM {r['pim_padding']} PaM {r['pam_padding']}"
        pim, pam = (str(r[k]) if r[k] is not None else "off" for k in ("pim_kernel_size", "pam_pool_size"))
        lines.append(f"{r['stage']:>5}  {str(r['feature_size']):<16} {pim:<14} {pam:<14} {pads}")
    if grouping:
        lines.append(f"PiM grouping: {grouping}")
    return "\n".join(lines)

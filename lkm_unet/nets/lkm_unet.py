"""LKM-UNet (Wang et al., MICCAI 2024): a residual U-Net whose encoder stages end in PiM + PaM."""
from __future__ import annotations

import pydoc
from typing import Any, Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import Tensor, nn

from lkm_unet.modules.partition import GROUPINGS
from lkm_unet.modules.patch_ssm import PatchSSM
from lkm_unet.modules.spatial_ssm import valid_checkpointing
from lkm_unet.modules.pixel_ssm import PixelSSM
from lkm_unet.modules.shape_policy import check_policy, divisibility_errors, padding_for, per_axis
from lkm_unet.nets.lkm_encoder import LKMDecoder, LKMEncoder, LKMStage
from lkm_unet.presets import load_config, preset_kwargs, stage_feature_sizes

ClassOrName = Union[Type[nn.Module], str, None]

#: What PiM/PaM store for backward (README "Memory"; measured in docs/benchmarks.md).
DEFAULT_MEMORY_OPTIONS = {"ssm_checkpointing": "auto", "ssm_autocast": False, "ssm_checkpoint_elements": 2 ** 24}


def _resolve(value: ClassOrName, name: str) -> Optional[Type[nn.Module]]:
    """Classes may come as dotted names, as they are stored in nnU-Net plans."""
    if value is None or not isinstance(value, str):
        return value
    resolved = pydoc.locate(value)
    if resolved is None:
        raise ValueError(f"{name}={value!r} does not name an importable class")
    return resolved


def _per_stage(value: Any, n_stages: int, name: str) -> list:
    values = [value] * n_stages if isinstance(value, int) else list(value)
    if len(values) != n_stages:
        raise ValueError(f"{name} has {len(values)} entries but n_stages={n_stages}: {name}={values}")
    return values


class LKMUNet(nn.Module):
    """LKM-UNet for 2D or 3D; the dimension follows from ``conv_op``.

    Constructor kwargs are those of dynamic-network-architectures' ``ResidualEncoderUNet`` plus:

    - ``pim_kernel_sizes``: per stage, the PiM window (``window``) or stride (``strided``) per axis.
    - ``pam_pool_sizes``: per stage, the PaM average-pool size per axis.
    - ``pim_grouping``: ``"window"`` (the paper) or ``"strided"`` (the released code), SPEC 4.
    - ``shape_policy``: ``"pad"`` or ``"error"`` when a size does not divide a feature map.
    - ``d_state``, ``d_conv``, ``expand``: the Mamba mixers' sizes.
    - ``use_pim``, ``use_pam``, ``bidirectional``: the paper's ablations (Sec. 3, Table 3). False drops
      PiM, PaM, or the backward scan of every BiMamba; with ``use_pim=use_pam=False`` ("no Mamba") the
      network is the residual backbone alone, with ``ResidualEncoderUNet``'s parameters. Window or
      pool sizes of a block that is off are neither needed nor checked.
    - Memory options (README "Memory"; none changes the function the network computes):
      ``ssm_checkpointing`` stores only each PiM/PaM block's input and recomputes its BiMamba in
      backward, ``ssm_checkpoint_elements`` input elements at a time (``"auto"``, the default: on
      accelerators, not on the CPU; memory estimates assume it on); ``ssm_autocast`` lets the
      projections, conv and gate run and be stored in the autocast dtype (the scan, A, D and the dt
      bias stay fp32).

    All kwargs are JSON-safe (classes may be dotted names), so the same dict lives in nnU-Net plans.
    Input ``(B, input_channels, *patch)``; output ``(B, num_classes, *patch)``, or with deep supervision
    a list of such maps, full resolution first, then one per ``cumprod(strides)[:-1]`` scale.
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Union[int, Sequence[int]],
        conv_op: ClassOrName,
        kernel_sizes: Union[int, Sequence],
        strides: Union[int, Sequence],
        n_blocks_per_stage: Union[int, Sequence[int]],
        num_classes: int,
        n_conv_per_stage_decoder: Union[int, Sequence[int]],
        conv_bias: bool = False,
        norm_op: ClassOrName = None,
        norm_op_kwargs: Optional[dict] = None,
        dropout_op: ClassOrName = None,
        dropout_op_kwargs: Optional[dict] = None,
        nonlin: ClassOrName = None,
        nonlin_kwargs: Optional[dict] = None,
        deep_supervision: bool = False,
        pim_kernel_sizes: Sequence = (),
        pam_pool_sizes: Sequence = (),
        pim_grouping: str = "window",
        shape_policy: str = "pad",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        stem_channels: Optional[int] = None,
        use_pim: bool = True,
        use_pam: bool = True,
        bidirectional: bool = True,
        ssm_checkpointing: bool | str = DEFAULT_MEMORY_OPTIONS["ssm_checkpointing"],
        ssm_autocast: bool = DEFAULT_MEMORY_OPTIONS["ssm_autocast"],
        ssm_checkpoint_elements: int = DEFAULT_MEMORY_OPTIONS["ssm_checkpoint_elements"],
    ) -> None:
        super().__init__()
        conv_op = _resolve(conv_op, "conv_op")
        ndim = convert_conv_op_to_dim(conv_op)
        features = _per_stage(features_per_stage, n_stages, "features_per_stage")
        strides = [per_axis(s, ndim, f"strides[{i}]")
                   for i, s in enumerate(_per_stage(strides, n_stages, "strides"))]
        kernels = self._stage_sizes(pim_kernel_sizes, n_stages, ndim, "pim_kernel_sizes") if use_pim else None
        pools = self._stage_sizes(pam_pool_sizes, n_stages, ndim, "pam_pool_sizes") if use_pam else None
        if pim_grouping not in GROUPINGS:
            raise ValueError(f"pim_grouping={pim_grouping!r} is not valid; valid: {', '.join(map(repr, GROUPINGS))}")
        check_policy(shape_policy)
        self.pim_kernel_sizes, self.pam_pool_sizes = kernels, pools
        self.pim_grouping, self.shape_policy = pim_grouping, shape_policy
        self.use_pim, self.use_pam, self.bidirectional = use_pim, use_pam, bidirectional

        if not valid_checkpointing(ssm_checkpointing):
            raise ValueError(f"ssm_checkpointing={ssm_checkpointing!r}; give true, false or \"auto\"")
        if not isinstance(ssm_autocast, bool):
            raise ValueError(f"ssm_autocast={ssm_autocast!r}; give true or false")
        ssm = {"d_state": d_state, "d_conv": d_conv, "expand": expand, "shape_policy": shape_policy,
               "bidirectional": bidirectional, "checkpointing": ssm_checkpointing,
               "checkpoint_elements": ssm_checkpoint_elements, "autocast": ssm_autocast}
        lkm_stages = []
        total_stride = (1,) * ndim
        for s in range(n_stages):
            total_stride = tuple(t * k for t, k in zip(total_stride, strides[s]))
            place = {"spatial_dims": ndim, "input_stride": total_stride}
            lkm_stages.append(LKMStage(
                PixelSSM(features[s], kernels[s], grouping=pim_grouping, where=f"stage {s} PiM (pim_kernel_sizes[{s}])", **place, **ssm)
                if use_pim else None,
                PatchSSM(features[s], pools[s], where=f"stage {s} PaM (pam_pool_sizes[{s}])", **place, **ssm)
                if use_pam else None,
            ))
        self.encoder = LKMEncoder(
            lkm_stages, input_channels=input_channels, n_stages=n_stages, features_per_stage=features,
            conv_op=conv_op, kernel_sizes=kernel_sizes, strides=strides, n_blocks_per_stage=n_blocks_per_stage,
            conv_bias=conv_bias, norm_op=_resolve(norm_op, "norm_op"), norm_op_kwargs=norm_op_kwargs,
            dropout_op=_resolve(dropout_op, "dropout_op"), dropout_op_kwargs=dropout_op_kwargs,
            nonlin=_resolve(nonlin, "nonlin"), nonlin_kwargs=nonlin_kwargs, stem_channels=stem_channels,
        )
        self.decoder = LKMDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        # False runs the whole network in fp32 even inside an autocast region (the "no AMP" trainers).
        self.allow_autocast = True

    @staticmethod
    def _stage_sizes(value: Sequence, n_stages: int, ndim: int, name: str) -> list[tuple[int, ...]]:
        stages = list(value)
        if len(stages) != n_stages:
            raise ValueError(f"{name} has {len(stages)} entries but n_stages={n_stages}: {name}={stages}")
        return [per_axis(v, ndim, f"{name}[{s}] (stage {s})") for s, v in enumerate(stages)]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if not self.allow_autocast:
            with torch.autocast(x.device.type, enabled=False):
                return self.decoder(self.encoder(x.float()))
        return self.decoder(self.encoder(x))

    def validate_input_size(self, patch_size: Sequence[int]) -> list[dict[str, Any]]:
        """Check every stage's window and pool against the feature maps of ``patch_size``.

        Returns one row per stage (feature size, window, pool, padding each needs). Under
        ``shape_policy="error"`` a size that does not divide raises a ValueError with the first message
        of :meth:`input_size_errors` (which lists them all).
        """
        errors = self.input_size_errors(patch_size)
        if errors:
            raise ValueError(errors[0])
        rows = []
        for s, (size, lkm) in enumerate(zip(stage_feature_sizes(patch_size, self.encoder.strides),
                                            self.encoder.lkm_stages)):
            row = {"stage": s, "feature_size": size}
            for block, size_key, pad_key in ((lkm.pim, "pim_kernel_size", "pim_padding"),
                                             (lkm.pam, "pam_pool_size", "pam_padding")):
                if block is None:  # an ablated block: no size, nothing to pad
                    row[size_key], row[pad_key] = None, []
                    continue
                sizes = block.per_axis_size()
                row[size_key] = list(sizes)
                row[pad_key] = list(padding_for(size, sizes, "pad", block.where, block.size_name.replace("_", " ")))
            rows.append(row)
        return rows

    def input_size_errors(self, patch_size: Sequence[int]) -> list[str]:
        """Every stage, block (PiM, PaM) and axis whose size does not divide the feature map of
        ``patch_size``, one message each with the sizes that would; empty under ``shape_policy="pad"``."""
        if self.shape_policy != "error":
            return []
        last = self.encoder.lkm_stages[-1]
        if last.pim is None and last.pam is None:  # no Mamba (an ablation): nothing to divide
            return []
        total = (last.pim or last.pam).input_stride  # the patch must be a multiple of it
        errors = []
        for size, lkm in zip(stage_feature_sizes(patch_size, self.encoder.strides), self.encoder.lkm_stages):
            for block in (lkm.pim, lkm.pam):
                if block is not None:
                    errors += divisibility_errors(size, block.per_axis_size(), block.where,
                                                  block.size_name.replace("_", " "), block.input_stride, total)
        return errors

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Activation count nnU-Net's planners use to size batches (conv maps plus PiM/PaM)."""
        if len(input_size) != convert_conv_op_to_dim(self.encoder.conv_op):
            raise ValueError(f"input_size={list(input_size)}: give the spatial size only, without batch/channels")
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's initialisation for the conv parts; the Mamba mixers keep mamba-ssm's own."""
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)

    @classmethod
    def from_preset(cls, preset: str, config: str, initialize: bool = True, **overrides: Any) -> "LKMUNet":
        """Build a stored variant: ``preset`` in ('paper', 'official'), ``config`` in
        ('abdomen_ct_3d', 'abdomen_mr_2d'). ``overrides`` (input_channels and num_classes are required
        unless given here) replace any constructor kwarg.

        The preset fixes the block counts as well as the LKM sizes, so this is the network that
        ``lkm-unet plans --preset <preset>`` writes for the same plan, and with ``initialize`` (the
        default) it is initialised as nnU-Net's trainer does (``network.apply(network.initialize)``):
        under the same seed both give the same weights.
        """
        kwargs = {**load_config(config)["architecture"], **preset_kwargs(preset, config)}
        kwargs.update(overrides)
        missing = [k for k in ("input_channels", "num_classes") if k not in kwargs]
        if missing:
            raise TypeError(f"from_preset needs {', '.join(missing)} (e.g. input_channels=1, num_classes=14)")
        network = cls(**kwargs)
        if initialize:
            network.apply(network.initialize)
        return network

"""Effective receptive fields (Luo et al., NeurIPS 2016), as in LKM-UNet's Fig. 3.

The ERF of a network at its centre is ``|d y_c / d x|``: the gradient, with respect to the input, of
the sum over channels of the centre location of an output ``y`` (the final logits, or an encoder
stage's output), summed over input channels and averaged over several inputs (random normal ones, or
real preprocessed cases). Maps are normalised to a maximum of 1; the *area* of an ERF is the fraction
of input pixels (voxels in 3D) whose normalised gradient exceeds a threshold (default 0.01). 3D maps
are drawn at their central slice along the first axis; their area counts the whole volume.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger("lkm_unet")

DEFAULT_THRESHOLD = 0.01


def _stage_module(network: nn.Module, stage: int) -> nn.Module:
    """The module whose output is encoder stage ``stage``'s skip (after PiM/PaM in LKM-UNet)."""
    encoder = getattr(network, "encoder", None)
    stages = getattr(encoder, "lkm_stages", None) or getattr(encoder, "stages", None)
    if stages is None:
        raise ValueError(f"{type(network).__name__} has no encoder.stages; use the final output (stage None)")
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage {stage} does not exist; the encoder has stages 0..{len(stages) - 1}")
    return stages[stage]


def erf_map(network: nn.Module, inputs: Iterable[Tensor], stage: Optional[int] = None) -> np.ndarray:
    """The normalised ERF, shape = the inputs' spatial shape, for ``inputs`` of shape (1, C, *patch).

    ``stage`` None takes the network's final output (the first one under deep supervision), else the
    output of encoder stage ``stage``. The network runs in eval mode; its parameters get no gradient.
    """
    captured: list[Tensor] = []
    hook = None if stage is None else _stage_module(network, stage).register_forward_hook(
        lambda module, args, output: captured.append(output))
    was_training = network.training
    network.eval()
    total, count = None, 0
    try:
        for x in inputs:
            x = x.detach().clone().requires_grad_(True)
            captured.clear()
            out = network(x)
            out = captured[0] if stage is not None else (out[0] if isinstance(out, (list, tuple)) else out)
            centre = tuple(size // 2 for size in out.shape[2:])
            grad, = torch.autograd.grad(out[(slice(None), slice(None), *centre)].sum(), x)
            contribution = grad.abs().sum(dim=(0, 1)).double()
            total = contribution if total is None else total + contribution
            count += 1
    finally:
        network.train(was_training)
        if hook is not None:
            hook.remove()
    if count == 0:
        raise ValueError("no inputs were given")
    erf = (total / count).numpy()
    peak = erf.max()
    return erf / peak if peak > 0 else erf


def erf_area(erf: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of pixels (voxels) whose normalised ERF exceeds ``threshold``."""
    return float((erf > threshold).mean())


def random_inputs(input_shape: Sequence[int], count: int, seed: int = 0) -> list[Tensor]:
    """``count`` standard-normal inputs of ``input_shape`` (z-scored images look like this)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*input_shape, generator=generator) for _ in range(count)]


def preprocessed_inputs(folder: Path, input_shape: Sequence[int], count: int) -> list[Tensor]:
    """Centre patches of the first ``count`` cases of an nnU-Net preprocessed folder
    (``$nnUNet_preprocessed/<dataset>/<data_identifier>``). 2D configurations take each volume's
    central slice; a case smaller than the patch is zero-padded."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist; run nnUNetv2_preprocess for this configuration first")
    dataset = infer_dataset_class(str(folder))(str(folder))
    keys = sorted(dataset.identifiers)[:count]
    if not keys:
        raise ValueError(f"{folder} holds no preprocessed cases")
    patch = tuple(input_shape[2:])
    patches = []
    for key in keys:
        data = np.asarray(dataset.load_case(key)[0])           # (C, *spatial), 3D for every configuration
        if data.ndim - 1 > len(patch):
            data = data[:, data.shape[1] // 2]
        out = np.zeros((data.shape[0], *patch), dtype=np.float32)
        src, dst = [slice(None)], [slice(None)]
        for size, want in zip(data.shape[1:], patch):
            start_src, start_dst = max(0, (size - want) // 2), max(0, (want - size) // 2)
            length = min(size, want)
            src.append(slice(start_src, start_src + length))
            dst.append(slice(start_dst, start_dst + length))
        out[tuple(dst)] = data[tuple(src)]
        patches.append(torch.from_numpy(out)[None])
    return patches


def write_erf_figure(maps: dict[str, np.ndarray], path: Path, threshold: float = DEFAULT_THRESHOLD) -> None:
    """One panel per network, side by side; 3D maps at their central slice along the first axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4.4), squeeze=False)
    for axis, (name, erf) in zip(axes[0], maps.items()):
        shown = erf[erf.shape[0] // 2] if erf.ndim == 3 else erf
        # square root: the tails of an ERF decay fast; this keeps them visible
        axis.imshow(np.sqrt(shown), cmap="inferno", vmin=0, vmax=1)
        axis.set_title(f"{name}\narea > {threshold:g}: {erf_area(erf, threshold):.1%}", fontsize=10)
        axis.set_xticks([]), axis.set_yticks([])
    figure.suptitle("effective receptive field (sqrt of normalised |gradient|)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _load_weights(network: nn.Module, checkpoint: Path) -> None:
    """Load nnU-Net's ``checkpoint_*.pth`` ``network_weights`` strictly (a compiled run's prefix removed)."""
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} does not exist")
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint} does not fit the network built from the plans: {error}") from None


def plans_erfs(plans: str, configuration: str, output: Path, plans_identifier: Optional[str] = None,
               checkpoint: Optional[Path] = None, baseline_checkpoint: Optional[Path] = None,
               stage: Optional[int] = None, num_inputs: int = 8, real_cases: bool = False, seed: int = 0,
               threshold: float = DEFAULT_THRESHOLD, force: bool = False) -> dict[str, float]:
    """ERFs of LKM-UNet and of its no-Mamba ablation built from one plan, side by side in ``output``.

    Each network is untrained (nnU-Net's initialisation, seed ``seed``) unless its checkpoint is given
    (``checkpoint`` for LKM-UNet, ``baseline_checkpoint`` for an ``LKMUNetTrainer_noMamba`` run).
    Inputs: ``num_inputs`` random normal patches, or with ``real_cases`` the centre patches of the
    first ``num_inputs`` preprocessed cases. Returns each network's ERF area above ``threshold``.
    """
    from lkm_unet.ablations import ablation_kwargs
    from nnunetv2_plugin.analysis.networks import build_network, load_plans
    from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer

    if output.exists() and not force:
        raise ValueError(f"{output} already exists; pass --force to overwrite it")
    plans_dict, dataset_json, path = load_plans(plans, plans_identifier)
    networks = {}
    for name, overrides, weights in (("LKM-UNet", None, checkpoint),
                                     ("no Mamba", ablation_kwargs("no-mamba"), baseline_checkpoint)):
        torch.manual_seed(seed)
        network, shape = build_network(plans_dict, dataset_json, configuration, LKMUNetTrainer, overrides)
        if weights is not None:
            _load_weights(network, Path(weights))
        networks[f"{name} ({'trained' if weights else 'untrained'})"] = network
    if real_cases:
        identifier = plans_dict["configurations"][configuration].get("data_identifier") or \
            f"{plans_dict.get('plans_name', 'nnUNetPlans')}_{configuration}"
        inputs = preprocessed_inputs(path.parent / identifier, shape, num_inputs)
    else:
        inputs = random_inputs(shape, num_inputs, seed)
    maps = {name: erf_map(network, inputs, stage) for name, network in networks.items()}
    write_erf_figure(maps, output, threshold)
    return {name: erf_area(erf, threshold) for name, erf in maps.items()}

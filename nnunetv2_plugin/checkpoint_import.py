"""Import a checkpoint trained with the released LKM-UNet code into this package's layout.

The released code keeps PiM and PaM in two lists beside the encoder stages
(``encoder.mamba_layers.{s}`` and ``encoder.w_mamba_layers.{s}``, with ``norm``, ``mamba_forw``,
``mamba_backw`` and ``out_proj`` inside); this package keeps both in ``encoder.lkm_stages.{s}`` as
``pim`` and ``pam``, each a :class:`lkm_unet.BiMamba` named ``mixer``. The decoder holds the encoder,
so the same renames apply under ``decoder.encoder.``. Every other key (stem, residual stages,
decoder) is nnU-Net's and keeps its name.

The imported model is an nnU-Net results folder (``plans.json``, ``dataset.json``,
``fold_<f>/checkpoint_final.pth``) whose plans use the ``official`` preset, so the stock
``nnUNetv2_predict -tr LKMUNetTrainer -p <plans>`` predicts with it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Union

import torch

from nnunetv2_plugin import DEFAULT_LKM_PLANS

PathLike = Union[str, os.PathLike]
STAGE_LISTS = {"mamba_layers": "pim", "w_mamba_layers": "pam"}
MIXER_PARTS = {"norm": "mixer.norm", "mamba_forw": "mixer.forward_mixer", "mamba_backw": "mixer.backward_mixer",
               "out_proj": "mixer.out_proj"}
_STAGE_LISTS_BACK = {v: k for k, v in STAGE_LISTS.items()}
_MIXER_PARTS_BACK = {v: k for k, v in MIXER_PARTS.items()}
_RELEASED = re.compile(r"^((?:decoder\.)?encoder\.)(mamba_layers|w_mamba_layers)\.(\d+)\.(norm|mamba_forw|mamba_backw|out_proj)\.(.+)$")
_PACKAGE = re.compile(r"^((?:decoder\.)?encoder\.)lkm_stages\.(\d+)\.(pim|pam)\.(mixer\.(?:norm|forward_mixer|backward_mixer|out_proj))\.(.+)$")
MAX_LISTED = 12


class CheckpointImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and what does not match."""


def released_to_package_key(key: str) -> str:
    """``encoder.mamba_layers.3.mamba_forw.A_log`` -> ``encoder.lkm_stages.3.pim.mixer.forward_mixer.A_log``."""
    match = _RELEASED.match(key)
    if match is None:
        return key
    prefix, stage_list, stage, part, rest = match.groups()
    return f"{prefix}lkm_stages.{stage}.{STAGE_LISTS[stage_list]}.{MIXER_PARTS[part]}.{rest}"


def package_to_released_key(key: str) -> str:
    """The inverse of :func:`released_to_package_key` (used to write checkpoints in the released layout)."""
    match = _PACKAGE.match(key)
    if match is None:
        return key
    prefix, stage, block, part, rest = match.groups()
    return f"{prefix}{_STAGE_LISTS_BACK[block]}.{stage}.{_MIXER_PARTS_BACK[part]}.{rest}"


def key_diff(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Lines naming the keys missing from ``weights``, the unexpected ones and the shape mismatches."""
    def listed(keys: list[str]) -> str:
        more = f", ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
        return ", ".join(keys[:MAX_LISTED]) + more

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the network"
              for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    lines = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            lines.append(f"  {name} ({len(keys)}): {listed(keys)}")
    return lines


def load_released_checkpoint(source: PathLike) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file (``source`` or ``source/checkpoint_final.pth``) and its content."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoint_final.pth"
    if not path.is_file():
        raise CheckpointImportError(f"{path} does not exist; give a checkpoint_final.pth or the fold folder holding it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointImportError(f"cannot read checkpoint {path}: {reason}") from None
    missing = [k for k in ("network_weights", "init_args") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointImportError(f"{path} is not an nnU-Net checkpoint: it has no {' or '.join(map(repr, missing))}")
    return path, checkpoint


def official_plans(plans: dict[str, Any], configuration: str, plans_identifier: str) -> dict[str, Any]:
    """``plans`` with ``configuration``'s architecture replaced by the ``official`` preset's LKM-UNet."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_plugin.plans import lkm_architecture, validate_architecture

    plans = copy.deepcopy(plans)
    if configuration not in plans.get("configurations", {}):
        raise CheckpointImportError(f"the checkpoint's plans have no configuration {configuration!r}; "
                                    f"available: {', '.join(plans.get('configurations', {}))}")
    manager = PlansManager(copy.deepcopy(plans))
    configuration_manager = manager.get_configuration(configuration)
    architecture = lkm_architecture(configuration_manager, "official")
    validate_architecture(architecture, list(configuration_manager.patch_size),
                          f"configuration {configuration!r} of the imported plans")
    resolved = copy.deepcopy(configuration_manager.configuration)
    resolved.pop("inherits_from", None)
    resolved["architecture"] = architecture
    plans["configurations"][configuration] = resolved
    plans["plans_name"] = plans_identifier
    return plans


def _expected_network(plans: dict, configuration: str, dataset_json: dict) -> "torch.nn.Module":
    """The network ``nnUNetv2_predict`` will build from the imported plans, on the meta device."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lkm_unet import LKMUNet

    manager = PlansManager(plans)
    configuration_manager = manager.get_configuration(configuration)
    with torch.device("meta"):
        return LKMUNet(input_channels=determine_num_input_channels(manager, configuration_manager, dataset_json),
                       num_classes=manager.get_label_manager(dataset_json).num_segmentation_heads,
                       **configuration_manager.network_arch_init_kwargs)


def _parameter_order(weights: dict[str, torch.Tensor]) -> list[str]:
    """Parameter names in ``named_parameters`` order: a state_dict lists a shared tensor under every
    alias (``decoder.encoder.``, nnU-Net's ``all_modules``); the first alias is the parameter's name."""
    seen, order = set(), []
    for key, value in weights.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity not in seen:
            seen.add(identity)
            order.append(key)
    return order


def _reorder_optimizer_state(state: Optional[dict], weights: dict[str, torch.Tensor],
                             network: "torch.nn.Module") -> Optional[dict]:
    """SGD keeps its momentum per parameter index, and the released layout lists PiM and PaM after
    all stages while this package lists them per stage: each entry follows its parameter."""
    if not state or "state" not in state:
        return state
    released = {key: i for i, key in enumerate(_parameter_order(weights))}
    ours = [name for name, _ in network.named_parameters()]
    if sorted(released) != sorted(ours) or len(state["param_groups"]) != 1 or \
            len(state["param_groups"][0]["params"]) != len(ours):
        warnings.warn("the checkpoint's optimizer state does not list one entry per network parameter; it is "
                      "dropped (prediction is unaffected; continuing the training with --c is not possible)")
        return None
    new = copy.copy(state)
    new["state"] = {j: state["state"][released[k]] for j, k in enumerate(ours) if released[k] in state["state"]}
    return new


def import_checkpoint(source: PathLike, destination: Optional[PathLike] = None, dataset: Optional[str] = None,
                      configuration: Optional[str] = None, fold: Optional[str] = None,
                      trainer: str = "LKMUNetTrainer", plans_identifier: str = DEFAULT_LKM_PLANS,
                      force: bool = False) -> tuple[Path, int]:
    """Write ``source`` (a released-code ``checkpoint_final.pth``) as a model of this package.

    Args:
        destination: the model folder to write; default
            ``$nnUNet_results/<dataset>/<trainer>__<plans_identifier>__<configuration>``.
        dataset: dataset name or id for the default destination (default: the plans' dataset_name).
        configuration, fold: default: those the checkpoint was trained with (its ``init_args``).
        force: replace an existing checkpoint (or different plans.json) in ``destination``.

    Returns the written checkpoint and the number of renamed keys. Raises
    :class:`CheckpointImportError` with a key diff when the weights do not fit the ``official`` network.
    """
    from nnunetv2_plugin.plans import PlansError

    path, checkpoint = load_released_checkpoint(source)
    init_args = dict(checkpoint["init_args"])
    configuration = configuration or init_args.get("configuration")
    fold = fold if fold is not None else init_args.get("fold")
    if configuration is None or fold is None:
        raise CheckpointImportError(f"{path}: init_args names no configuration or fold; pass -c and -f")
    plans, dataset_json = init_args.get("plans"), init_args.get("dataset_json")
    model_folder = path.parent.parent
    if plans is None and (model_folder / "plans.json").is_file():
        plans = json.loads((model_folder / "plans.json").read_text())
    if dataset_json is None and (model_folder / "dataset.json").is_file():
        dataset_json = json.loads((model_folder / "dataset.json").read_text())
    if plans is None or dataset_json is None:
        raise CheckpointImportError(f"{path}: no plans or dataset.json in its init_args nor in {model_folder}")
    try:
        new_plans = official_plans(plans, configuration, plans_identifier)
    except PlansError as error:
        raise CheckpointImportError(f"{path}: {error}") from None

    released = checkpoint["network_weights"]
    released = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in released.items())
    weights = OrderedDict((released_to_package_key(k), v) for k, v in released.items())
    renamed = sum(released_to_package_key(k) != k for k in released)
    network = _expected_network(new_plans, configuration, dataset_json)
    diff = key_diff(weights, network.state_dict())
    if diff:
        raise CheckpointImportError("\n".join([
            f"{path}: its weights ({renamed} keys renamed from the released layout) do not match the LKM-UNet "
            f"that preset 'official' builds from its plans (configuration {configuration!r}):", *diff]))

    if destination is None:
        destination = _default_destination(dataset or new_plans.get("dataset_name"), trainer, plans_identifier,
                                           configuration)
    destination = Path(destination)
    target = destination / f"fold_{fold}" / "checkpoint_final.pth"
    if target.resolve() == path.resolve():
        raise CheckpointImportError(f"{target} is the source checkpoint; choose another destination")
    plans_text = json.dumps(new_plans, indent=4) + "\n"
    if not force:
        if target.exists():
            raise CheckpointImportError(f"{target} already exists; pass --force to overwrite it")
        plans_file = destination / "plans.json"
        if plans_file.exists() and plans_file.read_text() != plans_text:
            raise CheckpointImportError(f"{plans_file} already exists with other plans; pass --force to overwrite it")

    init_args.pop("unpack_dataset", None)
    init_args.update(plans=new_plans, configuration=configuration, fold=fold, dataset_json=dataset_json)
    imported = dict(checkpoint, network_weights=weights, trainer_name=trainer, init_args=init_args,
                    optimizer_state=_reorder_optimizer_state(checkpoint.get("optimizer_state"), weights, network))
    target.parent.mkdir(parents=True, exist_ok=True)
    (destination / "plans.json").write_text(plans_text)
    (destination / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
    torch.save(imported, target)
    return target, renamed


def _default_destination(dataset: Optional[str], trainer: str, plans_identifier: str, configuration: str) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    root = os.environ.get("nnUNet_results")
    if not root:
        raise CheckpointImportError("nnUNet_results is not set; set it or give the destination folder")
    if dataset is None:
        raise CheckpointImportError("the plans name no dataset; pass --dataset")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise CheckpointImportError(str(error)) from None
    return Path(root) / name / f"{trainer}__{plans_identifier}__{configuration}"

"""`lkm-unet profile`, `lkm-unet erf` and `lkm-unet compare`: thin wrappers over nnunetv2_plugin.analysis."""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("lkm_unet")

ABLATION_CHOICES = ("no-pim", "no-pam", "no-bim", "no-mamba")


def _profile(args: argparse.Namespace) -> int:
    from lkm_unet.ablations import ablation_kwargs
    from nnunetv2_plugin.analysis.networks import build_network, find_trainer, load_plans
    from nnunetv2_plugin.analysis.profile import format_profile, profile_network
    from nnunetv2_plugin.plans import PlansError

    try:
        plans, dataset_json, path = load_plans(args.plans, args.plans_identifier)
        trainer = find_trainer(args.trainer) if args.trainer else None
        overrides = ablation_kwargs(args.ablation) if args.ablation else None
        network, shape = build_network(plans, dataset_json, args.configuration, trainer, overrides)
    except (PlansError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = profile_network(network, shape)
    print(format_profile(table, f"{path}, configuration {args.configuration!r}, {type(network).__name__}, "
                                f"one forward pass of input {list(shape)}"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="parameters and FLOPs per part (conv, PiM, PaM) of a planned network")
    p.add_argument("plans", metavar="PLANS_FILE_OR_DATASET",
                   help="a plans JSON file, or a dataset id/name (then -p names the plans)")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-p", "--plans-identifier", default="nnUNetLKMUNetPlans",
                   help="plans identifier when a dataset is given (default nnUNetLKMUNetPlans)")
    p.add_argument("-tr", "--trainer", default=None,
                   help="build with this trainer (nnU-Net's lookup; default LKMUNetTrainer for LKM-UNet plans, "
                        "else nnUNetTrainer)")
    p.add_argument("--ablation", choices=ABLATION_CHOICES, default=None, help="profile an ablation of LKM-UNet")
    p.set_defaults(func=_profile)

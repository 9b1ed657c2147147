"""`lkm-unet plans` and `lkm-unet check-plans`."""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("lkm_unet")


def report_plans_error(error: ValueError) -> int:
    """Print each problem on its own ``error:`` line; the exit status of a refused plans command."""
    for message in getattr(error, "messages", [str(error)]):
        print(f"error: {message}", file=sys.stderr)
    return 2


def _plans(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.plans import PlansError
    from nnunetv2_plugin.plans_files import write_lkm_plans
    try:
        path, tables = write_lkm_plans(args.dataset, args.configurations, args.preset, args.source_plans,
                                       args.target_plans, args.shape_policy, args.force, args.batch_size,
                                       gpu_memory=args.gpu_memory)
    except PlansError as error:
        return report_plans_error(error)
    for name, table in tables.items():
        print(f"configuration {name}:\n{table}\n")
    print(f"wrote {path}\ntrain with: nnUNetv2_train {args.dataset} <configuration> <fold> -tr LKMUNetTrainer "
          f"-p {path.stem}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.plans import PlansError
    from nnunetv2_plugin.plans_files import check_plans
    try:
        tables = check_plans(args.dataset, args.plans, args.configurations)
    except PlansError as error:
        return report_plans_error(error)
    for name, table in tables.items():
        print(f"configuration {name}: OK\n{table}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_plugin import DEFAULT_LKM_PLANS as DEFAULT_TARGET_PLANS

    p = subparsers.add_parser("plans", help="write an LKM-UNet plans file beside nnUNetPlans.json")
    p.add_argument("dataset", help="dataset id or name, e.g. 701 or Dataset701_AbdomenCT")
    p.add_argument("-c", "--configurations", nargs="+", help="configurations to convert (default: all planned)")
    p.add_argument("--preset", default="auto", choices=("auto", "paper", "official"),
                   help="auto: derive sizes for this plan (paper rule); paper/official: the paper's stored tables")
    p.add_argument("--source-plans", default="nnUNetPlans", help="plans identifier to read (default nnUNetPlans)")
    p.add_argument("--target-plans", default=DEFAULT_TARGET_PLANS, help=f"plans identifier to write "
                   f"(default {DEFAULT_TARGET_PLANS})")
    p.add_argument("--shape-policy", default="error", choices=("error", "pad"),
                   help="what the network does when a size does not divide a feature map (default error)")
    p.add_argument("--batch-size", type=int, default=None, help="replace the planned batch size")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="fit batch size and memory options (ssm_checkpointing, ssm_autocast) to this GPU memory, "
                        "e.g. 12, 24 or 40, and print the estimated training peak")
    p.add_argument("--force", action="store_true", help="overwrite an existing target plans file")
    p.set_defaults(func=_plans)

    c = subparsers.add_parser("check-plans", help="validate an (edited) LKM-UNet plans file")
    c.add_argument("dataset", help="dataset id or name")
    c.add_argument("-p", "--plans", default=DEFAULT_TARGET_PLANS, help=f"plans identifier (default {DEFAULT_TARGET_PLANS})")
    c.add_argument("-c", "--configurations", nargs="+", help="configurations to check (default: all LKM ones)")
    c.set_defaults(func=_check)

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
                                       _target_plans(args), args.shape_policy, args.force, args.batch_size,
                                       args.ablation, args.window_divisor, gpu_memory=args.gpu_memory)
    except PlansError as error:
        return report_plans_error(error)
    for name, table in tables.items():
        print(f"configuration {name}:\n{table}\n")
    print(f"wrote {path}\ntrain with: nnUNetv2_train {args.dataset} <configuration> <fold> -tr LKMUNetTrainer "
          f"-p {path.stem}")
    return 0


def _target_plans(args: argparse.Namespace) -> str:
    """The --target-plans given, else the default named after the ablation (nnUNetLKMUNetPlans_noPiM,
    nnUNetLKMUNetPlans_windows2), so that an ablation never replaces the full model's plans."""
    from nnunetv2_plugin import DEFAULT_LKM_PLANS
    from lkm_unet.ablations import ABLATION_SUFFIXES
    if args.target_plans is not None:
        return args.target_plans
    suffixes = [ABLATION_SUFFIXES[args.ablation]] if args.ablation else []
    suffixes += [f"windows{args.window_divisor}"] if args.window_divisor != 1 else []
    return "_".join([DEFAULT_LKM_PLANS, *suffixes])


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
    p.add_argument("--target-plans", default=None, help=f"plans identifier to write (default "
                   f"{DEFAULT_TARGET_PLANS}, with _noPiM, _windows2 ... appended for an ablation)")
    p.add_argument("--shape-policy", default="error", choices=("error", "pad"),
                   help="what the network does when a size does not divide a feature map (default error)")
    p.add_argument("--batch-size", type=int, default=None, help="replace the planned batch size")
    p.add_argument("--ablation", choices=("no-pim", "no-pam", "no-bim", "no-mamba"), default=None,
                   help="the paper's ablations as arch_kwargs switches: no PiM, no PaM, one scan direction, "
                        "or the conv backbone alone")
    p.add_argument("--window-divisor", type=int, default=1, metavar="N",
                   help="divide every PiM window by N per axis (the paper's kernel-size sweep; default 1)")
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

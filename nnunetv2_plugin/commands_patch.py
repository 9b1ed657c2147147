"""`lkm-unet set-patch`: change a configuration's patch size in place and re-derive the LKM sizes."""
from __future__ import annotations

import argparse


def _set_patch(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.commands_plans import report_plans_error
    from nnunetv2_plugin.plans import PlansError
    from nnunetv2_plugin.plans_patch import set_patch_size
    try:
        change = set_patch_size(args.dataset, args.configuration, args.patch_size, args.plans, args.source_plans,
                                args.n_stages)
    except PlansError as error:
        return report_plans_error(error)
    print(f"configuration {args.configuration}: patch size {change.old_patch} -> {change.patch} "
          f"({change.n_stages} stages; window and pool sizes re-derived)\n{change.table}\n")
    print("\n".join(change.memory_lines()) + "\n")
    if change.backup is not None:
        print(f"backup of the previous file: {change.backup}")
    print(f"wrote {change.path} (from {change.source.name})\ncheck with: lkm-unet check-plans {args.dataset} "
          f"-p {change.path.stem}\ntrain with: nnUNetv2_train {args.dataset} {args.configuration} <fold> "
          f"-tr LKMUNetTrainer -p {change.path.stem}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_plugin import DEFAULT_LKM_PLANS

    p = subparsers.add_parser(
        "set-patch", help="set a configuration's patch size and re-derive its window and pool sizes",
        description="Set one configuration's patch size in an LKM-UNet plans file (edited in place, after a "
                    "backup <plans>.json.bak-<time>) and re-derive pim_kernel_sizes and pam_pool_sizes for it. "
                    "Every other entry stays as it is. Without the plans file, it is written from nnUNetPlans.")
    p.add_argument("dataset", help="dataset id or name, e.g. 701 or Dataset701_AbdomenCT")
    p.add_argument("-c", "--configuration", required=True, help="configuration to change, e.g. 3d_fullres")
    p.add_argument("--patch-size", type=int, nargs="+", required=True, metavar="N",
                   help="the new patch, one size per axis (z y x for 3D)")
    p.add_argument("-p", "--plans", default=DEFAULT_LKM_PLANS,
                   help=f"plans identifier to change or write (default {DEFAULT_LKM_PLANS})")
    p.add_argument("--source-plans", default=None,
                   help="plans identifier to start from (default: the plans file itself if it exists, "
                        "else nnUNetPlans)")
    p.add_argument("--n-stages", type=int, default=None,
                   help="keep only the first N stages (when the plan's strides cannot serve the patch)")
    p.set_defaults(func=_set_patch)

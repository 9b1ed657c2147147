"""`lkm-unet import-checkpoint`: a model trained with the released LKM-UNet code, for this package."""
from __future__ import annotations

import argparse
import sys


def _import(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.checkpoint_import import CheckpointImportError, import_checkpoint
    try:
        target, renamed = import_checkpoint(args.source, args.destination, args.dataset, args.configuration,
                                            args.fold, args.trainer, args.plans, args.force)
    except CheckpointImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = target.parent.parent
    print(f"renamed {renamed} keys from the released layout; plans written with preset 'official'\n"
          f"wrote {target}\n"
          f"predict with: nnUNetv2_predict -i IN -o OUT -d {model.parent.name} -c {model.name.split('__')[-1]} "
          f"-f {target.parent.name[len('fold_'):]} -tr {args.trainer} -p {args.plans}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_plugin import DEFAULT_LKM_PLANS

    p = subparsers.add_parser(
        "import-checkpoint", help="convert a checkpoint trained with the released LKM-UNet code",
        description="Rename the released code's PiM/PaM weights to this package's layout and write an nnU-Net "
                    "model folder (plans with preset 'official') that nnUNetv2_predict uses.")
    p.add_argument("source", metavar="SRC", help="the released model's checkpoint_final.pth (or its fold folder)")
    p.add_argument("destination", metavar="DST", nargs="?", default=None,
                   help="model folder to write (default $nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>)")
    p.add_argument("--dataset", default=None, help="dataset name or id for the default DST (default: the plans')")
    p.add_argument("-c", "--configuration", default=None, help="configuration (default: the checkpoint's)")
    p.add_argument("-f", "--fold", default=None, help="fold folder to write (default: the checkpoint's)")
    p.add_argument("-tr", "--trainer", default="LKMUNetTrainer", help="trainer recorded in the checkpoint")
    p.add_argument("-p", "--plans", default=DEFAULT_LKM_PLANS, help=f"plans identifier (default {DEFAULT_LKM_PLANS})")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint or plans in DST")
    p.set_defaults(func=_import)

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


def _erf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnunetv2_plugin.analysis.erf import plans_erfs
    from nnunetv2_plugin.plans import PlansError

    try:
        areas = plans_erfs(args.plans, args.configuration, Path(args.output), args.plans_identifier,
                           args.checkpoint, args.baseline_checkpoint, args.stage, args.num_inputs,
                           args.real_cases, args.seed, args.threshold, args.force)
    except (PlansError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, area in areas.items():
        print(f"{name}: {area:.2%} of the input above {args.threshold:g} of the peak gradient")
    print(f"wrote {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnunetv2_plugin.analysis.budget import BudgetError
    from nnunetv2_plugin.analysis.compare import DEFAULT_RUNS, CompareError, Run, compare
    from nnunetv2_plugin.evaluation import EvaluationError
    from nnunetv2_plugin.plans import PlansError

    try:
        runs = [Run.parse(text) for text in args.run] if args.run else list(DEFAULT_RUNS)
        compare(args.dataset, args.configuration, Path(args.output_dir), runs, args.fold, args.collect_only,
                args.test_images, args.test_labels, args.device, not args.disable_tta, args.force, args.schedule,
                args.batch_size, args.allow_different_budgets)
    except (BudgetError, CompareError, EvaluationError, PlansError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(Path(args.output_dir, "table.md").read_text())
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

    e = subparsers.add_parser("erf", help="effective receptive fields of LKM-UNet and its no-Mamba ablation (PNG)")
    e.add_argument("plans", metavar="PLANS_FILE_OR_DATASET",
                   help="a plans JSON file, or a dataset id/name (then -p names the plans)")
    e.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    e.add_argument("-p", "--plans-identifier", default="nnUNetLKMUNetPlans",
                   help="plans identifier when a dataset is given (default nnUNetLKMUNetPlans)")
    e.add_argument("-o", "--output", default="erf.png", help="PNG to write (default erf.png)")
    e.add_argument("--checkpoint", default=None, help="LKM-UNet weights (checkpoint_final.pth); default untrained")
    e.add_argument("--baseline-checkpoint", default=None,
                   help="weights of an LKMUNetTrainer_noMamba run; default untrained")
    e.add_argument("--stage", type=int, default=None,
                   help="take the centre of this encoder stage's output instead of the final logits")
    e.add_argument("--num-inputs", type=int, default=8, help="inputs to average over (default 8)")
    e.add_argument("--real-cases", action="store_true",
                   help="use centre patches of preprocessed training cases instead of random inputs")
    e.add_argument("--threshold", type=float, default=0.01,
                   help="area = fraction of pixels above this fraction of the peak (default 0.01)")
    e.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the inputs (default 0)")
    e.add_argument("--force", action="store_true", help="overwrite an existing output file")
    e.set_defaults(func=_erf)

    m = subparsers.add_parser("compare", help="train/collect runs on one fold, test DSC/NSD, Wilcoxon, cost table")
    m.add_argument("dataset", help="dataset id or name")
    m.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    m.add_argument("--run", action="append", metavar="TRAINER:PLANS",
                   help="a run to compare (repeat; the first is the reference of the tests). Default: "
                        "LKMUNetTrainer:nnUNetLKMUNetPlans, LKMUNetTrainer_noMamba:nnUNetLKMUNetPlans, "
                        "nnUNetTrainer:nnUNetResEncUNetMPlans")
    m.add_argument("-f", "--fold", default="0", help="the fold every run trains on (default 0; 'all' works)")
    m.add_argument("-o", "--output-dir", default="comparison", help="where the tables go (default ./comparison)")
    m.add_argument("--collect-only", action="store_true", help="train nothing; every run must be finished")
    m.add_argument("--test-images", default=None, help="test images (default: the dataset's imagesTs)")
    m.add_argument("--test-labels", default=None, help="test labels (default: the dataset's labelsTs)")
    m.add_argument("--device", choices=("cuda", "cpu", "mps"), default=None,
                   help="for nnUNetv2_train/predict (default cuda when available, else cpu)")
    m.add_argument("--schedule", default=None, metavar="SUFFIX",
                   help="train every run's trainer T as nnU-Net's variant T_SUFFIX, so that all runs train the same "
                        "epochs x iterations: 1epoch, 5epochs, 10epochs, 50epochs, 100epochs, 250epochs, demo "
                        "(8 x 25, the quickstart's). Default: each trainer as named (nnU-Net's 1000 x 250)")
    m.add_argument("--batch-size", type=int, default=None,
                   help="train every run with this batch size (plans <PLANS>_bs<N>, written beside each run's "
                        "plans); default: each plans' own (ResEnc presets size theirs to a GPU memory budget)")
    m.add_argument("--allow-different-budgets", action="store_true",
                   help="tabulate runs whose epochs or iterations per epoch differ (refused by default)")
    m.add_argument("--disable-tta", action="store_true", help="predict without test-time mirroring")
    m.add_argument("--force", action="store_true", help="replace an existing comparison in the output folder")
    m.set_defaults(func=_compare)

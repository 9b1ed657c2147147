"""`lkm-unet` data commands: convert-flare22, convert-amos22, demo-data, evaluate.

Each command is a thin wrapper over the library function with the same arguments. Heavy imports
(SimpleITK, nnU-Net, MONAI) happen when a command runs, not when the parser is built.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Tuple

logger = logging.getLogger("lkm_unet")


def register(subparsers: Any) -> None:
    """Add the data commands to the `lkm-unet` sub-parsers."""
    for name, dataset in (("convert-flare22", "FLARE22 -> Dataset701_AbdomenCT"),
                          ("convert-amos22", "AMOS22 MR cases -> Dataset702_AbdomenMR")):
        parser = subparsers.add_parser(name, help=dataset, description=dataset)
        parser.add_argument("source", metavar="SRC", help="the unpacked dataset release")
        _add_output_arguments(parser)
        split = parser.add_mutually_exclusive_group()
        split.add_argument("--test-cases", type=int, default=None,
                           help="hold out this many cases in imagesTs/labelsTs")
        split.add_argument("--test-fraction", type=float, default=None,
                           help="hold out this fraction of the cases (rounded)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
        parser.add_argument("--no-verify", dest="verify", action="store_false",
                            help="skip nnU-Net's verify_dataset_integrity")
        parser.add_argument("--num-processes", type=int, default=2,
                            help="processes of the integrity check (default 2)")
        parser.set_defaults(func=_convert_flare22 if name == "convert-flare22" else _convert_amos22)

    demo = subparsers.add_parser("demo-data", help="write the synthetic Dataset990_LKMUNetDemo",
                                 description="Write the synthetic quickstart dataset Dataset990_LKMUNetDemo.")
    _add_output_arguments(demo)
    demo.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    demo.add_argument("--num-train", type=int, default=24, help="training cases (default 24)")
    demo.add_argument("--num-test", type=int, default=6, help="held-out cases (default 6)")
    demo.set_defaults(func=_demo_data)

    evaluate = subparsers.add_parser("evaluate", help="DSC and NSD per case and organ",
                                     description="DSC and NSD of predictions against references.")
    evaluate.add_argument("prediction_dir", metavar="PRED_DIR", help="predicted label maps (NIfTI)")
    evaluate.add_argument("reference_dir", metavar="REF_DIR", help="reference label maps, same file names")
    table = evaluate.add_mutually_exclusive_group()
    table.add_argument("--organs", choices=("flare",), default="flare",
                       help="built-in organ table: the 13 abdominal organs (default)")
    table.add_argument("--dataset-json", default=None,
                       help="take the labels from this dataset.json instead")
    evaluate.add_argument("--default-tolerance", type=float, default=2.0, dest="default_tolerance_mm",
                          help="NSD tolerance in mm for labels without a paper tolerance (default 2)")
    evaluate.add_argument("--output-dir", default=None,
                          help="where per_case.csv and summary.csv go (default PRED_DIR)")
    evaluate.add_argument("--force", action="store_true",
                          help="overwrite per_case.csv and summary.csv already in the output folder")
    evaluate.set_defaults(func=_evaluate)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-root", default=None, help="parent of the dataset folder (default $nnUNet_raw)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset folder")


def _convert_flare22(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.datasets.flare22 import convert_flare22

    return _run(convert_flare22, args.source, args.output_root, args.test_cases, args.test_fraction,
                args.seed, args.force, args.verify, args.num_processes)[0]


def _convert_amos22(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.datasets.amos22 import convert_amos22

    return _run(convert_amos22, args.source, args.output_root, args.test_cases, args.test_fraction,
                args.seed, args.force, args.verify, args.num_processes)[0]


def _demo_data(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.datasets.demo import generate_demo_dataset

    return _run(generate_demo_dataset, args.output_root, args.seed, args.force, args.num_train,
                args.num_test)[0]


def _evaluate(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.evaluation import evaluate_folders, format_summary

    code, result = _run(evaluate_folders, args.prediction_dir, args.reference_dir, args.dataset_json,
                        args.output_dir, args.organs, args.default_tolerance_mm, args.force)
    if code == 0:
        print(format_summary(result[1]))
    return code


def _run(function: Callable[..., Any], *arguments: Any) -> Tuple[int, Any]:
    """(0, result) of ``function(*arguments)``; a user-facing error (bad folder, file or option)
    becomes one log line and (1, None)."""
    from nnunetv2_plugin.datasets.raw_dataset import DatasetError
    from nnunetv2_plugin.evaluation import EvaluationError
    from nnunetv2_plugin.image_files import ImageReadError

    try:
        return 0, function(*arguments)
    except (DatasetError, EvaluationError, ImageReadError) as error:
        logger.error("error: %s", error)
        return 1, None

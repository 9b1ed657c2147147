"""`lkm-unet overlays`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _overlays(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.image_files import ImageReadError
    from nnunetv2_plugin.overlays import write_overlays
    try:
        paths = write_overlays(Path(args.image_dir), Path(args.reference_dir), Path(args.prediction_dir),
                               Path(args.output_dir), args.max_cases)
    except (ImageReadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} overlays to {args.output_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("overlays", help="PNG overlays of reference and prediction on the image")
    p.add_argument("image_dir", help="images, <case>_0000.nii.gz")
    p.add_argument("reference_dir", help="reference labels, <case>.nii.gz")
    p.add_argument("prediction_dir", help="predicted labels, <case>.nii.gz")
    p.add_argument("output_dir", help="where <case>.png goes")
    p.add_argument("--max-cases", type=int, default=None, help="at most this many cases")
    p.set_defaults(func=_overlays)

"""`lkm-unet`: one command, one sub-command per task. Each sub-command module registers itself."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

# Modules exposing ``register(subparsers)``; each sets ``func`` on its parsers. They import torch and
# nnU-Net inside the command functions only, so `lkm-unet trainer-path` answers at once.
COMMAND_MODULES = (
    "nnunetv2_plugin.commands_setup",
    "nnunetv2_plugin.commands_plans",
    "nnunetv2_plugin.commands_patch",
    "nnunetv2_plugin.commands_data",
    "nnunetv2_plugin.commands_report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkm-unet", description="LKM-UNet for nnU-Net v2")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("lkm_unet").addHandler(handler)
    logging.getLogger("lkm_unet").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

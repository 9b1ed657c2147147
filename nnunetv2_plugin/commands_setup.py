"""`lkm-unet trainer-path` and `lkm-unet doctor`."""
from __future__ import annotations

import argparse


def _trainer_path(args: argparse.Namespace) -> int:
    from nnunetv2_plugin.environment import trainer_path
    print(trainer_path())
    return 0


def _doctor(args: argparse.Namespace) -> int:
    import os

    from lkm_unet import available_backends
    from nnunetv2_plugin import environment as env

    print("versions:")
    for name, version in env.versions().items():
        print(f"  {name:<30} {version}")
    print("selective scan backends:")
    for name, state in available_backends().items():
        print(f"  {name:<6} {state}")
    problem = env.torchvision_problem()
    guard = env.guard_path()
    if problem:
        print(f"torchvision: import fails ({problem}); nnU-Net's trainer lookup imports it before "
              f"nnUNet_extTrainer, so custom trainers cannot be found")
        if args.fix:
            print(f"  fixed: wrote {env.install_torchvision_guard()} (an import hook; see README, Troubleshooting)")
        else:
            print("  fix: lkm-unet doctor --fix   (or install the torchvision build that matches your torch)")
    else:
        print("torchvision: ok" + (f" (guard {guard} installed)" if guard.exists() else ""))
    expected = str(env.trainer_path())
    current = os.environ.get("nnUNet_extTrainer", "")
    if expected in current.split(os.pathsep):
        print("nnUNet_extTrainer: ok")
    else:
        print(f'nnUNet_extTrainer: not set to the LKM-UNet trainers; run: export nnUNet_extTrainer="{expected}"')
    finds = env.nnunet_finds()
    print(f"nnU-Net finds LKMUNetTrainer: {finds}")
    return 0 if finds == "ok" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trainer-path", help="print the folder to export as nnUNet_extTrainer")
    p.set_defaults(func=_trainer_path)
    d = subparsers.add_parser("doctor", help="check versions, scan backends and nnU-Net's trainer lookup")
    d.add_argument("--fix", action="store_true", help="repair what can be repaired here (the torchvision import)")
    d.set_defaults(func=_doctor)

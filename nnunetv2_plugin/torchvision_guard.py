"""Keep a torchvision whose compiled ops cannot load from breaking nnU-Net's trainer lookup.

Where the only torchvision wheel for the installed torch is a CUDA build next to a CPU torch, its C
extension fails to load and ``import torchvision`` then raises in ``torchvision._meta_registrations``
(``operator torchvision::nms does not exist``). nnU-Net's trainer lookup imports its ``primus``
trainers (timm -> torchvision) before it looks at ``nnUNet_extTrainer``, so every custom trainer fails.

:func:`install` adds an import hook: when ``torchvision._meta_registrations`` is imported and
torchvision reports that its ops did not load, an empty module stands in for it (those registrations
only describe the ops that are missing). With working ops, the hook does nothing. It is activated by
a ``.pth`` file that `lkm-unet doctor --fix` writes into site-packages only when the problem is found.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

TARGET = "torchvision._meta_registrations"
PTH_NAME = "lkm_unet_torchvision_guard.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('nnunetv2_plugin') and "
            "__import__('nnunetv2_plugin.torchvision_guard').torchvision_guard.install()\n")


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "Left empty: torchvision's compiled ops are not available with this torch build."


class _TorchvisionGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        extension = sys.modules.get("torchvision.extension")
        if extension is None or extension._has_ops():
            return None
        return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader())


def install() -> None:
    if not any(isinstance(finder, _TorchvisionGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionGuard())

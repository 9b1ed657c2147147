"""A tiny real nnU-Net dataset (3D NIfTI through SimpleITK), planned and preprocessed once per session."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunetv2_plugin.environment import trainer_path

DATASET_ID = 991
DATASET = "Dataset991_LKMTiny"
BIN = Path(sys.executable).parent

# Test-only trainers: a handful of iterations and no mirroring, found through nnUNet_extTrainer.
CI_TRAINERS = '''
import torch
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer_1epoch


class LKMUNetTrainer_CI(LKMUNetTrainer_1epoch):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch, None
'''


def write_blob_case(folder: Path, name: str, rng: np.random.Generator, with_label: bool = True) -> None:
    """One 16 x 32 x 32 volume (spacing 2 x 1 x 1 mm) with a bright ellipsoid labelled 1."""
    z, y, x = np.mgrid[:16, :32, :32]
    cy, cx = rng.uniform(11, 21, 2)
    label = (((z - 8) / 5) ** 2 + ((y - cy) / 7) ** 2 + ((x - cx) / 7) ** 2 < 1).astype(np.uint8)
    image = (2.0 * label + rng.normal(0, 0.4, label.shape)).astype(np.float32)
    items = [(image, folder / "images" / f"{name}_0000.nii.gz")]
    if with_label:
        items.append((label, folder / "labels" / f"{name}.nii.gz"))
    for array, path in items:
        path.parent.mkdir(parents=True, exist_ok=True)
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(volume, str(path))


def make_raw_dataset(raw: Path) -> Path:
    root = raw / DATASET
    rng = np.random.default_rng(0)
    for i in range(4):
        write_blob_case(root / "Tr", f"case{i}", rng)
    for i in range(2):
        write_blob_case(root / "Ts", f"test{i}", rng)
    for src, dst in (("Tr/images", "imagesTr"), ("Tr/labels", "labelsTr"), ("Ts/images", "imagesTs"),
                     ("Ts/labels", "labelsTs")):
        (root / src).rename(root / dst)
    for leftover in ("Tr", "Ts"):
        (root / leftover).rmdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1},
        "numTraining": 4, "file_ending": ".nii.gz"}))
    return root


def nnunet_env(base: Path, ext_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=str(base / "raw"), nnUNet_preprocessed=str(base / "preprocessed"),
               nnUNet_results=str(base / "results"), nnUNet_def_n_proc="2",
               nnUNet_extTrainer=os.pathsep.join([str(trainer_path()), str(ext_dir)]),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _checked(command: list[str], result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def run(command: list[str], env: dict[str, str], check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True)
    return _checked(command, result, check)


def run_together(commands: list[list[str]], env: dict[str, str], **extra_env: str) -> list[subprocess.CompletedProcess]:
    """Independent commands started at once, each checked as :func:`run` does: on 2 cores their
    single-threaded parts (start-up, nnU-Net's trainer lookup, data loading) overlap. Output goes to
    files, not pipes, so that no command waits for the test to read another's output."""
    with contextlib.ExitStack() as stack:
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")), stack.enter_context(tempfile.TemporaryFile("w+")))
                 for _ in commands]
        processes = [subprocess.Popen(c, env={**env, **extra_env}, stdout=out, stderr=err, text=True)
                     for c, (out, err) in zip(commands, files)]
        results = []
        for command, process, (out, err) in zip(commands, processes, files):
            process.wait()
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(command, process.returncode, out.read(), err.read()))
    return [_checked(c, r, True) for c, r in zip(commands, results)]


_TAG_AS_CUDA = False


def _cuda_tagger(storage):
    return "cuda:0" if _TAG_AS_CUDA else None


torch.serialization.register_package(1, _cuda_tagger, lambda storage, location: None)


def resave_as_if_written_on_cuda(path: Path) -> None:
    """Rewrite a checkpoint so every tensor is recorded as living on cuda:0, as a GPU run saves it."""
    global _TAG_AS_CUDA
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    _TAG_AS_CUDA = True
    try:
        torch.save(checkpoint, path)
    finally:
        _TAG_AS_CUDA = False

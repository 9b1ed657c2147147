"""`lkm-unet doctor --fix` in a fresh virtual environment: it writes the torchvision guard into that
environment's site-packages, after which torchvision imports and nnU-Net finds LKMUNetTrainer."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import nnunetv2_plugin

from nnunetv2_plugin.environment import trainer_path
from nnunetv2_plugin.torchvision_guard import PTH_LINE, PTH_NAME

FIND_TRAINER = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
                "print(find('LKMUNetTrainer').__module__)")


@pytest.fixture()
def fresh_venv(tmp_path):
    """A new venv that sees this environment's packages as plain path entries: their .pth files (and so
    any guard installed here) are not run there, as in an environment that never ran doctor --fix."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages and this checkout (an editable install is a .pth of its own, not run
    # there); the name sorts before the guard's, as an installed package's entry does, so the guard's
    # import line finds the package
    checkout = Path(nnunetv2_plugin.__file__).resolve().parents[1]
    (site / "_test_environment.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{checkout}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env["nnUNet_extTrainer"] = str(trainer_path())
    return python, site, env


def test_doctor_fix_writes_the_guard_and_makes_the_trainer_findable(fresh_venv):
    python, site, env = fresh_venv
    probe = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        pytest.skip("torchvision imports in this environment; there is nothing for doctor --fix to repair")
    assert "torchvision::nms does not exist" in probe.stderr
    before = subprocess.run([str(python), "-c", FIND_TRAINER], capture_output=True, text=True, env=env)
    assert before.returncode != 0

    doctor = subprocess.run([str(python), "-m", "nnunetv2_plugin.cli", "doctor", "--fix"], capture_output=True,
                            text=True, env=env)
    guard = site / PTH_NAME
    assert f"  fixed: wrote {guard} (an import hook; see README, Troubleshooting)" in doctor.stdout.splitlines()
    assert guard.read_text() == PTH_LINE

    after = subprocess.run([str(python), "-c", "import torchvision; " + FIND_TRAINER.replace("\n", "; ")],
                           capture_output=True, text=True, env=env)
    assert after.returncode == 0, after.stderr[-2000:]
    assert after.stdout.strip().splitlines()[-1] == "nnunetv2_plugin.lkm_unet_trainer"
    again = subprocess.run([str(python), "-m", "nnunetv2_plugin.cli", "doctor"], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 0
    assert f"torchvision: ok (guard {guard} installed)" in again.stdout.splitlines()
    assert "nnU-Net finds LKMUNetTrainer: ok" in again.stdout.splitlines()

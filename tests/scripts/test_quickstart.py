"""The README's main command, scripts/quickstart.sh, end to end: small in CI, full size under -m slow."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "nnunetv2_plugin"))
from nnunet_fixtures import CI_TRAINERS  # noqa: E402


def _run_quickstart(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    work = tmp_path / "demo"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    environment.update(LKM_DEMO_DIR=str(work), **env)
    result = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = {row["organ"]: row for row in csv.DictReader(open(work / "evaluation" / "summary.csv"))}
    return result, summary


def test_quickstart_small(tmp_path):
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "ci_trainers.py").write_text(CI_TRAINERS)
    result, summary = _run_quickstart(tmp_path, LKM_DEMO_NUM_TRAIN="5", LKM_DEMO_NUM_TEST="2",
                                      LKM_DEMO_TRAINER="LKMUNetTrainer_CI", nnUNet_extTrainer=str(ext))
    assert list(summary) == ["liver", "kidney", "spleen", "mean"]
    assert 0.0 <= float(summary["mean"]["DSC_mean"]) <= 1.0
    assert "mean DSC over organs and held-out cases: " in result.stdout
    assert sorted(p.name for p in (tmp_path / "demo" / "overlays").glob("*.png")) == \
        ["demo_0005.png", "demo_0006.png"]
    assert (tmp_path / "demo" / ".lkm-unet-demo").is_file()
    # each step's wall time, in order, adding up to the total (whole seconds: one second per step at most)
    per_step = re.search(r"^time per step: (.*)$", result.stdout, re.MULTILINE).group(1).split(", ")
    assert [item.split()[0] for item in per_step] == [f"{k}/6" for k in range(1, 7)]
    total = re.search(r"quickstart finished in (\d+) min (\d+) s", result.stdout)
    assert abs(sum(_seconds(item.split(" ", 1)[1]) for item in per_step)
               - 60 * int(total.group(1)) - int(total.group(2))) <= 6


def _seconds(text: str) -> int:
    """``"1 min 5 s"`` or ``"5 s"`` -> seconds."""
    match = re.fullmatch(r"(?:(\d+) min )?(\d+) s", text)
    return 60 * int(match.group(1) or 0) + int(match.group(2))


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "precious.txt").write_text("keep me")
    environment = {**os.environ, "LKM_DEMO_DIR": str(tmp_path / "demo")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"error: {tmp_path / 'demo'} exists and was not made by this script" in result.stderr
    assert (tmp_path / "demo" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_quickstart_full_reaches_the_dice_target(tmp_path):
    result, summary = _run_quickstart(tmp_path)
    assert float(summary["mean"]["DSC_mean"]) >= 0.8, result.stdout[-3000:]

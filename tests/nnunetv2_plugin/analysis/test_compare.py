"""`lkm-unet compare` end to end on the demo dataset (2 runs, 1 short epoch, 2D, no TTA), and its statistics."""
import csv
import math
import os

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import wilcoxon

from nnunet_fixtures import CI_TRAINERS, DATASET_ID, run
from nnunetv2_plugin.analysis.compare import Run, CompareError, training_cost
from nnunetv2_plugin.analysis.compare_table import wilcoxon_p

# the CI trainer's short schedule with the no-Mamba switch, in a module of its own in the ext folder
CI_NO_MAMBA = CI_TRAINERS.replace("class LKMUNetTrainer_CI(LKMUNetTrainer_1epoch):\n",
                                  "class LKMUNetTrainer_CI_noMamba(LKMUNetTrainer_1epoch):\n"
                                  "    lkm_arch_overrides = {'use_pim': False, 'use_pam': False}\n")
PLANS = "nnUNetLKMUNetPlansCompare"
RUNS = [f"LKMUNetTrainer_CI:{PLANS}", f"LKMUNetTrainer_CI_noMamba:{PLANS}"]


def test_wilcoxon_handles_zero_differences_explicitly():
    assert math.isnan(wilcoxon_p([0.5, 0.7, 0.9], [0.5, 0.7, 0.9]))
    x, y = [0.9, 0.8, 0.7, 0.6, 0.95, 0.85], [0.9, 0.7, 0.75, 0.5, 0.90, 0.80]   # one zero difference
    assert wilcoxon_p(x, y) == wilcoxon(x, y).pvalue
    with pytest.raises(ValueError, match="paired test needs the same cases: 2 values against 3"):
        wilcoxon_p([1, 2], [1, 2, 3])


def test_run_parsing_and_log_parsing(tmp_path):
    assert Run.parse("nnUNetTrainer:nnUNetResEncUNetMPlans").name == "nnUNetTrainer__nnUNetResEncUNetMPlans"
    with pytest.raises(CompareError, match="run 'LKMUNetTrainer' is not TRAINER:PLANS"):
        Run.parse("LKMUNetTrainer")
    (tmp_path / "training_log_2026_1_1_00_00_00.txt").write_text(
        "2026-01-01 00:00:01.000000: Epoch time: 10.5 s\n2026-01-01: peak GPU memory: 9000 MiB\n"
        "2026-01-01 00:00:02.000000: Epoch time: 11.5 s\n2026-01-01: peak GPU memory: 9100 MiB\n")
    assert training_cost(tmp_path) == {"epoch_s": 11.0, "peak_gpu_mib": 9100.0}


def _read(path):
    return list(csv.DictReader(open(path)))


def test_compare_end_to_end(planned, tmp_path):
    """On the session's tiny planned dataset (4 training, 2 test volumes of 16 x 32 x 32): the demo
    dataset's 96 x 96 slices cost minutes per prediction on 2 CPU cores with the torch scan."""
    (planned["ext"] / "ci_compare_trainers.py").write_text(CI_NO_MAMBA)
    env = planned["env"]
    run(["lkm-unet", "plans", str(DATASET_ID), "-c", "2d", "--target-plans", PLANS], env)
    out = tmp_path / "comparison"
    args = ["lkm-unet", "compare", str(DATASET_ID), "-c", "2d", "--run", RUNS[0], "--run", RUNS[1], "-f", "all",
            "--device", "cpu", "--disable-tta", "-o", str(out)]
    result = run(args, env, nnUNet_n_proc_DA="0")

    rows = _read(out / "table.csv")
    names = [r.replace(":", "__") for r in RUNS]
    assert [(r["run"], r["organ"]) for r in rows] == \
        [(n, o) for n in names for o in ("blob", "mean")]
    assert all(r["n"] == "2" for r in rows)
    first, second = rows[:2], rows[2:]
    assert all(r["DSC_p"] == "nan" and r["NSD_p"] == "nan" for r in first)  # the reference run

    # p-values are scipy's on the per-case table the command wrote
    per_case = _read(out / "per_case.csv")
    for row in second:
        for metric in ("DSC", "NSD"):
            def values(name):
                cases = sorted({r["case"] for r in per_case if r["run"] == name})
                if row["organ"] == "mean":
                    return [np.mean([float(r[metric]) for r in per_case if r["run"] == name and r["case"] == c])
                            for c in cases]
                return [float(r[metric]) for c in cases for r in per_case
                        if r["run"] == name and r["case"] == c and r["organ"] == row["organ"]]
            x, y = values(names[1]), values(names[0])
            expected = math.nan if np.all(np.asarray(x) - np.asarray(y) == 0) else wilcoxon(x, y).pvalue
            assert (math.isnan(expected) and row[f"{metric}_p"] == "nan") or float(row[f"{metric}_p"]) == expected
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(x), abs=1e-12)

    # cost columns: profile's parameters (no-Mamba is the backbone alone), epoch time from the logs
    assert int(first[0]["params"]) > int(second[0]["params"]) > 0
    assert float(first[0]["gflops"]) > float(second[0]["gflops"]) > 0
    assert float(first[0]["epoch_s"]) > 0 and first[0]["peak_gpu_mib"] == ""
    table = (out / "table.md").read_text()
    assert "| n/a |" in table and "| ref |" in table
    assert result.stdout.startswith("# Dataset991_LKMTiny, 2d, fold all: 2 test cases")
    image = imread(out / "boxplots.png")
    assert image.shape[0] > 500 and image.shape[1] > 500 and image[..., :3].std() > 0.05

    # a second call refuses to replace the table; --collect-only --force re-collects the same numbers
    again = run(args, env, check=False)
    assert again.returncode == 2 and again.stderr.strip() == \
        f"error: {out / 'table.md'} already exists; pass --force to replace the comparison"
    collected = run(args + ["--collect-only"] + ["--force"], env)
    assert "nnUNetv2_train" not in collected.stdout + collected.stderr
    assert _read(out / "table.csv")[2]["DSC_mean"] == second[0]["DSC_mean"]
    missing = run(["lkm-unet", "compare", str(DATASET_ID), "-c", "2d", "--run", f"LKMUNetTrainer_CI_noMamba:{PLANS}",
                   "--collect-only", "-f", "0", "-o", str(tmp_path / "other")], env, check=False)
    assert missing.returncode == 2
    assert f"run LKMUNetTrainer_CI_noMamba__{PLANS} is not trained:" in missing.stderr


def test_tables_from_synthetic_scores(tmp_path):
    from nnunetv2_plugin.analysis.compare_table import comparison_rows, write_box_plots, write_tables
    from nnunetv2_plugin.evaluation import summarize

    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(6)]
    per_case = {}
    for name, shift in (("A", 0.0), ("B", -0.1), ("C", 0.0)):
        per_case[name] = [{"case": c, "organ": o, "DSC": float(np.clip(0.8 + shift + rng.normal(0, 0.05), 0, 1)),
                           "NSD": 0.9} for c in cases for o in ("liver", "spleen")]
    per_case["C"] = [dict(r) for r in per_case["A"]]  # identical to the reference: every difference is zero
    summaries = {n: summarize(rows, ["liver", "spleen"]) for n, rows in per_case.items()}
    info = {n: {"trainer": n, "plans": "P", "params": 1000, "gflops": 1.5, "epoch_s": None, "peak_gpu_mib": None}
            for n in per_case}
    rows = comparison_rows(per_case, summaries, info)
    b_liver = next(r for r in rows if r["run"] == "B" and r["organ"] == "liver")
    expected = wilcoxon([r["DSC"] for r in per_case["B"] if r["organ"] == "liver"],
                        [r["DSC"] for r in per_case["A"] if r["organ"] == "liver"]).pvalue
    assert b_liver["DSC_p"] == expected == pytest.approx(0.03125)  # all 6 differences negative: 2 / 2**6
    assert math.isnan(b_liver["NSD_p"])  # NSD equal everywhere
    assert all(math.isnan(r["DSC_p"]) for r in rows if r["run"] == "C")
    write_tables(rows, tmp_path, "# synthetic")
    table = (tmp_path / "table.md").read_text()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith(("| A |", "| B |", "| C |"))}
    assert [cells[n][1] for n in "ABC"] == ["ref", "0.0312", "n/a"]   # p (DSC)
    assert [cells[n][3] for n in "ABC"] == ["ref", "n/a", "n/a"]      # p (NSD)
    assert cells["A"][4:] == ["0.001", "1.50", "n/a", "n/a"]          # parameters, GFLOPs, time, memory
    write_box_plots(per_case, ["liver", "spleen"], tmp_path / "box.png")
    assert imread(tmp_path / "box.png")[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="a paired test needs the same test cases"):
        comparison_rows({"A": per_case["A"], "B": per_case["B"][:2]}, summaries, info)

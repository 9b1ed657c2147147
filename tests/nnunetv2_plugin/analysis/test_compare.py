"""`lkm-unet compare` end to end on a tiny real dataset (LKM-UNet against nnU-Net's ResEnc M preset, planned
by nnU-Net, one short epoch each, 2D, no TTA), its budget checks, and its statistics."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from scipy.stats import wilcoxon
from torch.utils.flop_counter import FlopCounterMode

from nnunet_fixtures import DATASET_ID, run
from nnunetv2_plugin.analysis.budget import (BudgetError, batch_size_plans, check_same_budget, scheduled_trainer,
                                             trained_budget)
from nnunetv2_plugin.analysis.compare import Run, CompareError, training_cost
from nnunetv2_plugin.analysis.compare_table import wilcoxon_p

# The CI schedule (1 epoch of 3 iterations, no mirroring) for LKM-UNet and for nnU-Net's own trainer, so
# that `--schedule compareCI` gives both runs the same budget. No final validation: compare does not use it.
COMPARE_TRAINERS = """
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer


class _CompareCI:
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch, None

    def perform_actual_validation(self, save_probabilities=False):
        self.print_to_log_file("final validation skipped (CI)")


class LKMUNetTrainer_compareCI(_CompareCI, LKMUNetTrainer):
    pass


class nnUNetTrainer_compareCI(_CompareCI, nnUNetTrainer):
    pass
"""
PLANS = "nnUNetLKMUNetPlansCompare"
RUNS = [f"LKMUNetTrainer:{PLANS}", "nnUNetTrainer:nnUNetResEncUNetMPlans"]
# what the runs are after --schedule compareCI --batch-size 2
NAMES = [f"LKMUNetTrainer_compareCI__{PLANS}_bs2", "nnUNetTrainer_compareCI__nnUNetResEncUNetMPlans_bs2"]


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


def _resenc_cost(preprocessed, plans_name, configuration="2d"):
    """Parameters and forward FLOPs of the network nnU-Net builds from ``plans_name``, counted here."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(json.loads((preprocessed / f"{plans_name}.json").read_text()))
    config = manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(manager, config, 1, 2, enable_deep_supervision=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network.eval()(torch.zeros(1, 1, *config.patch_size))
    return sum(p.numel() for p in network.parameters()), counter.get_total_flops()


def test_compare_end_to_end(planned, tmp_path):
    """LKM-UNet against nnU-Net's ResEnc M preset, planned by nnU-Net's own planner inside `compare`, both on
    the CI schedule and batch size 2, on the session's tiny planned dataset (4 training, 2 test volumes of
    16 x 32 x 32; the demo dataset's 96 x 96 slices cost minutes per prediction on 2 CPU cores)."""
    (planned["ext"] / "ci_compare_trainers.py").write_text(COMPARE_TRAINERS)
    env = planned["env"]
    preprocessed = planned["base"] / "preprocessed" / "Dataset991_LKMTiny"
    run(["lkm-unet", "plans", str(DATASET_ID), "-c", "2d", "--target-plans", PLANS], env)
    out = tmp_path / "comparison"
    args = ["lkm-unet", "compare", str(DATASET_ID), "-c", "2d", "--run", RUNS[0], "--run", RUNS[1], "-f", "all",
            "--schedule", "compareCI", "--batch-size", "2", "--device", "cpu", "--disable-tta", "-o", str(out)]
    result = run(args, env, nnUNet_n_proc_DA="0")

    # ResEnc M planned by nnUNetPlannerResEncM (it shares nnUNetPlans' preprocessed data), then both plans
    # copied with batch size 2 under their own plans_name
    assert "$ nnUNetv2_plan_experiment -d 991 -pl nnUNetPlannerResEncM" in (out / "logs" / "planning.log").read_text()
    resenc = json.loads((preprocessed / "nnUNetResEncUNetMPlans.json").read_text())
    architecture = resenc["configurations"]["2d"]["architecture"]
    assert architecture["network_class_name"].endswith("ResidualEncoderUNet")
    assert resenc["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"
    for source in (PLANS, "nnUNetResEncUNetMPlans"):
        original = json.loads((preprocessed / f"{source}.json").read_text())
        copy = json.loads((preprocessed / f"{source}_bs2.json").read_text())
        assert copy["plans_name"] == f"{source}_bs2" and copy["configurations"]["2d"]["batch_size"] == 2
        original["plans_name"], original["configurations"]["2d"]["batch_size"] = copy["plans_name"], 2
        assert copy == original

    rows = _read(out / "table.csv")
    assert [(r["run"], r["organ"]) for r in rows] == [(n, o) for n in NAMES for o in ("blob", "mean")]
    assert all(r["n"] == "2" for r in rows)
    # both trained what debug.json says: the same schedule and batch size
    assert {(r["epochs"], r["iterations"], r["batch_size"]) for r in rows} == {("1", "3", "2")}
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
            x, y = values(NAMES[1]), values(NAMES[0])
            expected = math.nan if np.all(np.asarray(x) - np.asarray(y) == 0) else wilcoxon(x, y).pvalue
            assert (math.isnan(expected) and row[f"{metric}_p"] == "nan") or float(row[f"{metric}_p"]) == expected
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(x), abs=1e-12)

    # cost columns: the ResEnc network's parameters and FLOPs as counted here, epoch time from each log
    params, flops = _resenc_cost(preprocessed, "nnUNetResEncUNetMPlans_bs2")
    assert int(second[0]["params"]) == params and float(second[0]["gflops"]) == pytest.approx(flops / 1e9, rel=1e-12)
    assert int(first[0]["params"]) > 0 and float(first[0]["gflops"]) > 0
    assert all(float(r["epoch_s"]) > 0 and r["peak_gpu_mib"] == "" for r in rows)
    table = (out / "table.md").read_text()
    assert "| n/a |" in table and "| ref |" in table and "| 1 x 3 | 2 |" in table
    assert result.stdout.startswith("# Dataset991_LKMTiny, 2d, fold all: 2 test cases")
    image = imread(out / "boxplots.png")
    assert image.shape[0] > 500 and image.shape[1] > 500 and image[..., :3].std() > 0.05

    # runs whose schedules differ are refused, with the values (read from nnU-Net's debug.json)
    budgets = {name: trained_budget(planned["base"] / "results" / "Dataset991_LKMTiny" / f"{name}__2d" / "fold_all")
               for name in NAMES}
    assert budgets[NAMES[1]] == {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                                 "batch_size": 2}
    budgets[NAMES[1]] = {**budgets[NAMES[1]], "num_epochs": 1000}
    with pytest.raises(BudgetError, match=f"run {NAMES[1]} trained a different budget than {NAMES[0]}: "
                                          f"num_epochs 1000 \\(first run: 1\\)"):
        check_same_budget(budgets)

    # a second call refuses to replace the table; --collect-only re-collects the same numbers from the
    # trained runs and the predictions already there (--force would predict again)
    again = run(args, env, check=False)
    assert again.returncode == 2 and again.stderr.strip() == \
        f"error: {out / 'table.md'} already exists; pass --force to replace the comparison"
    (out / "table.md").unlink()
    collected = run(args + ["--collect-only"], env)
    assert "$ nnUNetv2_" not in collected.stdout + collected.stderr  # no training, planning or prediction
    assert _read(out / "table.csv")[2]["DSC_mean"] == second[0]["DSC_mean"]
    missing = run(["lkm-unet", "compare", str(DATASET_ID), "-c", "2d", "--run", RUNS[1], "--schedule", "compareCI",
                   "--collect-only", "-f", "0", "-o", str(tmp_path / "other")], env, check=False)
    assert missing.returncode == 2
    assert "run nnUNetTrainer_compareCI__nnUNetResEncUNetMPlans is not trained:" in missing.stderr


def test_a_schedule_every_trainer_lacks_is_refused_before_training():
    with pytest.raises(BudgetError) as error:
        scheduled_trainer("LKMUNetTrainer", "3epochs")
    assert str(error.value).startswith("--schedule 3epochs: trainer LKMUNetTrainer_3epochs (the schedule of "
                                       "LKMUNetTrainer) does not exist in nnunetv2 or nnUNet_extTrainer")
    assert scheduled_trainer("nnUNetTrainer", None) == "nnUNetTrainer"
    assert scheduled_trainer("nnUNetTrainer", "5epochs") == "nnUNetTrainer_5epochs"  # nnU-Net's own variant


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
    # parameters, GFLOPs, epochs x iterations, batch, time, memory
    assert cells["A"][4:] == ["0.001", "1.50", "n/a", "n/a", "n/a", "n/a"]
    info["B"].update(epochs=8, iterations=25, batch_size=4)
    write_tables(comparison_rows(per_case, summaries, info), tmp_path, "# synthetic")
    assert "| 1.50 | 8 x 25 | 4 | n/a | n/a |" in (tmp_path / "table.md").read_text()
    write_box_plots(per_case, ["liver", "spleen"], tmp_path / "box.png")
    assert imread(tmp_path / "box.png")[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="a paired test needs the same test cases"):
        comparison_rows({"A": per_case["A"], "B": per_case["B"][:2]}, summaries, info)


def test_batch_size_plans_copy_the_plans_under_their_own_name(tmp_path):
    plans = {"plans_name": "nnUNetResEncUNetMPlans", "configurations": {"2d": {"batch_size": 365, "patch_size": [96, 96]},
                                                                        "3d_fullres": {"batch_size": 2}}}
    (tmp_path / "nnUNetResEncUNetMPlans.json").write_text(json.dumps(plans))
    assert batch_size_plans(tmp_path, "nnUNetResEncUNetMPlans", "2d", 4) == "nnUNetResEncUNetMPlans_bs4"
    written = json.loads((tmp_path / "nnUNetResEncUNetMPlans_bs4.json").read_text())
    assert written == {"plans_name": "nnUNetResEncUNetMPlans_bs4",
                       "configurations": {"2d": {"batch_size": 4, "patch_size": [96, 96]}, "3d_fullres": {"batch_size": 2}}}
    assert batch_size_plans(tmp_path, "nnUNetResEncUNetMPlans", "2d", 4) == "nnUNetResEncUNetMPlans_bs4"  # reused
    with pytest.raises(BudgetError, match="nnUNetResEncUNetMPlans_bs4.json exists with batch size 2 in "
                                          "configuration '3d_fullres', not 4; remove it or rename your plans"):
        batch_size_plans(tmp_path, "nnUNetResEncUNetMPlans", "3d_fullres", 4)
    with pytest.raises(BudgetError, match="--batch-size must be a positive int, got 0"):
        batch_size_plans(tmp_path, "nnUNetResEncUNetMPlans", "2d", 0)


def test_schedule_trainers_complete_the_grid():
    from lkm_unet.ablations import ABLATIONS, ABLATION_SUFFIXES
    from nnunetv2_plugin import schedule_trainers
    from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer_demo

    assert len(schedule_trainers.__all__) == 1 + len(ABLATIONS) * len(schedule_trainers.SCHEDULE_BASES) == 29
    for ablation, suffix in ABLATION_SUFFIXES.items():
        for schedule, base in schedule_trainers.SCHEDULE_BASES.items():
            trainer = getattr(schedule_trainers, f"LKMUNetTrainer_{suffix}_{schedule}")
            assert trainer.__mro__[1] is base and trainer.lkm_arch_overrides == ABLATIONS[ablation]
            assert trainer.lkm_num_epochs == {"1epoch": 1, "demo": 8}.get(schedule) or \
                trainer.lkm_num_epochs == int(schedule.removesuffix("epochs"))
    assert schedule_trainers.LKMUNetTrainer_noMamba_demo.lkm_num_epochs == LKMUNetTrainer_demo.lkm_num_epochs

"""`lkm-unet plans --gpu-memory`: batch size and memory options fitted to a budget, estimate printed."""
import json

import pytest

from nnunet_fixtures import DATASET, DATASET_ID, run
from nnunetv2_plugin.memory_budget import estimate_peak_gib
from nnunetv2_plugin.plans import PlansError
from nnunetv2_plugin.plans_files import write_lkm_plans


@pytest.fixture()
def preprocessed(planned, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(planned["base"] / "preprocessed"))
    return planned


def _entry(path):
    return json.loads(path.read_text())["configurations"]["3d_fullres"]


def test_a_large_budget_keeps_the_fast_path_and_the_planned_batch(preprocessed):
    path, tables = write_lkm_plans(DATASET, ["3d_fullres"], target_plans="LKMBudget40", gpu_memory=40)
    entry = _entry(path)
    kwargs, patch = entry["architecture"]["arch_kwargs"], entry["patch_size"]
    assert kwargs["ssm_checkpointing"] is False and kwargs["ssm_autocast"] is False
    peak = estimate_peak_gib(kwargs, patch, entry["batch_size"])
    assert f"estimated GPU training peak {peak:.1f} GiB (budget 40 GiB): batch size {entry['batch_size']}" \
        in tables["3d_fullres"]


def test_a_budget_below_the_fast_path_turns_recomputation_on(preprocessed):
    path, _ = write_lkm_plans(DATASET, ["3d_fullres"], target_plans="LKMBudgetProbe")
    entry = _entry(path)
    kwargs = {**entry["architecture"]["arch_kwargs"], "ssm_checkpointing": False}
    budget = estimate_peak_gib(kwargs, entry["patch_size"], 2) - 0.01
    path, tables = write_lkm_plans(DATASET, ["3d_fullres"], target_plans="LKMBudgetTight", gpu_memory=budget)
    entry = _entry(path)
    assert entry["architecture"]["arch_kwargs"]["ssm_checkpointing"] is True
    assert entry["batch_size"] == 2
    assert estimate_peak_gib(entry["architecture"]["arch_kwargs"], entry["patch_size"], 2) <= budget


def test_an_impossible_budget_is_a_clear_error(preprocessed):
    with pytest.raises(PlansError, match=r"configuration '3d_fullres': patch \[.*\] at batch 2 needs about "
                                         r"[0-9.]+ GiB even with every memory option, more than the 0.1 GiB budget"):
        write_lkm_plans(DATASET, ["3d_fullres"], target_plans="LKMBudgetTiny", gpu_memory=0.1)


def test_command_prints_the_estimate(preprocessed):
    result = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "3d_fullres", "--target-plans", "LKMBudgetCli",
                  "--gpu-memory", "24"], preprocessed["env"])
    assert "estimated GPU training peak" in result.stdout and "(budget 24 GiB)" in result.stdout

"""The comparison's statistics and outputs: table.md, table.csv, per_case.csv and box plots.

Per run and organ: mean and std over the test cases (population std, as ``lkm-unet evaluate``), and a
paired two-sided Wilcoxon signed-rank test against the first run over the same cases
(``scipy.stats.wilcoxon`` with its defaults: zero differences are dropped (``zero_method="wilcox"``);
the exact null distribution is used for up to 50 cases without ties or zeros, the normal approximation
otherwise). When every difference is zero the test is undefined and the p-value is reported as n/a.
The ``mean`` row tests each case's mean over organs.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

METRICS = ("DSC", "NSD")


def wilcoxon_p(values: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value of ``values`` against ``reference`` (same cases,
    same order); NaN when all differences are zero."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired test needs the same cases: {x.size} values against {y.size}")
    if np.all(x - y == 0):
        return math.nan
    return float(wilcoxon(x, y).pvalue)


def case_values(per_case: Sequence[dict], organ: str, metric: str, cases: Sequence[str]) -> list[float]:
    """One run's ``metric`` per case of ``cases`` for ``organ``; ``mean`` averages each case's organs."""
    if organ == "mean":
        return [float(np.mean([r[metric] for r in per_case if r["case"] == c])) for c in cases]
    lookup = {r["case"]: r[metric] for r in per_case if r["organ"] == organ}
    return [float(lookup[c]) for c in cases]


def comparison_rows(per_case: dict[str, list[dict]], summaries: dict[str, list[dict]],
                    run_info: dict[str, dict]) -> list[dict]:
    """One row per (run, organ) incl. ``mean``: means, stds, n and p-values against the first run,
    and the run's cost columns (``run_info``: params, gflops, epoch_s, peak_gpu_mib; optionally epochs,
    iterations and batch_size)."""
    names = list(per_case)
    first = names[0]
    cases = sorted({r["case"] for r in per_case[first]})
    for name in names[1:]:
        other = sorted({r["case"] for r in per_case[name]})
        if other != cases:
            raise ValueError(f"run {name} was evaluated on cases {other}, the first run on {cases}; "
                             f"a paired test needs the same test cases")
    rows = []
    for name in names:
        for summary in summaries[name]:
            organ = summary["organ"]
            row = {"run": name, "organ": organ, "n": summary["n"], **run_info[name]}
            for metric in METRICS:
                row[f"{metric}_mean"], row[f"{metric}_std"] = summary[f"{metric}_mean"], summary[f"{metric}_std"]
                row[f"{metric}_p"] = math.nan if name == first else wilcoxon_p(
                    case_values(per_case[name], organ, metric, cases), case_values(per_case[first], organ, metric, cases))
            rows.append(row)
    return rows


def _fmt_p(p: float, reference: bool) -> str:
    return "ref" if reference else ("n/a" if math.isnan(p) else f"{p:.3g}")


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _schedule(row: dict) -> str:
    return f"{row['epochs']} x {row['iterations']}" if row.get("epochs") else "n/a"


def write_tables(rows: list[dict], output: Path, header: str) -> None:
    """``table.md`` (runs, then per organ) and ``table.csv`` (every row, full precision)."""
    first = rows[0]["run"]
    runs = [r for r in rows if r["organ"] == "mean"]
    lines = [header, "", "## Runs (mean over organs)", "",
             "| run | DSC mean ± std | p (DSC) | NSD mean ± std | p (NSD) | parameters (M) | GFLOPs / patch "
             "| epochs x iterations | batch | s / epoch | peak GPU memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        reference = r["run"] == first
        lines.append(f"| {r['run']} | {r['DSC_mean']:.4f} ± {r['DSC_std']:.4f} | {_fmt_p(r['DSC_p'], reference)} "
                     f"| {r['NSD_mean']:.4f} ± {r['NSD_std']:.4f} | {_fmt_p(r['NSD_p'], reference)} "
                     f"| {_fmt(r['params'] / 1e6 if r['params'] is not None else None, 3)} | {_fmt(r['gflops'], 2)} "
                     f"| {_schedule(r)} | {r.get('batch_size') or 'n/a'} "
                     f"| {_fmt(r['epoch_s'], 1)} | {_fmt(r['peak_gpu_mib'], 0)} |")
    lines += ["", "## Per organ", "", "| organ | run | n | DSC mean ± std | p (DSC) | NSD mean ± std | p (NSD) |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["organ"] != "mean"), key=lambda r: r["organ"]):
        reference = r["run"] == first
        lines.append(f"| {r['organ']} | {r['run']} | {r['n']} | {r['DSC_mean']:.4f} ± {r['DSC_std']:.4f} "
                     f"| {_fmt_p(r['DSC_p'], reference)} | {r['NSD_mean']:.4f} ± {r['NSD_std']:.4f} "
                     f"| {_fmt_p(r['NSD_p'], reference)} |")
    lines += ["", f"p: paired two-sided Wilcoxon signed-rank test over the test cases against {first} "
              "(scipy.stats.wilcoxon defaults: zero differences dropped; exact for n <= 50 without ties or "
              "zeros, normal approximation otherwise; n/a when every difference is zero). The mean row tests "
              "each case's mean over organs. Epochs x iterations (per epoch) and batch: what each run trained, "
              "from its debug.json. s / epoch: mean of nnU-Net's 'Epoch time' log lines. GFLOPs: "
              "`lkm-unet profile` (one forward pass of one patch). Peak GPU memory: logged by the LKM-UNet "
              "trainers on CUDA; n/a for other trainers and CPU runs.", ""]
    (output / "table.md").write_text("\n".join(lines))
    columns = list(dict.fromkeys(key for r in rows for key in r))  # runs collected without a budget lack some
    with (output / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def write_per_case(per_case: dict[str, list[dict]], path: Path) -> None:
    """Every run's per-case scores in one CSV (run, case, organ, DSC, NSD), full precision."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "case", "organ", "DSC", "NSD"])
        for name, rows in per_case.items():
            for r in rows:
                writer.writerow([name, r["case"], r["organ"], repr(float(r["DSC"])), repr(float(r["NSD"]))])


def write_box_plots(per_case: dict[str, list[dict]], organs: Sequence[str], path: Path) -> None:
    """Per-organ box plots of DSC (top) and NSD (bottom), one box per run, over the test cases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_case)
    width = 0.8 / len(names)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.2 * len(organs) * len(names) ** 0.5 + 2), 7),
                                sharex=True)
    for axis, metric in zip(axes, METRICS):
        for i, name in enumerate(names):
            data = [[float(r[metric]) for r in per_case[name] if r["organ"] == organ] for organ in organs]
            positions = [o + (i - (len(names) - 1) / 2) * width for o in range(len(organs))]
            boxes = axis.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                                 manage_ticks=False)
            for box in boxes["boxes"]:
                box.set_facecolor(colours[i % len(colours)])
                box.set_alpha(0.7)
            axis.plot([], [], color=colours[i % len(colours)], linewidth=8, alpha=0.7, label=name)
        axis.set_ylabel(metric)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(organs)), organs, rotation=30, ha="right")
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

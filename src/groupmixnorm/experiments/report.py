"""Tables, trade-off fronts and plots made from bench records (never typed by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from groupmixnorm.files import atomic_output, write_text_atomic

#: Columns of the every-setting table: decisions' gaps at threshold 0.5 and the KS distance first; Fair
#: Mixup's soft gaps last, for comparison with published numbers.
SUMMARY_METRICS = ("accuracy", "ap", "dp_gap_hard", "eodds_gap_hard", "dp_ks", "dp_gap", "eodds_gap")
FRONT_GAPS = ("dp_gap_hard", "dp_ks")


def over_seeds(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], medians: Sequence[str] = ()) -> pd.DataFrame:
    """Per group of ``by`` (in order of appearance): ``<metric>_mean`` and ``<metric>_std`` over its rows
    (one per seed), ``seeds`` (distinct ``seed`` values) and the median of each column in ``medians``."""
    grouped = frame.groupby(list(by), sort=False)
    table = grouped[list(metrics)].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    for column in medians:
        table[column] = grouped[column].median()
    return table


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (method, setting), with the seed count and the
    per-epoch time relative to ERM (the median epoch of ERM's first setting in the same records)."""
    table = over_seeds(runs, ("method", "setting"), SUMMARY_METRICS, medians=("epoch_seconds",))
    # The reference is ERM's first setting (the plain one); other ERM settings are rows like any other.
    erm_runs = runs[runs["method"] == "erm"]
    erm = erm_runs.loc[erm_runs["setting"] == erm_runs["setting"].iloc[0], "epoch_seconds"] if len(erm_runs) else erm_runs
    table["time_vs_erm"] = table["epoch_seconds"] / erm.median() if len(erm) else np.nan
    return table.reset_index()


def pareto_front(points: pd.DataFrame, gap: str) -> pd.DataFrame:
    """The settings not beaten on both axes (lower mean ``gap`` and higher mean AP), sorted by gap."""
    ordered = points.sort_values([f"{gap}_mean", "ap_mean"], ascending=[True, False])
    best_ap = -np.inf
    keep = []
    for index, row in ordered.iterrows():
        if row["ap_mean"] > best_ap:
            keep.append(index)
            best_ap = row["ap_mean"]
    return ordered.loc[keep]


def plot_fronts(summary: pd.DataFrame, gap: str, path: Path, title: str) -> Path:
    """AP against a gap, one marker per setting with standard-deviation bars, each method's front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.0))
    for color, (method, points) in zip(plt.cm.tab10.colors, summary.groupby("method", sort=False)):
        axes.errorbar(points[f"{gap}_mean"], points["ap_mean"], xerr=points[f"{gap}_std"].fillna(0),
                      yerr=points["ap_std"].fillna(0), fmt="o", color=color, alpha=0.45, markersize=4)
        front = pareto_front(points, gap)
        axes.plot(front[f"{gap}_mean"], front["ap_mean"], "-o", color=color, label=method, markersize=5)
    axes.set_xlabel(f"{gap} (test, mean over seeds; lower is fairer)")
    axes.set_ylabel("average precision (test, mean over seeds)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
    return path


def format_summary_table(summary: pd.DataFrame) -> str:
    """Markdown table of mean +- std per method and setting; † marks settings that need the protected
    attribute at prediction time."""
    needs_attribute = set(summary.attrs.get("needs_attribute", ()))
    marks = [" †" if key in needs_attribute else "" for key in zip(summary["method"], summary["setting"])]
    shown = pd.DataFrame({
        "method": summary["method"],
        "setting": [f"`{setting}`{mark}" for setting, mark in zip(summary["setting"], marks)],
        "seeds": summary["seeds"],
        **{metric: plus_minus(summary[f"{metric}_mean"], summary[f"{metric}_std"]) for metric in SUMMARY_METRICS},
        "s/epoch": summary["epoch_seconds"].map("{:.3f}".format),
        "time vs ERM": summary["time_vs_erm"].map("{:.2f}x".format),
    })
    return markdown_table(shown)


def plus_minus(means: Sequence[float], stds: Sequence[float]) -> list[str]:
    """``"mean ± std"`` cells; a missing std (a single seed) shows as 0."""
    return [f"{mean:.4f} ± {0.0 if np.isnan(std) else std:.4f}" for mean, std in zip(means, stds)]


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (pandas' ``to_markdown`` would need the tabulate package)."""
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_csv_atomic(table: pd.DataFrame, path: Path) -> Path:
    return write_text_atomic(path, table.to_csv(index=False))

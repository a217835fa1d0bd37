"""Plots of the HTML report about the decision a model makes: score distributions by group and the
threshold sweep, drawn as PNG bytes (with the matplotlib helpers that every plot of the report uses)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

#: Bins of the score histograms over [0, 1].
SCORE_BINS = 25
#: The curves of the threshold sweep: column of :func:`~groupmixnorm.experiments.report_decision.threshold_sweep`
#: and its label.
SWEEP_CURVES = {"accuracy": "accuracy", "dp_gap_hard": "demographic-parity gap (dp_gap_hard)",
                "eodds_gap_hard": "equalized-odds gap (eodds_gap_hard)"}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Any) -> bytes:
    """``figure`` as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()


def score_histograms_plot(scored: pd.DataFrame, threshold: float) -> bytes:
    """Each group's test scores as an outlined density histogram, overlaid, with the threshold marked.

    ``scored`` has the columns ``score`` and ``group`` (one row per test row).
    """
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.0, 3.6))
    bins = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    for group, rows in scored.groupby("group", sort=True):
        axes.hist(rows["score"], bins=bins, density=True, histtype="step", linewidth=1.6,
                  label=f"{group} (n={len(rows)})")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.set_ylabel("density within the group")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return png_bytes(figure)


def threshold_sweep_plot(sweep: pd.DataFrame, threshold: float, majority: float | None) -> bytes:
    """Accuracy and the thresholded gaps against the decision threshold (``sweep``: one row per threshold,
    the columns of :data:`SWEEP_CURVES`), the model's threshold marked, and the majority-class accuracy as a
    horizontal line when it is known."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.0, 3.8))
    for column, label in SWEEP_CURVES.items():
        axes.plot(sweep.index, sweep[column], "-o", markersize=3, label=label)
    if majority is not None:
        axes.axhline(majority, color="gray", linestyle=":", label=f"majority-class accuracy {majority:.3f}")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"model's threshold {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("decision threshold (predict 1 when score >= threshold)")
    axes.set_ylabel("on the test split")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return png_bytes(figure)

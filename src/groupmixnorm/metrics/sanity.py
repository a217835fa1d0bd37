"""Whether a trained model is of any use: the one rule behind the warnings of ``train``, its ``--max-gap``
search and the reports."""

from __future__ import annotations

from typing import Any

import numpy as np

from groupmixnorm.metrics.fairness import accuracy

#: Below this standard deviation of a split's scores the model has collapsed to (nearly) one score.
COLLAPSED_STD = 0.02


def majority_accuracy(base_rate: float) -> float:
    """The accuracy of predicting the more common label for everyone: ``max(p, 1 - p)`` for base rate ``p``."""
    return max(base_rate, 1.0 - base_rate)


def useless_model_warnings(
    y_true: Any, scores: Any, threshold: float = 0.5, *, model: str = "the selected model", split: str = "test"
) -> list[str]:
    """One line per sign that a model is useless on a split, an empty list when there is none.

    Two rules: its accuracy at ``threshold`` is not above the majority-class accuracy of the split (what
    predicting the more frequent label for every row scores), or its scores have collapsed (their standard
    deviation is below :data:`COLLAPSED_STD`: nearly every row gets the same score, whatever its AP).

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels of the split.
    scores : array-like of shape (n,)
        The model's scores (probabilities of the positive label) on the split.
    threshold : float
        Score at or above which the prediction is positive.
    model, split : str
        How the lines name the model and the split, e.g. ``"the chosen model"`` and ``"validation"``.
    """
    labels, values = np.asarray(y_true, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    lines = []
    majority = majority_accuracy(float(np.mean(labels)))
    found = accuracy(labels, values, threshold)
    if found <= majority:
        lines.append(f"{model}'s {split} accuracy {found:.4f} is no better than predicting the majority class "
                     f"({majority:.4f})")
    spread = float(np.std(values))
    if spread < COLLAPSED_STD:
        lines.append(f"{model}'s {split} scores have collapsed (standard deviation {spread:.4f} < {COLLAPSED_STD}): "
                     "it gives nearly every row the same score")
    return lines

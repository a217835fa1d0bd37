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


def beats_majority_pvalue(y_true: Any, scores: Any, threshold: float = 0.5) -> float:
    """One-sided exact sign test (McNemar's, exact) that the decisions at ``threshold`` are more accurate
    than predicting the majority class for everyone: the p-value of "no better".

    The two decide alike except where the model predicts the minority label; there each row is a win (the
    model is right) or a loss. Under "no better" wins and losses are equally likely, so the p-value is
    ``P(Binomial(wins + losses, 1/2) >= wins)``; 1.0 when the model never departs from the majority class.
    Unlike a bootstrap interval it stays exact when the model departs on a handful of rows.
    """
    from scipy.stats import binomtest

    labels = np.asarray(y_true, dtype=np.float64)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    majority = float(np.mean(labels)) >= 0.5
    departs = predicted != majority
    wins = int(np.sum(departs & (labels == predicted)))
    total = int(np.sum(departs))
    return float(binomtest(wins, total, 0.5, alternative="greater").pvalue) if total else 1.0


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

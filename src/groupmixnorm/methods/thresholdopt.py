"""Post-processing by group thresholds (Hardt et al., NeurIPS 2016): a reference, not a peer.

fairlearn's :class:`~fairlearn.postprocessing.ThresholdOptimizer` takes the scores of an unconstrained
network (the ERM model of the same loop, trained with the same budget) and picks, per group, a randomized
threshold that equalizes the groups' selection rates (``"dp"``) or their true and false positive rates
(``"eo"``) at the best accuracy. It needs the protected attribute of every row it scores, so a deployed
model would too: the bench lists it as a reference, the bound a method with the attribute can reach.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Method, ModelSpec, Scorer, option

if TYPE_CHECKING:
    from groupmixnorm.data import TabularDataset
    from groupmixnorm.training import TrainConfig

#: fairlearn's name of each constraint.
CONSTRAINTS = {"dp": "demographic_parity", "eo": "equalized_odds"}


@dataclass
class ThresholdOptimization(Method):
    """fairlearn's ``ThresholdOptimizer`` over the ERM network of the same loop, fitted on the training split.

    ``tol`` relaxes the constraint: the groups' rates may differ by at most ``tol`` (fairlearn's ``tol``;
    0 asks for equal rates; demographic parity only). The score of a row is the probability that the
    randomized group threshold selects it (fairlearn's ``_pmf_predict``), so it takes few distinct values
    and its AP is that of a decision, not of a ranking.
    """

    name = "thresholdopt"
    fitted_outside_loop: ClassVar[bool] = True
    fairness: str = option("dp", "constraint: dp (demographic parity) or eo (equalized odds)",
                           choices=FAIRNESS_CHOICES)
    tol: float = option(0.0, "largest difference of the groups' rates allowed (fairlearn's tol; dp only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.tol < 1:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")
        if self.fairness == "eo" and self.tol > 0:
            raise ValueError("tol relaxes demographic parity only (fairlearn does not relax equalized odds)")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        raise TypeError("thresholdopt post-processes an ERM network outside the loop; use fit_outside_loop")

    def uses_sensitive_at_prediction(self) -> bool:
        return True

    def fit_outside_loop(self, data: TabularDataset, config: TrainConfig) -> Scorer:
        """Train the ERM network with ``config``, fit the group thresholds on its training-split scores and
        return the scorer of ``(X, a)``."""
        from fairlearn.postprocessing import ThresholdOptimizer

        network = _erm_scores(data, config)
        optimizer = ThresholdOptimizer(
            estimator=_PrefitScores(network), constraints=CONSTRAINTS[self.fairness], objective="accuracy_score",
            prefit=True, predict_method="predict_proba", tol=self.tol if self.fairness == "dp" else None,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fairlearn\.")
            optimizer.fit(data.train.X, data.train.y, sensitive_features=data.train.a)

        def score(X: np.ndarray, a: np.ndarray) -> np.ndarray:
            probability = optimizer._pmf_predict(X, sensitive_features=a)[:, 1]
            return np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)

        return score


class _PrefitScores(ClassifierMixin, BaseEstimator):
    """The fitted ERM network as the scikit-learn classifier ``ThresholdOptimizer(prefit=True)`` expects."""

    def __init__(self, scores: Callable[[np.ndarray], np.ndarray]) -> None:
        self.scores = scores
        self.classes_ = np.array([0, 1])  # fitted already: check_is_fitted looks for an attribute ending in "_"

    def fit(self, X: Any, y: Any) -> _PrefitScores:
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        positive = self.scores(np.asarray(X))
        return np.column_stack([1.0 - positive, positive])


#: The last few ERM networks trained here, by the data they were trained on and the loop settings: the bench
#: fits thresholds of several ``tol`` values over the same seeded network, which would otherwise be trained
#: once per value.
_ERM_CACHE: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}
_ERM_CACHE_SIZE = 8


def _erm_scores(data: TabularDataset, config: TrainConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of the ERM network trained on ``data`` with ``config`` (the epoch of the best validation AP)."""
    from groupmixnorm.methods.erm import ERM
    from groupmixnorm.training import train
    from groupmixnorm.training.loop import seed_everything

    key = (_training_data_digest(data), repr(config))
    if key in _ERM_CACHE:
        return _ERM_CACHE[key]
    method = ERM()
    model = train(method, data, config).model
    seed_everything(config.seed)  # what follows draws as if the network had not been trained here

    def scores(X: np.ndarray) -> np.ndarray:
        import torch

        model.eval()
        with torch.no_grad():
            logits = method.predict_logits(model, torch.as_tensor(X, dtype=torch.float32, device=config.device))
        return torch.sigmoid(logits).cpu().numpy().astype(np.float64)

    if len(_ERM_CACHE) >= _ERM_CACHE_SIZE:
        _ERM_CACHE.pop(next(iter(_ERM_CACHE)))
    _ERM_CACHE[key] = scores
    return scores


def _training_data_digest(data: TabularDataset) -> str:
    """A digest of what the ERM network sees: the training and validation splits."""
    digest = hashlib.sha256()
    for split in (data.train, data.val):
        for array in (split.X, split.y, split.a):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()

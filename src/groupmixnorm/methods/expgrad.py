"""Exponentiated gradient (Agarwal et al., ICML 2018) over logistic regression: an outside peer.

The reduction is fairlearn's :class:`~fairlearn.reductions.ExponentiatedGradient`; it fits a sequence of
weighted scikit-learn logistic regressions on the same standardized features as the torch methods and
returns a randomized classifier. It does not use the torch loop (see :meth:`Method.fit_outside_loop`).
Images are flattened: the logistic regression reads the normalized pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
from torch import nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Method, ModelSpec, Scorer, option

if TYPE_CHECKING:
    from fairlearn.reductions import ExponentiatedGradient

    from groupmixnorm.data import TabularDataset
    from groupmixnorm.training import TrainConfig

#: Iterations of each logistic-regression fit; enough for lbfgs to converge on the standardized features.
LOGISTIC_MAX_ITER = 1000


@dataclass
class ExponentiatedGradientMethod(Method):
    """fairlearn's ``ExponentiatedGradient`` with a demographic-parity (``"dp"``) or equalized-odds
    (``"eo"``) constraint of bound ``eps``, over a seeded ``LogisticRegression``.

    The score of a row is the expected prediction of the randomized classifier: the weighted share of the
    reduction's predictors that predict 1 there (fairlearn's ``_pmf_predict(X)[:, 1]``). It is
    deterministic given the fitted model, so metrics need no sampling. The protected attribute is used only
    when fitting.
    """

    name = "expgrad"
    fitted_outside_loop: ClassVar[bool] = True
    fairness: str = option("dp", "constraint: dp (demographic parity) or eo (equalized odds)",
                           choices=FAIRNESS_CHOICES)
    eps: float = option(0.01, "bound on the constraint violation (fairlearn's eps)")
    max_iter: int = option(50, "most rounds of the reduction, one logistic regression each "
                           "(fairlearn's max_iter)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        raise TypeError("expgrad is fitted outside the torch loop; use fit_outside_loop")

    def reduction(self, seed: int) -> ExponentiatedGradient:
        """The unfitted fairlearn reduction: this method's constraint over a logistic regression seeded by ``seed``."""
        # Imported here: fairlearn.reductions takes seconds to import, and only this method needs it.
        from fairlearn.reductions import DemographicParity, EqualizedOdds, ExponentiatedGradient

        constraint = DemographicParity() if self.fairness == "dp" else EqualizedOdds()
        estimator = LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=seed)
        return ExponentiatedGradient(estimator, constraint, eps=self.eps, max_iter=self.max_iter)

    def fit_outside_loop(self, data: TabularDataset, config: TrainConfig) -> Scorer:
        """Fit the reduction on the training split and return its expected-prediction scorer (which ignores
        the group ids)."""
        with _single_blas_thread(), warnings.catch_warnings():
            # fairlearn's own pandas usage triggers deprecation warnings that say nothing about this run.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fairlearn\.")
            fitted = self.reduction(config.seed).fit(_rows(data.train.X), data.train.y, sensitive_features=data.train.a)
        return lambda X, a: expected_prediction(fitted, _rows(X))


def expected_prediction(fitted: ExponentiatedGradient, X: np.ndarray) -> np.ndarray:
    """Probability that the fitted randomized classifier predicts 1 on each row of ``X`` (float64)."""
    with _single_blas_thread():
        probability = np.asarray(fitted._pmf_predict(X)[:, 1], dtype=np.float64)
    # A weighted sum of the predictors' votes: rounding can put it a hair outside [0, 1] (seen on Adult).
    return np.clip(probability, 0.0, 1.0)


def _rows(X: np.ndarray) -> np.ndarray:
    """Feature rows as they are, images flattened to one row of pixels each (logistic regression on pixels)."""
    return X.reshape(len(X), -1)


def _single_blas_thread() -> threadpool_limits:
    """One BLAS thread: the problems are small, and on a busy machine BLAS threads slow lbfgs ten-fold."""
    return threadpool_limits(limits=1, user_api="blas")

"""A scikit-learn estimator around the package's methods and training loop.

``GroupMixNormClassifier().fit(X, y, sensitive_features=A)`` trains a GroupMixNorm network (or any other
torch-trained method of :mod:`groupmixnorm.methods`, ERM included) with the same building blocks as
``groupmixnorm train``; ``predict``, ``predict_proba``, ``decision_function`` and ``score`` need no
protected attribute. ``sensitive_features`` is named and routed as in fairlearn, so the estimator works
in a ``Pipeline``, with ``clone``, in ``GridSearchCV`` (through metadata routing) and with ``MetricFrame``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from groupmixnorm.methods import METHODS, Batch, Method, ModelSpec, make_method
from groupmixnorm.methods.base import method_fields
from groupmixnorm.training.loop import TrainConfig, train_one_epoch
from groupmixnorm.training.threads import TABULAR_THREADS, torch_threads

#: The options of ``gmn`` that are also estimator parameters (any method that has them gets them).
_SHARED_OPTIONS = ("align", "align_quantiles", "placement", "fairness")


class NoSensitiveFeaturesWarning(UserWarning):
    """``fit`` was called without ``sensitive_features``: every sample is treated as one group."""


class GroupMixNormClassifier(ClassifierMixin, BaseEstimator):
    """Binary classifier trained with GroupMixNorm (or another method of the package) for group fairness.

    The network is the package's MLP; by default one GroupMixNorm layer on the logit with the alignment
    penalty on the groups' logit distributions, the configuration that did best on the Adult bench.
    Prediction never needs the protected attribute.

    Parameters
    ----------
    method : {"gmn", "erm", "gapreg", "adversarial", "fairmixup"}, default="gmn"
        Training method. ``"erm"`` is plain cross-entropy, for comparison. ``"expgrad"`` is not offered:
        fairlearn's ``ExponentiatedGradient`` is a scikit-learn estimator already.
    align : float, default=1.0
        Weight of the alignment penalty (the fairness knob of ``gmn``); 0 switches it off.
    align_quantiles : int, default=16
        Quantiles of the logit compared by the penalty (0: mean and deviation only).
    placement : str, default="logit"
        Where the GroupMixNorm layers go: ``"logit"``, ``"all"`` hidden blocks (the paper), ``"first"``,
        ``"last"``, ``"head"``, or a list like ``"0,head"``.
    fairness : {"dp", "eo"}, default="dp"
        Criterion targeted by ``gmn``, ``gapreg``, ``adversarial`` and ``fairmixup``: demographic parity or
        equalized odds.
    method_options : dict, default=None
        Further options of the method by name, e.g. ``{"lam": 1.0}`` for ``gapreg`` or ``{"p": 0.5}`` for
        ``gmn`` (see ``groupmixnorm train --help``). ``eval_mode="group"`` is refused: it needs the
        attribute at prediction.
    hidden : tuple of int, default=(64, 64)
        Widths of the hidden layers.
    epochs : int, default=20
        Passes over the training data (the last epoch's weights are kept; there is no early stopping).
    batch_size : int, default=128
        Samples per batch (per group, or per group and label, for the group-balanced methods).
    lr : float, default=1e-3
        Adam's learning rate.
    weight_decay : float, default=0.0
        Adam's weight decay.
    standardize : bool, default=True
        Standardize each feature with its training mean and deviation before the network.
    random_state : int, RandomState instance or None, default=None
        Seed of the weights and of the batch order. Fitting does not touch the global random state of
        numpy or torch.
    threads : int or None, default=1
        Torch threads for ``fit`` and prediction, restored afterwards. One thread is the command line's
        default for tables: small matrix products run fastest on one, and two threads on a busy machine
        made training many times slower. ``None`` keeps torch's own setting.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        The two labels; ``classes_[1]`` is the positive class.
    groups_ : ndarray
        The protected groups seen in ``fit`` (sorted); ``[None]`` when fitted without them.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names seen in ``fit``, when ``X`` had string column names.
    model_ : torch.nn.Module
        The trained network (standardized features to one logit), in evaluation mode and in float64, so
        that a row's prediction does not depend on how many rows are scored with it.
    method_ : groupmixnorm.methods.Method
        The method object that trained it.
    history_ : list of dict
        The training losses logged per epoch.

    Notes
    -----
    Without ``sensitive_features`` every sample is in one group: GroupMixNorm is then batch normalization,
    the alignment penalty is zero, and the model is an ERM model. A :class:`NoSensitiveFeaturesWarning` says
    so. Only binary targets are supported.
    """

    def __init__(
        self,
        method: str = "gmn",
        *,
        align: float = 1.0,
        align_quantiles: int = 16,
        placement: str = "logit",
        fairness: str = "dp",
        method_options: dict[str, Any] | None = None,
        hidden: tuple[int, ...] = (64, 64),
        epochs: int = 20,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        standardize: bool = True,
        random_state: int | np.random.RandomState | None = None,
        threads: int | None = TABULAR_THREADS,
    ) -> None:
        self.method = method
        self.align = align
        self.align_quantiles = align_quantiles
        self.placement = placement
        self.fairness = fairness
        self.method_options = method_options
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.random_state = random_state
        self.threads = threads

    def fit(self, X: Any, y: Any, *, sensitive_features: Any = None) -> GroupMixNormClassifier:
        """Train the network.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Numeric features (use a ``ColumnTransformer`` in a ``Pipeline`` for raw tables).
        y : array-like of shape (n_samples,)
            Binary labels of any type.
        sensitive_features : array-like of shape (n_samples,) or (n_samples, n_columns), default=None
            The protected attribute; several columns are combined into intersectional groups. Without it
            all samples are one group (see the class notes).

        Returns
        -------
        self : GroupMixNormClassifier
            The fitted estimator.
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        target = type_of_target(y, input_name="y")
        if target != "binary":
            raise ValueError(f"Only binary classification is supported. The type of the target is {target}.")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) != 2:
            raise ValueError(f"y has one class ({self.classes_[0]!r}); a binary classifier needs two classes")
        self.groups_, groups = _encode_sensitive(sensitive_features, len(y))
        self.method_ = self._make_method()
        self._mean, self._scale = _standardization(X, self.standardize)
        features = torch.as_tensor((X - self._mean) / self._scale, dtype=torch.float32)
        batch = Batch(features, torch.as_tensor(y_index, dtype=torch.float32), torch.as_tensor(groups))
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with torch_threads(self.threads):
            self.model_, self.history_ = _train_network(self.method_, batch, len(self.groups_), self._config(seed))
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The logit of the positive class ``classes_[1]``; no protected attribute needed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,)
            Logits (float64); positive means ``classes_[1]``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        features = torch.as_tensor((X - self._mean) / self._scale, dtype=torch.float64)
        self.model_.eval()
        with torch.no_grad(), torch_threads(self.threads):
            logits = self.method_.predict_logits(self.model_, features)
        return logits.numpy().astype(np.float64)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities of ``classes_[0]`` and ``classes_[1]``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, 2)
            Each row sums to one.
        """
        positive = expit(self.decision_function(X))  # in float64, so that ranks match decision_function
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X: Any) -> np.ndarray:
        """The predicted labels: ``classes_[1]`` where the logit is positive (probability above 0.5).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(int)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def _make_method(self) -> Method:
        if self.method not in METHODS or self.method == "expgrad":
            known = sorted(name for name in METHODS if name != "expgrad")
            raise ValueError(f"method must be one of {known}, got {self.method!r}")
        fields = {item.name for item in method_fields(METHODS[self.method])}
        options = {name: getattr(self, name) for name in _SHARED_OPTIONS if name in fields}
        options.update(self.method_options or {})
        method = make_method(self.method, **options)
        if method.uses_sensitive_at_prediction():
            raise ValueError("eval_mode='group' needs the protected attribute at prediction; the estimator "
                             "predicts without it")
        return method

    def _config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           hidden=tuple(int(width) for width in self.hidden), seed=seed, select="last")


def _train_network(method: Method, batch: Batch, num_groups: int, config: TrainConfig) -> tuple[nn.Module, list[dict]]:
    """Build ``method``'s model and train it for ``config.epochs`` epochs with the loop's own epoch step.

    The global torch random state is restored afterwards (the seed decides weights, mixing and batches).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = method.build_model(ModelSpec(batch.x.shape[1], num_groups, config.hidden))
        method.setup(model, config.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        history = [
            {"epoch": epoch, **train_one_epoch(method, model, optimizer, batch, config, generator, epoch)}
            for epoch in range(config.epochs)
        ]
    # float64 for prediction: float32 sums would differ in the last bits with the number of rows scored.
    return model.double().eval(), history


def _encode_sensitive(sensitive_features: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group names (sorted) and per-sample group ids; one group ``[None]`` when no attribute is given."""
    if sensitive_features is None:
        warnings.warn("fit without sensitive_features: all samples are one group, so the model is not "
                      "trained for fairness", NoSensitiveFeaturesWarning, stacklevel=3)
        return np.array([None], dtype=object), np.zeros(n, dtype=np.int64)
    if isinstance(sensitive_features, (pd.Series, pd.DataFrame)):
        frame = pd.DataFrame(sensitive_features)
    else:
        values = np.asarray(sensitive_features, dtype=object)
        frame = pd.DataFrame(values[:, None] if values.ndim == 1 else values)
    if len(frame) != n:
        raise ValueError(f"sensitive_features has {len(frame)} rows, X has {n}")
    if frame.isna().to_numpy().any():
        raise ValueError("sensitive_features has missing values")
    values = frame.iloc[:, 0] if frame.shape[1] == 1 else frame.astype(str).agg(" & ".join, axis=1)
    names, ids = np.unique(values.to_numpy(), return_inverse=True)
    return names, ids.astype(np.int64)


def _standardization(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training means and deviations (constant columns keep a deviation of one); zeros and ones if off."""
    if not standardize:
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    scale = X.std(axis=0)
    return X.mean(axis=0), np.where(scale > 0, scale, 1.0)


__all__ = ["GroupMixNormClassifier", "NoSensitiveFeaturesWarning"]

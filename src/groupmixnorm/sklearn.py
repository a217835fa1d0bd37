"""A scikit-learn estimator around the package's methods and training loop.

``GroupMixNormClassifier().fit(X, y, sensitive_features=A)`` trains a GroupMixNorm network (or any other
torch-trained method of :mod:`groupmixnorm.methods`, ERM included) with the same building blocks as
``groupmixnorm train``; ``predict``, ``predict_proba``, ``decision_function`` and ``score`` need no
protected attribute. ``sensitive_features`` is named and routed as in fairlearn, so the estimator works
in a ``Pipeline``, with ``clone``, in ``GridSearchCV`` (through metadata routing) and with ``MetricFrame``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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

from groupmixnorm.data.tabular import intersect_groups
from groupmixnorm.data.tabular import Split, TabularDataset, stratified_holdout
from groupmixnorm.experiments import constraint
from groupmixnorm.methods import METHODS, Batch, Method, ModelSpec, make_method
from groupmixnorm.methods.base import method_fields
from groupmixnorm.training.loop import TrainConfig, train_one_epoch
from groupmixnorm.training.prepare import prepare
from groupmixnorm.training.threads import TABULAR_THREADS, torch_threads

#: The options of ``gmn`` that are also estimator parameters (any method that has them gets them).
_SHARED_OPTIONS = ("align", "align_quantiles", "placement", "fairness")


class NoSensitiveFeaturesWarning(UserWarning):
    """``fit`` was called without ``sensitive_features``: every sample is treated as one group."""


class _NetworkClassifier(ClassifierMixin, BaseEstimator):
    """What the package's estimators share once fitted: a torch network ``model_`` trained by ``method_``
    on standardized features, scored without the protected attribute. Binary only."""

    def decision_function(self, X: Any) -> np.ndarray:
        """The logit of the positive class ``classes_[1]``; no protected attribute needed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,)
            Logits (float64). ``predict`` may cut the probability at a threshold other than 0.5 (see the
            estimator's ``predict``).
        """
        return _network_logits(self, X)

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
        return _probabilities(self.decision_function(X))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


class GroupMixNormClassifier(_NetworkClassifier):
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
        self.classes_, y_index = _binary_labels(y)
        self.groups_, groups = _encode_sensitive(sensitive_features, len(y))
        self.method_ = self._make_method()
        self._mean, self._scale = _standardization(X, self.standardize)
        features = torch.as_tensor((X - self._mean) / self._scale, dtype=torch.float32)
        batch = Batch(features, torch.as_tensor(y_index, dtype=torch.float32), torch.as_tensor(groups))
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with torch_threads(self.threads):
            self.model_, self.history_ = _train_network(self.method_, batch, len(self.groups_), self._config(seed))
        return self

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

    def _make_method(self) -> Method:
        if self.method not in METHODS or METHODS[self.method].fitted_outside_loop:
            known = sorted(name for name, cls in METHODS.items() if not cls.fitted_outside_loop)
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
    """Build ``method``'s model as the loop does (:func:`~groupmixnorm.training.prepare.prepare`) and train it for
    ``config.epochs`` epochs with the loop's own epoch step.

    The global torch random state is restored afterwards (the seed decides weights, mixing and batches).
    """
    with torch.random.fork_rng(devices=[]):
        run = prepare(method, ModelSpec(batch.x.shape[1], num_groups, config.hidden), config)
        history = [
            {"epoch": epoch, **train_one_epoch(method, run.trained, run.optimizer, batch, config, run.generator, epoch)}
            for epoch in range(config.epochs)
        ]
    # float64 for prediction: float32 sums would differ in the last bits with the number of rows scored.
    return run.model.double().eval(), history


def _binary_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two classes (sorted) and each label's index in them; ``ValueError`` for any other target."""
    check_classification_targets(y)
    target = type_of_target(y, input_name="y")
    if target != "binary":
        raise ValueError(f"Only binary classification is supported. The type of the target is {target}.")
    classes, index = np.unique(y, return_inverse=True)
    if len(classes) != 2:
        raise ValueError(f"y has one class ({classes[0]!r}); a binary classifier needs two classes")
    return classes, index


def _network_logits(estimator: Any, X: Any) -> np.ndarray:
    """Logits (float64) of a fitted estimator's ``model_`` on ``X``, standardized as in its ``fit``."""
    check_is_fitted(estimator)
    X = validate_data(estimator, X, reset=False, dtype=[np.float64, np.float32])
    features = torch.as_tensor((X - estimator._mean) / estimator._scale, dtype=torch.float64)
    estimator.model_.eval()
    with torch.no_grad(), torch_threads(estimator.threads):
        logits = estimator.method_.predict_logits(estimator.model_, features)
    return logits.numpy().astype(np.float64)


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Columns ``1 - p`` and ``p`` for ``p = sigmoid(logits)``."""
    positive = expit(logits)  # in float64, so that ranks match decision_function
    return np.column_stack([1.0 - positive, positive])


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
    names, ids = np.unique(intersect_groups(frame).to_numpy(), return_inverse=True)
    return names, ids.astype(np.int64)


def _standardization(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training means and deviations (constant columns keep a deviation of one); zeros and ones if off."""
    if not standardize:
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    scale = X.std(axis=0)
    return X.mean(axis=0), np.where(scale > 0, scale, 1.0)


class NoFeasibleModelError(constraint.NoFeasibleModel, ValueError):
    """:meth:`FairSearchCV.fit` found no candidate that meets every bound on validation.

    The message is one line naming the closest candidate; ``cv_results`` holds every trial, as
    ``FairSearchCV.cv_results_`` would have.
    """

    def __init__(self, message: str, cv_results: dict[str, np.ndarray]) -> None:
        super().__init__(message)
        self.cv_results = cv_results


class FairSearchCV(_NetworkClassifier):
    """The most accurate model whose validation fairness gaps meet given bounds (``train --max-gap``).

    ``fit`` holds out a validation part of the rows (stratified by group and label), then runs the command
    line's constrained search (:func:`groupmixnorm.experiments.constraint.search`): each candidate method's
    fairness knob is searched by a seeded Optuna sampler, ``budget`` trials per method, and for each trial
    one global decision threshold is chosen on validation. A trial is feasible when, for every bound, the
    upper end of the 95 % stratified bootstrap interval of its validation gap is at most the bound, and an
    exact one-sided sign test says its validation decisions beat the majority class (p < 0.025). The
    feasible trial with the best validation ``select`` is kept; prediction needs no protected attribute.

    Parameters
    ----------
    max_gap : dict of str to float
        Bounds on validation gaps, such as ``{"dp_gap_hard": 0.05}``: any of
        :data:`~groupmixnorm.experiments.constraint.GAP_METRICS`, each bound in [0, 1].
    methods : "auto", str or sequence of str, default="auto"
        Candidate methods; ``"auto"`` is every torch-trained method that predicts without the protected
        attribute (:func:`~groupmixnorm.experiments.constraint.auto_methods`). Methods that have a
        ``fairness`` option aim at equal opportunity / equalized odds when every bound is on an ``eopp`` or
        ``eodds`` gap, else at demographic parity.
    budget : int, default=20
        Trials per method (a method without a knob, ``erm``, trains once).
    select : {"accuracy", "ap"}, default="accuracy"
        What the search maximises on validation among the feasible trials: the accuracy of the decisions
        at each trial's threshold, or the threshold-free AP.
    val_fraction : float, default=0.25
        Share of the rows held out for validation: the knobs, thresholds and feasibility are decided there,
        and the model trains on the rest.
    cross_fit : "auto" or int, default="auto"
        Folds over all the rows, each trial judged on its out-of-fold scores (one model per fold) rather
        than on the validation part alone; the chosen setting then trains on the training part, and
        ``threshold_`` accepts the share of all the rows that its out-of-fold decisions accepted.
        1: never; ``"auto"``: 5 when the validation part has a group of fewer than 100 rows, whose gaps it
        could not certify.
    hidden : tuple of int, default=(64, 64)
        Widths of the hidden layers.
    epochs : int, default=20
        Epochs per trial; each trial keeps its epoch of best validation AP.
    iterations : int or None, default=None
        Batches per epoch (``None``: one pass over the training part).
    batch_size : int, default=128
        Samples per batch (per group, or per group and label, for the group-balanced methods).
    lr : float, default=1e-3
        Adam's learning rate.
    weight_decay : float, default=0.0
        Adam's weight decay.
    standardize : bool, default=True
        Standardize each feature with the training part's mean and deviation before the network.
    random_state : int, RandomState instance or None, default=0
        Seed of the validation split, the sampler, the bootstrap and every trial's training. Fitting does
        not touch the global random state of Python, numpy or torch.
    threads : int or None, default=1
        Torch threads for ``fit`` and prediction, restored afterwards (``None`` keeps torch's setting).
    n_jobs : int or None, default=None
        Worker processes that train the trials, one method's trials each at a time (``None`` or 1: this
        process; -1: as many as the machine's cores, less one for this process when there are more than two).
        The result is the same for any value; each worker uses ``threads`` torch threads (1 when ``None``).

    Attributes
    ----------
    best_method_ : str
        The chosen method.
    best_params_ : dict
        The chosen knob value by the knob's name (none for ``erm``), and ``"threshold"``.
    threshold_ : float
        The chosen global decision threshold on the probability of ``classes_[1]``.
    best_score_ : float
        The chosen trial's validation ``select``.
    best_index_ : int
        The chosen trial's index in ``cv_results_``.
    cv_results_ : dict of str to ndarray
        One entry per trial: ``method``, ``knob`` (empty for none), ``value``, ``threshold``, ``val_ap``,
        ``val_accuracy``, ``val_<gap>`` and ``val_<gap>_upper`` (the bootstrap upper end) for each bounded
        gap, ``feasible``, ``seconds`` and ``chosen``. ``value`` is NaN for a method without a knob. The
        ``val_`` numbers are out-of-fold when the search cross-fitted.
    n_splits_ : int
        The folds the search cross-fitted (1: none, the validation part decided).
    search_seconds_ : float
        Wall time of the search.
    classes_ : ndarray of shape (2,)
        The two labels; ``classes_[1]`` is the positive class.
    groups_ : ndarray
        The protected groups seen in ``fit`` (sorted; several columns are joined with ``" & "``).
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names seen in ``fit``, when ``X`` had string column names.
    model_ : torch.nn.Module
        The chosen network, in evaluation mode and in float64.
    method_ : groupmixnorm.methods.Method
        The method object that trained it.

    Raises
    ------
    NoFeasibleModelError
        From ``fit``, when no trial met every bound.

    Examples
    --------
    ::

        from groupmixnorm.sklearn import FairSearchCV

        search = FairSearchCV({"dp_gap_hard": 0.05}, methods=["gmn", "gapreg"], budget=10)
        search.fit(X_train, y_train, sensitive_features=sex_train)
        search.best_method_, search.best_params_   # e.g. ("gmn", {"align": 3.1, "threshold": 0.45})
        predicted = search.predict(X_test)          # no protected attribute at prediction

    In a ``Pipeline``, pass ``sensitive_features`` as ``fairsearchcv__sensitive_features``, or enable metadata
    routing and call ``set_fit_request(sensitive_features=True)`` on this step.
    """

    def __init__(
        self,
        max_gap: dict[str, float],
        *,
        methods: str | Sequence[str] = "auto",
        budget: int = 20,
        select: str = "accuracy",
        val_fraction: float = 0.25,
        cross_fit: int | str = "auto",
        hidden: tuple[int, ...] = (64, 64),
        epochs: int = 20,
        iterations: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        standardize: bool = True,
        random_state: int | np.random.RandomState | None = 0,
        threads: int | None = TABULAR_THREADS,
        n_jobs: int | None = None,
    ) -> None:
        self.max_gap = max_gap
        self.methods = methods
        self.budget = budget
        self.select = select
        self.val_fraction = val_fraction
        self.cross_fit = cross_fit
        self.hidden = hidden
        self.epochs = epochs
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.random_state = random_state
        self.threads = threads
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any, *, sensitive_features: Any = None) -> FairSearchCV:
        """Run the search and keep the best feasible model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Numeric features.
        y : array-like of shape (n_samples,)
            Binary labels of any type.
        sensitive_features : array-like of shape (n_samples,) or (n_samples, n_columns)
            The protected attribute the bounds are about (required); several columns are combined into
            intersectional groups.

        Returns
        -------
        self : FairSearchCV
            The fitted estimator.

        Raises
        ------
        NoFeasibleModelError
            When no trial met every bound on validation.
        """
        bounds = _check_max_gap(self.max_gap)
        methods = _candidate_methods(self.methods, bounds)
        if sensitive_features is None:
            raise ValueError("FairSearchCV.fit needs sensitive_features: max_gap bounds the gaps between its groups")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        classes, y_index = _binary_labels(y)
        group_names, groups = _encode_sensitive(sensitive_features, len(y))
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        data, standardization = self._search_data(X, y_index, groups, group_names, seed)
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, iterations=self.iterations, lr=self.lr,
                             weight_decay=self.weight_decay, hidden=tuple(int(width) for width in self.hidden),
                             seed=seed, select="ap")
        with torch_threads(self.threads), _global_random_state_kept(), self._executor() as executor:
            result = constraint.search(data, methods, bounds, config=config, budget=self.budget, select=self.select,
                                       executor=executor, cross_fit=self.cross_fit)
        table = constraint.front_table(result.trials, bounds, result.chosen)
        table["value"] = table["value"].astype(float)  # NaN, not None, for a method without a knob
        cv_results = {str(column): table[column].to_numpy() for column in table.columns}
        if result.chosen is None:
            for name in [key for key in vars(self) if key.endswith("_")]:  # no stale model of an earlier fit
                delattr(self, name)
            raise NoFeasibleModelError(constraint.closest_message(result.trials, bounds, result.judged_on,
                                                                       result.folds), cv_results)
        self._keep(result, cv_results, classes, group_names)
        self._mean, self._scale = standardization
        return self

    def predict(self, X: Any) -> np.ndarray:
        """``classes_[1]`` where its probability is at least ``threshold_``, the threshold chosen on
        validation; no protected attribute needed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        positive = self.predict_proba(X)[:, 1] >= self.threshold_
        return self.classes_[positive.astype(int)]

    def _executor(self) -> Any:
        from groupmixnorm.experiments.executors import default_workers, executor_for

        jobs = self.n_jobs
        if jobs is not None and jobs != -1 and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise ValueError(f"n_jobs must be None, -1 or a whole number of at least 1, got {jobs!r}")
        return executor_for(default_workers() if jobs == -1 else jobs, threads=self.threads or 1)

    def __sklearn_is_fitted__(self) -> bool:
        # A fit that found no feasible model has set n_features_in_ but no model.
        return hasattr(self, "model_")

    def _search_data(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, names: np.ndarray,
                     seed: int) -> tuple[TabularDataset, tuple[np.ndarray, np.ndarray]]:
        """Training and validation parts as a dataset for the search, and the training part's standardization.

        The search never reads the test split (it hands the loop the validation split in its place), so the
        validation part stands in there too.
        """
        train_rows, val_rows = stratified_holdout(np.arange(len(y)), self.val_fraction, seed, y, groups)
        mean, scale = _standardization(X[train_rows], self.standardize)

        def part(rows: np.ndarray) -> Split:
            return Split(((X[rows] - mean) / scale).astype(np.float32), y[rows].astype(np.int64), groups[rows])

        val = part(val_rows)
        features = getattr(self, "feature_names_in_", [f"x{index}" for index in range(X.shape[1])])
        data = TabularDataset(name="FairSearchCV", train=part(train_rows), val=val, test=val,
                              feature_names=[str(name) for name in features], sensitive="sensitive_features",
                              group_names=[str(name) for name in names],
                              protocol=f"validation holdout of {self.val_fraction:g}", preprocessor=None)
        return data, (mean, scale)

    def _keep(self, result: constraint.SearchResult, cv_results: dict[str, np.ndarray], classes: np.ndarray,
              groups: np.ndarray) -> None:
        """Set the fitted attributes from a search with a feasible choice."""
        chosen = result.chosen
        assert chosen is not None
        self.best_method_ = chosen.method
        self.threshold_ = float(result.threshold)
        self.best_params_ = {**({} if chosen.knob is None else {chosen.knob: chosen.value}),
                             "threshold": self.threshold_}
        self.best_score_ = chosen.choice.objective(self.select)
        self.best_index_ = int(np.flatnonzero(cv_results["chosen"])[0])
        self.cv_results_ = cv_results
        self.search_seconds_ = result.seconds
        self.n_splits_ = result.folds
        self.classes_, self.groups_ = classes, groups
        self.method_ = result.method
        # float64 for prediction, as GroupMixNormClassifier's, so a row's score does not depend on the batch.
        self.model_ = result.model.double().eval()


def _check_max_gap(max_gap: Any) -> dict[str, float]:
    """``max_gap`` as a dict of gap names to bounds; ``ValueError`` naming the first bad entry."""
    if not isinstance(max_gap, Mapping) or not max_gap:
        raise ValueError(f"max_gap must be a non-empty dict of gap metric to bound, such as "
                         f"{{'dp_gap_hard': 0.05}}, got {max_gap!r}")
    bounds = {}
    for name, bound in max_gap.items():
        try:
            bounds[name] = constraint.check_bound(name, bound)
        except ValueError as error:
            raise ValueError(f"max_gap[{name!r}]: {error}") from None
    return bounds


def _candidate_methods(methods: str | Sequence[str], bounds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The search's candidates with their fixed options, as the command line's ``--methods``."""
    allowed = constraint.auto_methods()
    names = allowed if methods == "auto" else [methods] if isinstance(methods, str) else list(methods)
    refused = [name for name in names if name not in allowed]
    if refused or not names:
        raise ValueError(f"methods must be 'auto' or names among {allowed} (torch-trained, predicting without the "
                         f"protected attribute), got {methods!r}")
    return {name: constraint.candidate_options(name, bounds) for name in dict.fromkeys(names)}


@contextmanager
def _global_random_state_kept() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random states after the block (the search seeds them)."""
    python, legacy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(legacy)


__all__ = ["FairSearchCV", "GroupMixNormClassifier", "NoFeasibleModelError", "NoSensitiveFeaturesWarning"]

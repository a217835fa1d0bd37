"""Fair by constraint: the most accurate model whose validation gaps meet the user's bounds.

For each candidate method, its fairness knob is searched on the **validation** split by a seeded Optuna TPE
sampler (log scale, ranges in :data:`KNOBS`), every method with the same number of trials. For each trial the
decision threshold, one global value that needs no protected attribute, is chosen on validation among
:data:`THRESHOLDS`. A trial is *feasible* when, for every bound, the upper end of the stratified bootstrap
interval (95 %, seeded) of its validation gap is at most the bound, and an exact sign test says its
decisions beat the majority class (:func:`choose_threshold`): margins that account for validation
noise, and a decision that is surely of use. The feasible trial with the best validation objective (by
default accuracy, the decisions' own; or AP) is chosen; only then,
and only for it, is the test split scored (:func:`score_test`). During the search the training loop is
handed the validation split in place of the test split, so no test row is seen before the choice.

A small validation split cannot certify a bound: on German credit's 200 rows, whose smallest group has 38,
a gap's bootstrap interval is some 0.15 wide. Such a search is *cross-fitted* (:func:`resolve_folds`): each
trial trains one model per fold of the training and validation rows together, and its threshold and
feasibility are decided on the out-of-fold scores of all of them. The chosen setting is then trained once
more, on the training split with early stopping on validation, and decides at the score that accepts the
share of the pooled rows its out-of-fold decisions accepted (:func:`threshold_at_share`): models trained apart
put their scores on different scales, so a share transfers where a score does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from groupmixnorm.metrics import fairness_report
from groupmixnorm.metrics.distribution import abcc, dp_ks, eodds_ks
from groupmixnorm.metrics.fairness import (
    accuracy, average_precision, dp_gap, dp_gap_hard, eodds_gap, eodds_gap_hard, eopp_gap, eopp_gap_hard,
)
from groupmixnorm.metrics.sanity import beats_majority_pvalue, majority_accuracy, useless_model_warnings
from groupmixnorm.metrics.uncertainty import Interval, bootstrap_interval

#: The gaps a bound may name: the soft, thresholded and threshold-free gaps of
#: :func:`~groupmixnorm.metrics.fairness_report` (lower is fairer; ``dp_ratio`` is a ratio, not a gap).
GAP_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, float], float]] = {
    "dp_gap": lambda y, s, g, t: dp_gap(s, g),
    "eopp_gap": lambda y, s, g, t: eopp_gap(y, s, g),
    "eodds_gap": lambda y, s, g, t: eodds_gap(y, s, g),
    "dp_gap_hard": lambda y, s, g, t: dp_gap_hard(s, g, t),
    "eopp_gap_hard": lambda y, s, g, t: eopp_gap_hard(y, s, g, t),
    "eodds_gap_hard": lambda y, s, g, t: eodds_gap_hard(y, s, g, t),
    "dp_ks": lambda y, s, g, t: dp_ks(s, g),
    "eodds_ks": lambda y, s, g, t: eodds_ks(y, s, g),
    "abcc": lambda y, s, g, t: abcc(s, g),
}
#: The gaps that depend on the decision threshold.
THRESHOLDED = frozenset({"dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard"})
#: What the search may maximise on validation.
OBJECTIVES = ("ap", "accuracy")
#: The global decision thresholds tried for every trial.
THRESHOLDS = tuple(round(value, 2) for value in np.arange(0.05, 0.951, 0.05))
#: Bootstrap settings of the feasibility rule and of the reported intervals.
RESAMPLES, CONFIDENCE = 200, 0.95


@dataclass(frozen=True)
class Knob:
    """A method's fairness option and the range its search covers (log scale)."""

    name: str
    low: float
    high: float


#: The searched knob of each method; a method not listed (erm) has none and trains once.
KNOBS = {
    "gmn": Knob("align", 0.1, 30.0),
    "scorematch": Knob("lam", 0.1, 30.0),
    "gapreg": Knob("lam", 0.1, 30.0),
    "fairmixup": Knob("lam", 0.1, 30.0),
    "adversarial": Knob("lam", 0.03, 10.0),
    "hsic": Knob("lam", 1.0, 300.0),
    "prem": Knob("lam", 0.3, 100.0),
    "fairret": Knob("lam", 0.03, 10.0),
    "expgrad": Knob("eps", 0.002, 0.1),  # a bound on the violation: smaller is fairer
}


#: A search whose validation split has a group of fewer rows than this is cross-fitted by default.
SMALL_GROUP_ROWS = 100
#: The folds of a cross-fitted search, unless the user names another number.
CROSS_FIT_FOLDS = 5


class NoFeasibleModel(RuntimeError):
    """No trial met every bound on validation; the message names the closest one."""


# ----------------------------------------------------------------------------------------------- the bounds


def parse_bound(text: str) -> tuple[str, float]:
    """``"dp_gap_hard=0.05"`` as ``("dp_gap_hard", 0.05)``; ``ValueError`` names what is wrong."""
    name, sign, value = text.partition("=")
    name = name.strip()
    if not sign or not name or not value.strip():
        raise ValueError(f"--max-gap takes METRIC=BOUND, such as dp_gap_hard=0.05, got {text!r}")
    try:
        return name, check_bound(name, value.strip())
    except ValueError as error:
        raise ValueError(f"--max-gap {text!r}: {error}") from None


def check_bound(name: str, bound: Any) -> float:
    """``bound`` as a float; ``ValueError`` if ``name`` is not one of :data:`GAP_METRICS` or the bound is
    not a number in [0, 1]."""
    if name not in GAP_METRICS:
        raise ValueError(f"{name!r} is not a gap metric; choose from {', '.join(GAP_METRICS)}")
    try:
        value = float(bound)
    except (TypeError, ValueError):
        raise ValueError(f"the bound {bound!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"the bound must be in [0, 1], got {bound}")
    return value


def parse_bounds(texts: Sequence[str]) -> dict[str, float]:
    """Every ``--max-gap``; naming one metric twice is an error rather than a silent choice."""
    bounds: dict[str, float] = {}
    for text in texts:
        name, bound = parse_bound(text)
        if name in bounds:
            raise ValueError(f"--max-gap names {name} twice ({bounds[name]} and {bound}); give one bound per metric")
        bounds[name] = bound
    return bounds


def target_fairness(bounds: Mapping[str, float]) -> str:
    """What the methods should aim at: ``"eo"`` when every bound is on an equal-opportunity or equalized-odds
    gap, else ``"dp"``."""
    return "eo" if all(name.startswith(("eopp", "eodds")) for name in bounds) else "dp"


def auto_methods() -> list[str]:
    """The methods ``--methods auto`` searches: those that need no protected attribute at prediction and whose
    models can be saved (those fitted outside the loop cannot), with their default options."""
    from groupmixnorm.methods import METHODS

    return [name for name, cls in sorted(METHODS.items())
            if not cls.fitted_outside_loop and not cls().uses_sensitive_at_prediction()]


def candidate_options(name: str, bounds: Mapping[str, float], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fixed options of candidate method ``name``: the fairness the bounds ask for
    (:func:`target_fairness`) where the method has that option, then the ``given`` ones."""
    from groupmixnorm.methods import METHODS
    from groupmixnorm.methods.base import method_fields

    fields = {item.name for item in method_fields(METHODS[name])}
    return {**({"fairness": target_fairness(bounds)} if "fairness" in fields else {}), **(given or {})}


# ------------------------------------------------------------------------------------------- feasibility


def gap_interval(name: str, y: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, *,
                 seed: int, resamples: int = RESAMPLES) -> Interval:
    """Stratified bootstrap interval of one gap at ``threshold``."""
    metric = GAP_METRICS[name]
    return bootstrap_interval(lambda a, b, c: metric(a, b, c, threshold), y, scores, groups, resamples=resamples,
                              confidence=CONFIDENCE, seed=seed)


#: The name of the usefulness condition among a trial's constraints (beside one per bound).
BEATS_MAJORITY = "beats_majority"
#: The one-sided level of the usefulness test: that of the two-sided interval's lower end.
USEFUL_LEVEL = (1.0 - CONFIDENCE) / 2
#: How a cross-fitted search makes its model, in words (the bench's records name it).
CROSS_FIT_REFIT = ("the chosen setting trained on the training split with early stopping on validation, deciding at "
                   "the score that accepts the share of the training and validation rows its out-of-fold decisions "
                   "accepted")
#: The feasibility rule, in words: what ``metrics.json`` and the bench records say was applied.
FEASIBILITY = (f"every bound >= the upper end of the {CONFIDENCE:.0%} stratified bootstrap interval of the "
               f"validation gap, and the one-sided exact sign test of validation accuracy against the majority "
               f"class below {USEFUL_LEVEL:.3g}")


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold of one trial, its validation numbers and whether it meets the bounds.

    ``upper`` holds each bounded gap's interval upper end, ``majority_p`` the p-value of "no more accurate
    than the majority class" (:func:`~groupmixnorm.metrics.sanity.beats_majority_pvalue`) and ``majority``
    the validation accuracy of predicting the more common label for everyone.
    """

    threshold: float
    ap: float
    accuracy: float
    gaps: dict[str, float]
    upper: dict[str, float]
    majority_p: float
    majority: float
    feasible: bool

    def objective(self, select: str) -> float:
        """The validation number the search maximises: ``"ap"`` or ``"accuracy"``."""
        return self.ap if select == "ap" else self.accuracy

    def excess(self, bounds: Mapping[str, float]) -> dict[str, float]:
        """How far each condition is from being met (<= 0 where met, as Optuna counts constraints): each
        gap's upper end minus its bound, and the usefulness test's p-value minus its level."""
        return {**{name: self.upper[name] - bound for name, bound in bounds.items()},
                BEATS_MAJORITY: self.majority_p - USEFUL_LEVEL}


def choose_threshold(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, bounds: Mapping[str, float], *,
                     seed: int, thresholds: Sequence[float] = THRESHOLDS) -> ThresholdChoice:
    """The most accurate threshold of ``thresholds`` that meets the bounds on validation and decides
    better than the majority class.

    A threshold is feasible when the upper end of every bounded gap's bootstrap interval is at most its
    bound and an exact sign test says its decisions beat the majority class (p below :data:`USEFUL_LEVEL`):
    a decision that is not surely better than predicting the common label for everyone meets a
    thresholded gap by deciding (almost) nothing, which is no model at all. (A bootstrap interval of the
    accuracy is no test here: a decision that departs from the majority class on four rows, all right,
    has a lower end above the majority's, though four fair coins all land heads once in sixteen.)

    Thresholds are tried from the most accurate down; those whose point gaps already exceed a bound, or
    that are not useful, are skipped. If none is feasible, the one whose largest excess
    (:meth:`ThresholdChoice.excess`) is smallest is returned, marked infeasible; thresholds whose point
    accuracy beats the majority class come first (deciding nothing sits near every bound but is no nearer
    a model of use). AP does not depend on the threshold, nor do the threshold-free gaps: those are
    bootstrapped once, first, and if one misses its bound no threshold is feasible.
    """
    ap = average_precision(y, scores)
    majority = majority_accuracy(float(np.mean(y)))
    pvalues = {t: beats_majority_pvalue(y, scores, t) for t in thresholds}
    rows = [(t, accuracy(y, scores, t), {name: GAP_METRICS[name](y, scores, groups, t) for name in bounds})
            for t in thresholds]
    cache: dict[tuple[str, float], float] = {}

    def upper(name: str, t: float) -> float:
        key = (name, t if name in THRESHOLDED else -1.0)
        if key not in cache:
            cache[key] = gap_interval(name, y, scores, groups, t, seed=seed).high
        return cache[key]

    def choice(t: float, acc: float, gaps: dict[str, float], feasible: bool) -> ThresholdChoice:
        return ThresholdChoice(t, ap, acc, gaps, {name: upper(name, t) for name in bounds}, pvalues[t], majority,
                               feasible)

    free = [name for name in bounds if name not in THRESHOLDED]
    if all(upper(name, 0.5) <= bounds[name] for name in free):
        for t, acc, gaps in sorted(rows, key=lambda row: -row[1]):  # stable: ties keep the grid's order
            if pvalues[t] < USEFUL_LEVEL and all(gaps[name] <= bound for name, bound in bounds.items()) and \
                    all(upper(name, t) <= bounds[name] for name in bounds if name in THRESHOLDED):
                return choice(t, acc, gaps, True)

    def distance(row: tuple[float, float, dict[str, float]]) -> tuple[bool, float, float]:
        t, acc, gaps = row
        return acc <= majority, max(*(gaps[n] - b for n, b in bounds.items()), pvalues[t] - USEFUL_LEVEL), -acc

    return choice(*min(rows, key=distance), False)


# ------------------------------------------------------------------------------------------ cross-fitting


def resolve_folds(data: Any, folds: int | str = "auto") -> int:
    """How many folds a search over ``data`` cross-fits: ``folds`` itself when it is a number (1: none, the
    validation split decides), or for ``"auto"`` :data:`CROSS_FIT_FOLDS` when a group present in the
    validation split has fewer than :data:`SMALL_GROUP_ROWS` rows there, else 1."""
    if folds == "auto":
        return CROSS_FIT_FOLDS if smallest_group_rows(data.val) < SMALL_GROUP_ROWS else 1
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 1:
        raise ValueError(f"cross-fitting takes 'auto' or a whole number of folds (1: none), got {folds!r}")
    return int(folds)


def smallest_group_rows(split: Any) -> int:
    """The rows of ``split``'s smallest group (of those present in it)."""
    return int(np.unique(split.a, return_counts=True)[1].min())


def pooled_rows(data: Any) -> Any:
    """The training and validation splits as one, in that order: the rows a cross-fitted search decides on."""
    from groupmixnorm.data.tabular import Split

    return Split(*(np.concatenate([getattr(data.train, name), getattr(data.val, name)]) for name in ("X", "y", "a")))


@dataclass(frozen=True)
class CrossFit:
    """The folds of a cross-fitted search: ``fold[i]`` is the fold that scores row ``i`` of
    :func:`pooled_rows`; its model trains on every other fold."""

    fold: np.ndarray

    @property
    def folds(self) -> int:
        return int(self.fold.max()) + 1

    @classmethod
    def of(cls, data: Any, folds: int, seed: int) -> CrossFit:
        """``folds`` folds of ``data``'s training and validation rows, stratified by label and group (seeded);
        ``ValueError`` naming a (group, label) cell with fewer rows than folds, which some fold would lack."""
        from sklearn.model_selection import StratifiedKFold

        rows = pooled_rows(data)
        cells = rows.y * data.num_groups + rows.a
        present, counts = np.unique(cells, return_counts=True)
        for cell, count in zip(present, counts):
            if count < folds:
                group, label = data.group_names[int(cell % data.num_groups)], int(cell // data.num_groups)
                raise ValueError(f"cannot cross-fit {folds} folds: group {group!r} with label {label} has {count} rows "
                                 "in the training and validation splits together, fewer than the folds")
        fold = np.empty(len(rows), dtype=np.int64)
        for number, (_, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed)
                                           .split(rows.X, cells)):
            fold[held] = number
        return cls(fold)

    def scores(self, name: str, options: dict[str, Any], data: Any, config: Any, rows: Any) -> OutOfFold:
        """Out-of-fold scores of method ``name`` with ``options`` for every row of ``rows``
        (:func:`pooled_rows` of ``data``): one model per fold, trained on the other folds with early
        stopping on its own."""
        from groupmixnorm.data.tabular import Split
        from groupmixnorm.methods import make_method

        scores = np.empty(len(rows), dtype=np.float64)
        epochs = []
        for number in range(self.folds):
            held = self.fold == number
            part = dataclasses.replace(data, train=Split(rows.X[~held], rows.y[~held], rows.a[~held]),
                                       val=Split(rows.X[held], rows.y[held], rows.a[held]))
            fitted = fit_candidate(make_method(name, **options), part, config)
            scores[held] = fitted.scorer(part.val)
            epochs.append(fitted.epochs)
        return OutOfFold(scores, tuple(epochs))


class OutOfFold(NamedTuple):
    """A cross-fitted trial's scores of the pooled rows, each from the fold model that did not train on it,
    and the epochs each fold model trained up to the one its early stopping kept."""

    scores: np.ndarray
    epochs: tuple[int, ...]


def rate_threshold(scores: np.ndarray, acceptance: float) -> float:
    """The threshold at which ``score >= threshold`` accepts the share ``acceptance`` of ``scores`` (the
    nearest whole number of rows; a threshold above every score when that is none)."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))
    accepted = int(round(acceptance * len(ranked)))
    if accepted == 0:
        return float(np.nextafter(ranked[-1], np.inf))
    return float(ranked[len(ranked) - accepted])


def threshold_at_share(data: Any, judged: OutOfFold, threshold: float, fitted: Candidate) -> float:
    """The threshold of a cross-fitted choice's model ``fitted`` (the chosen setting trained by
    :func:`fit_candidate` on ``data``'s training split): the score at which it accepts the same share of the
    pooled rows as the trial's out-of-fold decisions at ``threshold`` did. A share, not the score: models
    trained apart put their scores on different scales, while the share of the pooled rows is what the
    out-of-fold numbers certified. benchmarks/cross_fit_refit.py measured this rule against the trial's
    score and against a model trained on all the pooled rows: it missed the bound on test least often."""
    acceptance = float(np.mean(judged.scores >= threshold))
    return rate_threshold(fitted.scorer(pooled_rows(data)), acceptance)


# ------------------------------------------------------------------------------------------------ trials


Scorer = Callable[[Any], np.ndarray]


@dataclass
class Trial:
    """One trained candidate: method, knob value, chosen threshold and validation numbers."""

    method: str
    knob: str | None
    value: float | None
    choice: ThresholdChoice
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.choice.feasible

    def row(self, bounds: Mapping[str, float]) -> dict[str, Any]:
        """This trial as a row of ``front.csv``."""
        row: dict[str, Any] = {"method": self.method, "knob": self.knob or "", "value": self.value,
                               "threshold": self.choice.threshold, "val_ap": self.choice.ap,
                               "val_accuracy": self.choice.accuracy, "val_majority_p": self.choice.majority_p,
                               "val_majority_accuracy": self.choice.majority}
        for name in bounds:
            row[f"val_{name}"] = self.choice.gaps[name]
            row[f"val_{name}_upper"] = self.choice.upper[name]
        row.update(feasible=self.feasible, seconds=self.seconds)
        return row


class Candidate(NamedTuple):
    """A trained candidate: a scorer of any split, the torch model (``None`` for a method fitted outside the
    loop) and the epochs trained up to the one kept (1 for a method fitted outside the loop)."""

    scorer: Scorer
    model: Any
    epochs: int


def fit_candidate(method: Any, data: Any, config: Any) -> Candidate:
    """Train ``method`` with the loop's early stopping on validation AP, never showing it the test split
    (the loop scores its "test" split at the end: it is handed the validation split there)."""
    from groupmixnorm.data.tabular import check_splits
    from groupmixnorm.training import train
    from groupmixnorm.training.loop import evaluate, seed_everything, to_tensors

    masked = dataclasses.replace(data, test=data.val)
    check_splits(masked)
    seed_everything(config.seed)
    outside = method.fit_outside_loop(masked, config)
    if outside is not None:
        return Candidate(lambda split: np.asarray(outside(split.X, split.a), dtype=np.float64), None, 1)
    result = train(method, masked, config)
    model = result.model
    return Candidate(lambda split: evaluate(method, model, to_tensors(split, config.device))[1], model,
                     result.selected_epoch + 1)


@dataclass
class SearchResult:
    """Every trial, the chosen one (``None`` if none was feasible), its scorer, method and model, the search
    time, the folds it cross-fitted (1: none), the rows its trials were judged on (the validation split,
    or the training and validation rows of a cross-fitted search) with the chosen trial's scores of them,
    the threshold the returned model decides at (the chosen trial's; for a cross-fitted search the one
    :func:`threshold_at_share` transfers) and, for a cross-fitted search, the epochs each fold model kept."""

    trials: list[Trial]
    chosen: Trial | None
    scorer: Scorer | None
    method: Any
    model: Any
    seconds: float
    folds: int = 1
    judged_on: Any = None
    judged_scores: np.ndarray | None = None
    threshold: float | None = None
    fold_epochs: tuple[int, ...] | None = None


def search(
    data: Any,
    methods: Mapping[str, dict[str, Any]],
    bounds: Mapping[str, float],
    *,
    config: Any,
    budget: int,
    select: str = "accuracy",
    on_trial: Callable[[Trial, Trial | None], None] | None = None,
    executor: Any = None,
    cross_fit: int | str = "auto",
) -> SearchResult:
    """Search each method's knob (``budget`` trials per method; one for a method without a knob) and pick
    the feasible trial with the best validation ``select``. ``methods`` maps names to fixed options.
    ``on_trial(trial, best_so_far)`` is called after every trial.

    Each method's search is sequential TPE seeded by ``config.seed``. ``executor`` (see
    :mod:`~groupmixnorm.experiments.executors`; default this process) runs the trials: the methods' searches
    side by side, one trial of each at a time, so the trials and the choice are the same whatever runs them
    (ties go to the earlier method and trial). A chosen model trained in another process is trained again
    here, from the same seed, and checked to give the same validation scores.

    ``cross_fit`` is the number of folds (:func:`resolve_folds`; ``"auto"``: 5 when the validation split has
    a group under :data:`SMALL_GROUP_ROWS` rows, else none): each trial is then judged on the out-of-fold
    scores of the training and validation rows (:class:`CrossFit`), and the chosen setting is trained once
    more, on the training split, and decides at the out-of-fold share (:func:`threshold_at_share`).
    """
    import optuna

    from groupmixnorm.experiments.executors import Sequential

    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a whole number of trials, at least 1, got {budget!r}")
    if select not in OBJECTIVES:
        raise ValueError(f"the search maximises one of {OBJECTIVES}, got {select!r}")
    started = time.perf_counter()
    folds = resolve_folds(data, cross_fit)
    crossing = CrossFit.of(data, folds, config.seed) if folds > 1 else None
    run = _Search(data, bounds, config, select, on_trial, crossing)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no log line per trial: the bar shows progress
    try:
        run.search_all(methods, budget, executor or Sequential())
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = [trial for _, trial in sorted(run.done, key=lambda item: item[0])]
    judged_on = data.val if crossing is None else pooled_rows(data)
    result = SearchResult(trials, run.best, None, None, None, 0.0, folds, judged_on)
    if run.fit is not None and run.fit.fitted is not None:
        result.scorer, result.method, result.model = run.fit.fitted
        result.threshold = run.best.choice.threshold if crossing is None else run.threshold
        if crossing is None:
            result.judged_scores = result.scorer(data.val)
        else:
            result.judged_scores = run.fit.out_of_fold.scores
            result.fold_epochs = run.fit.out_of_fold.epochs
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class TrialFit:
    """What one trial's task returns: the threshold chosen on validation, the trial's seconds, a digest of
    its validation scores, (only for a task run in the calling process) its scorer, method and model, and
    (only for a cross-fitted trial) its out-of-fold scores."""

    choice: ThresholdChoice
    seconds: float
    digest: str
    fitted: tuple[Scorer, Any, Any] | None = None
    out_of_fold: OutOfFold | None = None


def fit_trial(data: Any, config: Any, bounds: Mapping[str, float], name: str, options: dict[str, Any],
              keep: bool, crossing: CrossFit | None = None) -> TrialFit:
    """One trial as an executor's task: train method ``name`` with ``options`` (:func:`fit_candidate`) and
    choose its threshold on validation; ``keep`` returns the scorer, method and model too. With
    ``crossing`` the threshold is chosen on the out-of-fold scores instead (:meth:`CrossFit.scores`) and no
    model is kept. ``data`` may be what :meth:`~groupmixnorm.experiments.executors.Executor.share` returned."""
    from groupmixnorm.experiments.executors import shared_value
    from groupmixnorm.methods import make_method

    clock = time.perf_counter()
    data = shared_value(data)
    if crossing is not None:
        rows = pooled_rows(data)
        judged = crossing.scores(name, options, data, config, rows)
        choice = choose_threshold(rows.y, judged.scores, rows.a, bounds, seed=config.seed)
        return TrialFit(choice, time.perf_counter() - clock, _digest(judged.scores), out_of_fold=judged)
    method = make_method(name, **options)
    scorer, model, _ = fit_candidate(method, data, config)
    scores = scorer(data.val)
    choice = choose_threshold(data.val.y, scores, data.val.a, bounds, seed=config.seed)
    return TrialFit(choice, time.perf_counter() - clock, _digest(scores), (scorer, method, model) if keep else None)


def _digest(scores: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float64).tobytes()).hexdigest()


@dataclass
class _Lane:
    """One method's search: its knob and Optuna study (``None`` for a method without a knob), the trials
    asked so far and how many it has, and whether one is running."""

    position: int
    name: str
    options: dict[str, Any]
    knob: Knob | None
    study: Any
    trials: int
    asked: int = 0
    busy: bool = False


class _Search:
    """The state of one search: the trials so far (with their place: method, then trial number) and the
    best feasible one with its fit."""

    def __init__(self, data: Any, bounds: Mapping[str, float], config: Any, select: str,
                 on_trial: Callable[[Trial, Trial | None], None] | None, crossing: CrossFit | None) -> None:
        self.data, self.bounds, self.config, self.select, self.on_trial = data, bounds, config, select, on_trial
        self.crossing = crossing
        self.done: list[tuple[tuple[int, int], Trial]] = []
        self.best: Trial | None = None
        self.fit: TrialFit | None = None
        self.threshold: float | None = None
        self.rank: tuple[float, int, int] | None = None

    def search_all(self, methods: Mapping[str, dict[str, Any]], budget: int, executor: Any) -> None:
        """Every method's trials on ``executor``: a method's next trial is asked once its last one is told."""
        import optuna

        from groupmixnorm.experiments.executors import stream

        lanes = []
        for position, (name, options) in enumerate(methods.items()):
            knob = KNOBS.get(name)
            study = None if knob is None else optuna.create_study(direction="maximize",
                                                                  sampler=_sampler(self.config.seed))
            lanes.append(_Lane(position, name, options, knob, study, 1 if knob is None else budget))
        data = executor.share(self.data)

        def ready(free: int) -> list[tuple[Any, Callable[[], TrialFit]]]:
            idle = [lane for lane in lanes if not lane.busy and lane.asked < lane.trials]
            return [self._ask(lane, data, executor.in_process) for lane in idle[:free]]

        for (lane, asked, value, options), fit in stream(executor, ready):
            self._tell(lane, asked, value, options, fit)
        if self.fit is not None and self.fit.fitted is None:
            self._refit(executor.threads)

    def _ask(self, lane: _Lane, data: Any, keep: bool) -> tuple[Any, Callable[[], TrialFit]]:
        asked = None if lane.study is None else lane.study.ask()
        value = None if asked is None else asked.suggest_float(lane.knob.name, lane.knob.low, lane.knob.high, log=True)
        options = {**lane.options, **({} if lane.knob is None else {lane.knob.name: value})}
        lane.asked, lane.busy = lane.asked + 1, True
        call = functools.partial(fit_trial, data, self.config, dict(self.bounds), lane.name, options, keep,
                                 self.crossing)
        return (lane, asked, value, options), call

    def _tell(self, lane: _Lane, asked: Any, value: float | None, options: dict[str, Any], fit: TrialFit) -> None:
        """Record a finished trial, keep it if it is the best feasible, and tell its study."""
        lane.busy = False
        trial = Trial(lane.name, lane.knob.name if lane.knob else None, value, fit.choice, fit.seconds, options)
        self.done.append(((lane.position, lane.asked), trial))
        rank = (fit.choice.objective(self.select), -lane.position, -lane.asked)
        if trial.feasible and (self.rank is None or rank > self.rank):
            self.best, self.fit, self.rank = trial, fit, rank
        if asked is not None:
            _set_constraints(asked, fit.choice.excess(self.bounds))
            lane.study.tell(asked, fit.choice.objective(self.select))
        if self.on_trial is not None:
            self.on_trial(trial, self.best)

    def _refit(self, threads: int | None) -> None:
        """Train the chosen trial's model in this process: for a cross-fitted trial for the first time, with
        its threshold transferred (:func:`threshold_at_share`); for one that ran elsewhere again, checked to be
        the same model."""
        from groupmixnorm.methods import make_method
        from groupmixnorm.training.threads import torch_threads

        assert self.best is not None and self.fit is not None
        with torch_threads(threads):
            method = make_method(self.best.method, **self.best.options)
            fitted = fit_candidate(method, self.data, self.config)
        scorer, model, _ = fitted
        if self.crossing is not None:
            assert self.fit.out_of_fold is not None
            self.threshold = threshold_at_share(self.data, self.fit.out_of_fold, self.best.choice.threshold, fitted)
        elif _digest(scorer(self.data.val)) != self.fit.digest:
            raise RuntimeError(f"training the chosen trial ({self.best.method}, {self.best.options}) again gave other "
                               "validation scores than its trial did: training is not deterministic here")
        self.fit.fitted = (scorer, method, model)


def _sampler(seed: int) -> Any:
    """A seeded TPE sampler that reads each trial's constraints (optuna 5's ``set_constraint``, or the
    ``constraints_func`` of optuna 4)."""
    import optuna

    if hasattr(optuna.trial.Trial, "set_constraint"):
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=lambda trial: trial.user_attrs["excess"])


def _set_constraints(trial: Any, excess: Mapping[str, float]) -> None:
    """Record ``upper end - bound`` per bound: <= 0 everywhere means feasible, as Optuna counts it."""
    if hasattr(trial, "set_constraint"):
        for name, value in excess.items():
            trial.set_constraint(name, value)
    else:
        trial.set_user_attr("excess", list(excess.values()))


def closest_message(trials: Sequence[Trial], bounds: Mapping[str, float], judged_on: Any = None,
                    folds: int = 1) -> str:
    """The one line for a search without a feasible trial: the trial whose largest excess is smallest (of
    those whose point accuracy beats the majority class, if any), what it misses, and, when its point
    numbers meet every condition but the margins do not, that the rows the trials were ``judged_on``
    (:attr:`SearchResult.judged_on`; when given: their number and smallest group) cannot certify them."""
    closest = min(trials, key=lambda t: (t.choice.accuracy <= t.choice.majority,
                                         max(t.choice.excess(bounds).values())))
    choice = closest.choice
    setting = "" if closest.knob is None else f" {closest.knob}={closest.value:.4g}"
    ends = [f"{n} upper end {choice.upper[n]:.4f} {'>' if choice.upper[n] > b else '<='} {b}"
            for n, b in bounds.items()]
    ends.append(f"accuracy {choice.accuracy:.4f} against the majority class's {choice.majority:.4f}, sign test p "
                f"{choice.majority_p:.3g} {'<' if choice.majority_p < USEFUL_LEVEL else '>='} {USEFUL_LEVEL:.3g}")
    line = (f"no candidate of {len(trials)} met every bound and beat the majority class on validation "
            f"({CONFIDENCE:.0%} bootstrap ends, sign test); closest: {closest.method}{setting} at threshold "
            f"{choice.threshold}: " + ", ".join(ends))
    if all(choice.gaps[n] <= b for n, b in bounds.items()) and choice.accuracy > choice.majority:
        rows = "the validation split" if folds == 1 else f"the {folds}-fold cross-fitted training and validation rows"
        size = "" if judged_on is None else f" ({len(judged_on)} rows, smallest group {smallest_group_rows(judged_on)})"
        line += f"; its point values meet them, but {rows}{size} cannot certify them: more rows or a looser bound could"
    return line


# ------------------------------------------------------------------------------------------------ reporting


def interval_dict(interval: Interval) -> dict[str, float]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def split_report(split: Any, scores: np.ndarray, threshold: float, bounds: Mapping[str, float], *,
                 seed: int) -> dict[str, Any]:
    """A split's metrics at ``threshold``, with bootstrap CIs for AP, accuracy and each bounded gap."""
    y, g = split.y, split.a
    report: dict[str, Any] = {"metrics": fairness_report(y, scores, g, threshold)}
    intervals = {
        "ap": bootstrap_interval(lambda a, s, c: average_precision(a, s), y, scores, g, resamples=RESAMPLES,
                                 confidence=CONFIDENCE, seed=seed),
        "accuracy": bootstrap_interval(lambda a, s, c: accuracy(a, s, threshold), y, scores, g,
                                       resamples=RESAMPLES, confidence=CONFIDENCE, seed=seed),
        **{name: gap_interval(name, y, scores, g, threshold, seed=seed) for name in bounds},
    }
    report["intervals"] = {name: interval_dict(value) for name, value in intervals.items()}
    return report


def score_test(result: SearchResult, data: Any, bounds: Mapping[str, float], *, seed: int) -> dict[str, Any]:
    """Score the test split once, for the chosen model only; says whether each bound held on test."""
    assert result.chosen is not None and result.scorer is not None
    scores = result.scorer(data.test)
    report = split_report(data.test, scores, result.threshold, bounds, seed=seed)
    report["held"] = {name: report["metrics"][name] <= bound for name, bound in bounds.items()}
    return report


def weak_model_warnings(result: SearchResult) -> list[str]:
    """Lines warning that the chosen trial is no better than the majority class on the rows it was judged
    on, or that its scores of them have collapsed (:func:`~groupmixnorm.metrics.sanity.useless_model_warnings`)."""
    assert result.chosen is not None and result.judged_scores is not None
    split = "validation" if result.folds == 1 else "out-of-fold"
    return useless_model_warnings(result.judged_on.y, result.judged_scores, result.chosen.choice.threshold,
                                  model="the chosen model", split=split)


def front_table(trials: Sequence[Trial], bounds: Mapping[str, float], chosen: Trial | None) -> Any:
    """Every trial as a row (``front.csv``), with a ``chosen`` column."""
    import pandas as pd

    table = pd.DataFrame([trial.row(bounds) for trial in trials])
    table["chosen"] = [trial is chosen for trial in trials]
    return table


def plot_front(table: Any, bounds: Mapping[str, float], select: str, path: Path) -> Path:
    """Validation objective against each bounded gap's CI upper end: feasible points filled, the bound
    dashed, the chosen point circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from groupmixnorm.files import atomic_output

    figure, axes = plt.subplots(1, len(bounds), figsize=(5 * len(bounds), 4), squeeze=False)
    for axis, (name, bound) in zip(axes[0], bounds.items()):
        for method, rows in table.groupby("method", sort=True):
            ok = rows[rows["feasible"]]
            line = axis.scatter(ok[f"val_{name}_upper"], ok[f"val_{select}"], label=method)
            bad = rows[~rows["feasible"]]
            axis.scatter(bad[f"val_{name}_upper"], bad[f"val_{select}"], facecolors="none",
                         edgecolors=line.get_facecolor(), alpha=0.6)
        chosen = table[table["chosen"]]
        axis.scatter(chosen[f"val_{name}_upper"], chosen[f"val_{select}"], s=250, facecolors="none",
                     edgecolors="black", linewidths=2, label="chosen")
        axis.axvline(bound, color="grey", linestyle="--", label=f"bound {bound}")
        axis.set_xlabel(f"validation {name} (95% CI upper end)")
        axis.set_ylabel(f"validation {select}")
    axes[0][0].legend(fontsize="small")
    figure.suptitle("trials (filled: every bound met)")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path


def summary_record(result: SearchResult, data: Any, bounds: Mapping[str, float], *, select: str, budget: int,
                   seed: int, test: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The JSON-ready ``metrics.json`` of a search whose choice was feasible."""
    chosen = result.chosen
    assert chosen is not None and result.judged_scores is not None
    val = split_report(result.judged_on, result.judged_scores, chosen.choice.threshold, bounds, seed=seed)
    crossed = {} if result.folds == 1 else {"judged_threshold": chosen.choice.threshold,
                                            "fold_epochs": list(result.fold_epochs or ())}
    return {
        "chosen": {"method": chosen.method, "knob": chosen.knob, "value": chosen.value, "options": chosen.options,
                   "threshold": result.threshold, **crossed},
        "bounds": dict(bounds),
        "select": select,
        "budget": budget,
        "feasibility": f"{FEASIBILITY} ({RESAMPLES} resamples, seed {seed})",
        "judged_on": judged_on_text(result),
        "methods": sorted({trial.method for trial in result.trials}),
        "trials": len(result.trials),
        "feasible_trials": sum(trial.feasible for trial in result.trials),
        "search_seconds": result.seconds,
        "validation": val,
        "test": test,
        "held_on_test": test["held"],
        "dataset": {"name": data.name, "sensitive": data.sensitive, "group_names": list(data.group_names),
                    "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}},
        "warnings": warnings,
    }


def judged_on_text(result: SearchResult) -> str:
    """What the trials' validation numbers (``front.csv``'s ``val_`` columns) were measured on."""
    rows = len(result.judged_on)
    if result.folds == 1:
        return f"the validation split ({rows} rows)"
    return (f"out-of-fold scores of the training and validation rows together ({rows} rows, {result.folds} folds "
            f"stratified by label and group); {CROSS_FIT_REFIT}")


def format_choice(record: dict[str, Any]) -> str:
    """A few lines for the terminal: the choice, and its test numbers with CIs against the bounds."""
    chosen = record["chosen"]
    setting = "" if chosen["knob"] is None else f" {chosen['knob']}={chosen['value']:.4g}"
    lines = [f"chosen: {chosen['method']}{setting}, threshold {chosen['threshold']} "
             f"({record['feasible_trials']} of {record['trials']} trials feasible, {record['search_seconds']:.1f} s)"]
    for name, interval in record["test"]["intervals"].items():
        bound = record["bounds"].get(name)
        held = "" if bound is None else f"  bound {bound}: {'held' if record['held_on_test'][name] else 'MISSED'}"
        lines.append(f"  test {name:<15} {interval['estimate']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"
                     f"{held}")
    return "\n".join(lines)

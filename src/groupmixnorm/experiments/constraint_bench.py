"""``groupmixnorm bench fair-by-constraint``: the ``--max-gap`` search on every bundled table, over seeds.

For each data set of the tabular bench and each seed, :func:`~groupmixnorm.experiments.constraint.search`
runs exactly as ``train --max-gap dp_gap_hard=0.05 --methods auto --budget 6`` would (the tabular bench's
network, loop and tuning budget), and one record per search is kept, so the bench resumes where it stopped.
The report puts each data set's chosen models beside the best single method of ``tabular.md`` under the
same bound, compared seed by seed, and says whether the bound held on test.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.experiments import constraint
from groupmixnorm.experiments.selection import choose_on_validation, compare_to_best_peer
from groupmixnorm.experiments.spec import RunSpec, load_run_data
from groupmixnorm.experiments.tabular_bench import (
    BUDGET, DATASETS, FULL_CONFIG, QUICK_CONFIG, QUICK_DATASETS, REFERENCES,
)
from groupmixnorm.metrics.sanity import majority_accuracy
from groupmixnorm.metrics.uncertainty import mean_interval
from groupmixnorm.files import JsonStore, json_digest, same_as_json, write_text_atomic

NAME = "fair-by-constraint"
#: The bound every search must meet (the goal's: selection rates within 5 points).
BOUNDS = {"dp_gap_hard": 0.05}
#: What every search maximises on validation among its feasible trials (``train --max-gap``'s default).
SELECT = "accuracy"
#: What a row of the report calls the search, among the single methods it is compared with.
SEARCH = "search"


@dataclasses.dataclass(frozen=True)
class ConstraintRun:
    """One search: a data set, a seed, the candidate methods and the trials per method."""

    dataset: str
    seed: int
    methods: tuple[str, ...]
    budget: int
    quick: bool = False

    def spec(self) -> RunSpec:
        """The data and loop of every trial (the method is each trial's own)."""
        config = dataclasses.replace(QUICK_CONFIG if self.quick else FULL_CONFIG, seed=self.seed)
        return RunSpec(method="erm", dataset=self.dataset, sensitive=DATASETS[self.dataset], protocol="official",
                       config=config)

    def candidates(self) -> dict[str, dict[str, Any]]:
        return {name: constraint.candidate_options(name, BOUNDS) for name in self.methods}

    def trials(self) -> int:
        return sum(1 if name not in constraint.KNOBS else self.budget for name in self.methods)

    def folds(self) -> int:
        """The folds the search cross-fits (``train --max-gap``'s default, ``--cross-fit auto``; 1: none)."""
        return _cross_fit_folds(self)

    def identity(self) -> dict[str, Any]:
        """What decides the search's outcome; a stored record with another identity is searched again. The
        folds are named only for a cross-fitted search, so the records of the others, made before
        cross-fitting existed, keep their identity."""
        folds = self.folds()
        return {"spec": self.spec().to_dict(), "methods": self.candidates(), "bounds": BOUNDS, "budget": self.budget,
                "select": SELECT, "thresholds": list(constraint.THRESHOLDS), "resamples": constraint.RESAMPLES,
                "feasibility": constraint.FEASIBILITY,
                **({"cross_fit": folds, "refit": constraint.CROSS_FIT_REFIT} if folds > 1 else {})}

    def command(self) -> str:
        spec = self.spec()
        config = spec.config
        return (f"groupmixnorm train --dataset {self.dataset} --sensitive {spec.sensitive} --max-gap "
                + " --max-gap ".join(f"{name}={bound}" for name, bound in BOUNDS.items())
                + f" --methods {','.join(self.methods)} --budget {self.budget} --epochs {config.epochs} "
                f"--iterations {config.iterations} --batch-size {config.batch_size} "
                f"--hidden {','.join(map(str, config.hidden))} --seed {self.seed} --out OUT")

    def key(self) -> str:
        """Where the search's record is stored: the data set's folder, the seed and a digest of the identity."""
        return f"{self.dataset}/seed{self.seed}-{json_digest(self.identity())}"


@functools.cache
def _cross_fit_folds(run: ConstraintRun) -> int:
    return constraint.resolve_folds(load_run_data(run.spec().to_dict()))


def constraint_runs(*, quick: bool = False, seeds: int = 5, datasets: Sequence[str] | None = None,
                    methods: Sequence[str] | None = None) -> list[ConstraintRun]:
    """Every search of the bench: data sets (default all five; quick: the two smallest) x seeds (quick: one),
    each over ``methods`` (default: ``--methods auto``) with the tabular bench's budget (quick: 2)."""
    names = tuple(datasets) if datasets is not None else (QUICK_DATASETS if quick else tuple(DATASETS))
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise ValueError(f"--datasets must name some of {', '.join(DATASETS)}, got {','.join(names)!r}")
    candidates = constraint.auto_methods()
    chosen = tuple(candidates if methods is None else methods)
    if not chosen or not set(chosen) <= set(candidates):
        raise ValueError(f"--methods must name methods a --max-gap search can return ({', '.join(candidates)}), "
                         f"got {','.join(chosen)!r}")
    return [ConstraintRun(name, seed, chosen, 2 if quick else BUDGET, quick)
            for name in names for seed in ((0,) if quick else range(seeds))]


def load_record(run: ConstraintRun, store: JsonStore) -> dict[str, Any] | None:
    """The stored record of ``run``, or ``None`` if it has not run or was made for another identity."""
    return store.read(run.key(), lambda record: same_as_json(record.get("identity"), run.identity()))


def run_search(run: ConstraintRun, *, executor: Any = None,
               on_trial: Callable[[constraint.Trial, Any], None] | None = None) -> dict[str, Any]:
    """Search as ``train --max-gap`` does and return the record: the choice with its validation and test
    numbers (test read once, for the choice), or the closest trial when none was feasible; every trial's row."""
    spec = run.spec()
    data = load_run_data(spec.to_dict())
    result = constraint.search(data, run.candidates(), BOUNDS, config=spec.config, budget=run.budget, select=SELECT,
                               executor=executor, on_trial=on_trial, cross_fit=run.folds())
    record: dict[str, Any] = {"identity": run.identity(), "command": run.command(),
                              "front": constraint.front_table(result.trials, BOUNDS, result.chosen)
                              .to_dict(orient="records")}
    if result.chosen is None:
        closest = constraint.closest_message(result.trials, BOUNDS, result.judged_on, result.folds)
        return {**record, "chosen": None, "closest": closest, "search_seconds": result.seconds}
    warnings = constraint.weak_model_warnings(result)
    test = constraint.score_test(result, data, BOUNDS, seed=spec.config.seed)
    summary = constraint.summary_record(result, data, BOUNDS, select=SELECT, budget=run.budget, seed=spec.config.seed,
                                        test=test, warnings=warnings)
    summary["test"]["majority_accuracy"] = majority_accuracy(float(np.mean(np.asarray(data.test.y) == 1)))
    return {**record, **summary}


def run_constraint_bench(runs: Sequence[ConstraintRun], records_root: Path, *, executor: Any = None,
                         on_trial: Callable[[str], None] | None = None,
                         on_reused: Callable[[ConstraintRun], None] | None = None) -> list[dict[str, Any]]:
    """Every search of ``runs``, skipping those with a stored record; each record is written (atomically)
    as soon as its search ends. ``on_trial(label)`` after each trial, ``on_reused(run)`` for a stored one."""
    store = JsonStore(records_root)
    records = []
    for run in runs:
        record = load_record(run, store)
        if record is None:
            label = f"{run.dataset} seed {run.seed}"
            report = None if on_trial is None else (lambda trial, best, label=label: on_trial(
                f"{label}: {trial.method}" + ("" if best is None else
                                              f", best {best.method} {SELECT} {best.choice.objective(SELECT):.3f}")))
            record = run_search(run, executor=executor, on_trial=report)
            store.write(run.key(), record)
        elif on_reused is not None:
            on_reused(run)
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ report


def results_table(runs: Sequence[ConstraintRun], records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per search (``runs.csv``): the choice, its validation and test numbers, and the search time."""
    gap = next(iter(BOUNDS))
    rows = []
    for run, record in zip(runs, records):
        row: dict[str, Any] = {"dataset": run.dataset, "seed": run.seed, "feasible": record["chosen"] is not None,
                               "search_seconds": record["search_seconds"], "trials": len(record["front"]),
                               "folds": run.folds()}
        if record["chosen"] is not None:
            chosen, test = record["chosen"], record["test"]
            row.update(method=chosen["method"], knob=chosen["knob"] or "", value=chosen["value"],
                       threshold=chosen["threshold"], val_ap=record["validation"]["metrics"]["ap"],
                       val_accuracy=record["validation"]["metrics"]["accuracy"],
                       **{f"val_{gap}": record["validation"]["metrics"][gap]},
                       test_ap=test["metrics"]["ap"], test_accuracy=test["metrics"]["accuracy"],
                       majority_accuracy=test["majority_accuracy"], **{f"test_{gap}": test["metrics"][gap]},
                       **{f"test_{gap}_low": test["intervals"][gap]["low"],
                          f"test_{gap}_high": test["intervals"][gap]["high"]})
        rows.append(row)
    return pd.DataFrame(rows)


def single_method_choices(results_dir: Path, datasets: Sequence[str]) -> pd.DataFrame | None:
    """Each single method's validated choice per seed under the bound, from the tabular bench's committed
    ``tabular/<dataset>/runs.csv`` (references that need the attribute left out); ``None`` if absent."""
    (gap, bound), = BOUNDS.items()
    frames = []
    for dataset in datasets:
        path = Path(results_dir) / "tabular" / dataset / "runs.csv"
        if not path.exists():
            return None
        runs = pd.read_csv(path)
        frames.append(choose_on_validation(runs[~runs["method"].isin(REFERENCES)], gap=gap, bound=bound))
    return pd.concat(frames, ignore_index=True)


def constraint_markdown(runs: Sequence[ConstraintRun], records: Sequence[dict[str, Any]], table: pd.DataFrame,
                        singles: pd.DataFrame | None, command: str) -> str:
    """``fair-by-constraint.md``: per data set, the chosen models against the best single method."""
    (gap, bound), = BOUNDS.items()
    methods = ", ".join(runs[0].methods)
    candidates = "`--methods auto`" if list(runs[0].methods) == constraint.auto_methods() else "a partial run"
    budget = "the tabular bench's tuning budget" if runs[0].budget == BUDGET else "a quick run's"
    lines = [
        "# Fair by constraint: one search per table and seed, the bound named by the user",
        "",
        f"Generated by `{command}` (resumable). Each search is `{runs[0].command()}` with the data set and seed of its "
        "row: every candidate method's fairness knob searched by seeded TPE on validation, "
        f"{runs[0].budget} trials per method ({budget}), one global decision threshold chosen on validation. "
        f"A trial is feasible when the upper end of the 95% bootstrap interval of its validation {gap} is at most "
        f"{bound} and an exact one-sided sign test says its validation decisions beat the majority class "
        f"(p < {constraint.USEFUL_LEVEL:.3g}); the feasible trial of best validation {SELECT} is chosen. "
        "The test split is read once per "
        f"search, for its choice. Candidates ({candidates}): {methods}.",
        "",
        *_cross_fit_lines(runs),
        f"**Best single method**: among the methods of `tabular.md` (ERM included, thresholdopt left out: it "
        f"needs the attribute), the one of best mean test AP among those whose setting chosen on validation met "
        f"{gap} <= {bound} on every seed. The verdicts are paired comparisons over seeds with the best (by the "
        "verdict's own score) of those that met it on every seed the search met it on; a difference inside the "
        "95% interval is a tie. The single methods' choice uses the point validation gap and does not ask for "
        "a decision better than the majority class; the search's uses the margins, a stricter rule. The "
        "single methods decide at threshold 0.5, as the tabular bench does, while the search chooses one global "
        "threshold under the bound.",
        "",
        f"| data set | chosen (seeds; thresholds) | test AP | test accuracy (majority class; seeds above it) | "
        f"test {gap} | bound held on test (point; within CI) | best single method (test AP; accuracy) | "
        "verdict (AP; accuracy) | search time (median, range) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {} if singles is None else {score: _verdicts(table, singles, score) for score in ("ap", "accuracy")}
    for dataset, rows in table.groupby("dataset", sort=False):
        verdict = "(no tabular bench to compare)" if singles is None else \
            "; ".join(verdicts[score].get(dataset, "") for score in ("ap", "accuracy"))
        lines.append(_dataset_row(dataset, rows, singles, verdict))
    lines += ["", "Intervals are 95% t intervals over seeds; per-seed numbers are in "
              f"[{NAME}/runs.csv]({NAME}/runs.csv) and every trial in the records."]
    closest = [f"- {run.dataset} seed {run.seed}: {record['closest']}" for run, record in zip(runs, records)
               if record["chosen"] is None]
    if closest:
        lines += ["", "Searches with no feasible trial, and their closest trial:", "", *closest]
    return "\n".join([*lines, ""])


def _cross_fit_lines(runs: Sequence[ConstraintRun]) -> list[str]:
    """A paragraph naming the cross-fitted data sets, if any."""
    crossed = {run.dataset: run.folds() for run in runs if run.folds() > 1}
    if not crossed:
        return []
    names = ", ".join(f"{name} ({folds} folds)" for name, folds in crossed.items())
    return [f"**Cross-fitted** (`--cross-fit auto`: a validation split with a group under "
            f"{constraint.SMALL_GROUP_ROWS} rows cannot certify the bound): {names}. Each of their trials is judged "
            "on the out-of-fold scores of one model per fold over the training and validation rows together, and "
            f"the model scored on test is {constraint.CROSS_FIT_REFIT} (models trained apart put their scores on "
            "different scales, so the share transfers where a score would not). The other data sets' trials are "
            "judged on their validation split.", ""]


def _verdicts(table: pd.DataFrame, singles: pd.DataFrame, score: str) -> dict[str, str]:
    ours = table.assign(method=SEARCH).reindex(columns=["dataset", "method", "seed", "feasible", f"test_{score}"])
    choices = pd.concat([singles, ours], ignore_index=True)
    peers = sorted(set(singles["method"]))
    return compare_to_best_peer(choices, method=SEARCH, peers=peers, score=score)


def _dataset_row(dataset: str, rows: pd.DataFrame, singles: pd.DataFrame | None, verdict: str) -> str:
    (gap, bound), = BOUNDS.items()
    met = rows[rows["feasible"]]
    seconds = rows["search_seconds"]
    timing = f"{seconds.median():.0f} s ({seconds.min():.0f} to {seconds.max():.0f})"
    if met.empty:
        return f"| {dataset} | none feasible (0/{len(rows)}) | | | | | {_best_single(dataset, singles)} | " \
               f"infeasible | {timing} |"
    chosen = ", ".join(f"{name} {count}" for name, count in met["method"].value_counts().items())
    low, high = met["threshold"].min(), met["threshold"].max()
    chosen += f"; threshold {low:.2f}" + (f" to {high:.2f}" if high > low else "")
    if len(met) < len(rows):
        chosen += f" (feasible on {len(met)}/{len(rows)})"
    point = int((met[f"test_{gap}"] <= bound).sum())
    within = int((met[f"test_{gap}_low"] <= bound).sum())
    best = _best_single(dataset, singles)
    above = int((met["test_accuracy"] > met["majority_accuracy"]).sum())
    return (f"| {dataset} | {chosen} | {_interval(met['test_ap'])} | {_interval(met['test_accuracy'])} "
            f"({met['majority_accuracy'].mean():.3f}; {above}/{len(met)}) | {_interval(met[f'test_{gap}'])} | "
            f"{point}/{len(met)}; {within}/{len(met)} | {best} | {verdict} | {timing} |")


def _best_single(dataset: str, singles: pd.DataFrame | None) -> str:
    if singles is None:
        return ""
    rows = singles[(singles["dataset"] == dataset)]
    feasible = rows.groupby("method")["feasible"].all()
    means = rows[rows["method"].isin(feasible[feasible].index)].groupby("method")["test_ap"].mean()
    if means.empty:
        return "none met it on every seed"
    best = rows[rows["method"] == means.idxmax()]
    return f"{means.idxmax()} {_interval(best['test_ap'])}; accuracy {_interval(best['test_accuracy'])}"


def _interval(values: pd.Series) -> str:
    interval = mean_interval(values.astype(float).to_numpy())
    return f"{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]" if len(values) > 1 else \
        f"{interval.estimate:.3f}"


def write_constraint_results(runs: Sequence[ConstraintRun], records: Sequence[dict[str, Any]], results_dir: Path,
                             command: str) -> list[Path]:
    """``fair-by-constraint/runs.csv`` and ``fair-by-constraint.md``; the single methods are read from the
    same ``results_dir``'s tabular bench."""
    from groupmixnorm.experiments.report import write_csv_atomic

    table = results_table(runs, records)
    singles = single_method_choices(results_dir, sorted({run.dataset for run in runs}))
    markdown = constraint_markdown(runs, records, table, singles, command)
    return [write_csv_atomic(table, Path(results_dir) / NAME / "runs.csv"),
            write_text_atomic(Path(results_dir) / f"{NAME}.md", markdown)]

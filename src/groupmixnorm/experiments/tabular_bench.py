"""``groupmixnorm bench tabular``: every method on the five bundled tabular sets, tuned on validation.

One :class:`~groupmixnorm.experiments.bench.BenchPlan` per data set, all alike: every method's fairness knob
over the same number of values (the tuning budget, :data:`BUDGET`), the same network, the same number of
optimizer steps whatever the data set's size, the epoch kept by validation AP. Records go through
:class:`~groupmixnorm.experiments.bench.RecordStore` and :func:`~groupmixnorm.experiments.bench.run_plan`, so
the bench resumes where it stopped. The report chooses each method's setting per seed on validation
(:func:`~groupmixnorm.experiments.selection.choose_on_validation`) and reads the test split only for the
chosen runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.experiments.bench import BenchPlan, RecordStore, Setting, run_plans
from groupmixnorm.experiments.executors import Executor
from groupmixnorm.experiments.selection import BOUNDS, validated_runs_table
from groupmixnorm.training import TrainConfig

#: The data sets of the full bench, each with its default protected attribute.
DATASETS: dict[str, str] = {"adult": "sex", "german": "age", "compas": "race", "credit": "sex", "law": "race"}
#: The data sets of ``--quick`` (the two smallest).
QUICK_DATASETS = ("german", "compas")

#: Each method's fairness knob and its values, weak to strong, all for demographic parity. Every method
#: with a knob gets the same number of values; ERM has none and trains once per seed (see :data:`BUDGET`).
#: The ranges follow each penalty's scale: HSIC and the prejudice index are small numbers, so their weights
#: are larger; expgrad's ``eps`` and thresholdopt's ``tol`` are bounds, so strong means small.
KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    "gmn": ("align", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    "scorematch": ("lam", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    "gapreg": ("lam", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    "fairmixup": ("lam", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    "adversarial": ("lam", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
    "hsic": ("lam", (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)),
    "prem": ("lam", (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)),
    "fairret": ("lam", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
    "expgrad": ("eps", (0.1, 0.05, 0.02, 0.01, 0.005, 0.002)),
    "thresholdopt": ("tol", (0.2, 0.1, 0.05, 0.02, 0.01, 0.0)),
}
#: The settings of every method with a knob per data set (the tuning budget).
BUDGET = 6
#: Options fixed for each method, named so that a record keeps meaning the same run if a default changes.
FIXED_OPTIONS: dict[str, dict[str, Any]] = {
    "gmn": {"placement": "logit", "align_quantiles": 16, "fairness": "dp"},
    **{method: {"fairness": "dp"} for method in KNOBS if method != "gmn"},
}
#: Methods that need the protected attribute at prediction: shown as references (what a model allowed to
#: read the attribute reaches), never counted as gmn's peers.
REFERENCES = ("thresholdopt",)
#: Methods gmn is compared with: every other method but ERM (no mitigation) and the references. expgrad is
#: a peer (it needs the attribute only when fitting).
PEERS = tuple(method for method in KNOBS if method != "gmn" and method not in REFERENCES)

#: The full bench's loop: 20 epochs of 50 batches (1000 optimizer steps on every data set), the epoch with
#: the best validation AP kept, each method's own batches (``sampling="auto"``).
FULL_CONFIG = TrainConfig(epochs=20, iterations=50, batch_size=256, hidden=(200, 200), select="ap", sampling="auto")
QUICK_CONFIG = TrainConfig(epochs=2, iterations=3, batch_size=32, hidden=(16,), select="ap", sampling="auto")

#: The gaps of the front plots.
FRONT_GAPS = ("dp_gap_hard", "dp_ks")


def tabular_settings(*, quick: bool = False, methods: Sequence[str] | None = None) -> tuple[Setting, ...]:
    """ERM once, then :data:`BUDGET` settings of every method with a knob (quick: the weakest and the
    strongest value). ``methods`` keeps only those methods."""
    settings = [Setting("erm", {}, "auto")]
    for method, (knob, values) in KNOBS.items():
        chosen = (values[0], values[-1]) if quick else values
        options = dict(FIXED_OPTIONS[method])
        if quick and method == "expgrad":
            options["max_iter"] = 5  # a smoke test: a few rounds of the reduction
        settings += [Setting(method, {**options, knob: value}, "auto") for value in chosen]
    if methods is not None:
        settings = [setting for setting in settings if setting.method in set(methods)]
    return tuple(settings)


def tabular_plans(
    *, quick: bool = False, seeds: int = 5, datasets: Sequence[str] | None = None, methods: Sequence[str] | None = None
) -> list[BenchPlan]:
    """One plan per data set (default: all five; quick: German and COMPAS, one seed, two settings per
    method, a few steps of a small network). Unknown data sets or methods raise ``ValueError``."""
    names = tuple(datasets) if datasets is not None else (QUICK_DATASETS if quick else tuple(DATASETS))
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise ValueError(f"--datasets must name some of {', '.join(DATASETS)}, got {','.join(names)!r}")
    known = {"erm", *KNOBS}
    if methods is not None and (not methods or not set(methods) <= known):
        raise ValueError(f"--methods must name methods of the tabular bench ({', '.join(sorted(known))}), "
                         f"got {','.join(methods)!r}")
    settings = tabular_settings(quick=quick, methods=methods)
    config = QUICK_CONFIG if quick else FULL_CONFIG
    return [
        BenchPlan(f"tabular-{name}", settings, (0,) if quick else tuple(range(seeds)), config, protocol="official",
                  dataset=name, sensitive=DATASETS[name])
        for name in names
    ]


def run_tabular(
    plans: Sequence[BenchPlan], records_root: Path, *, on_run: Callable[..., None] | None = None,
    executor: Executor | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every plan (records under ``records_root/<dataset>/records``) on one ``executor`` (default this
    process; see :func:`~groupmixnorm.experiments.bench.run_plans`); the records per data set."""
    jobs = [(plan, RecordStore(Path(records_root) / plan.dataset_name / "records")) for plan in plans]
    records = run_plans(jobs, on_run=on_run, executor=executor)
    return {plan.dataset_name: plan_records for plan, plan_records in zip(plans, records)}


def write_tabular_results(
    plans: Sequence[BenchPlan], records: dict[str, list[dict[str, Any]]], results_dir: Path, command: str
) -> list[Path]:
    """Write ``tabular/<dataset>/runs.csv`` and the front plots per data set, then ``tabular.md``."""
    from groupmixnorm.experiments import report
    from groupmixnorm.files import write_text_atomic

    results_dir = Path(results_dir)
    written, tables, plots = [], {}, {}
    for dataset, dataset_records in records.items():
        folder = results_dir / "tabular" / dataset
        tables[dataset] = validated_runs_table(dataset_records)
        written.append(report.write_csv_atomic(tables[dataset], folder / "runs.csv"))
        plots[dataset] = [_plot_front(tables[dataset], gap, folder / f"ap_vs_{gap}.png", dataset) for gap in FRONT_GAPS]
        written += plots[dataset]
    runs = pd.concat(list(tables.values()), ignore_index=True)
    text = tabular_markdown(plans, runs, plots, results_dir, command)
    written.append(write_text_atomic(results_dir / "tabular.md", text))
    return written


def _plot_front(runs: pd.DataFrame, gap: str, path: Path, dataset: str) -> Path:
    """Every setting's mean test AP against its mean test ``gap`` over seeds, each method's front drawn."""
    from groupmixnorm.experiments import report

    plain = runs.rename(columns={f"test_{key}": key for key in ("ap", gap)})
    points = report.over_seeds(plain, ("method", "setting"), ("ap", gap)).reset_index()
    seeds = runs["seed"].nunique()
    return report.plot_fronts(points, gap, path, f"{dataset}: AP vs {gap} (test), every setting, {seeds} seed(s)")


def choices_for(runs: pd.DataFrame, gap: str, bound: float) -> pd.DataFrame:
    """Each method's run per data set and seed, chosen on validation under ``val_<gap> <= bound``."""
    from groupmixnorm.experiments.selection import choose_on_validation

    return choose_on_validation(runs, gap=gap, bound=bound)


def tabular_markdown(
    plans: Sequence[BenchPlan], runs: pd.DataFrame, plots: dict[str, list[Path]], results_dir: Path, command: str
) -> str:
    """The report: the protocol and budget, a table per data set x gap x bound, the cross-data-set
    summary, and the front plots."""
    from groupmixnorm.experiments import report
    from groupmixnorm.experiments.selection import compare_to_best_peer, summarize_choices

    plan = plans[0]
    budget = budget_per_method(plan)
    config = plan.config
    lines = [
        "# Bench: tabular",
        "",
        f"Generated by `{command}` from {len(runs)} run records in `tabular/<dataset>/records/`; every row of "
        "`tabular/<dataset>/runs.csv` carries the `groupmixnorm train` command that reproduces it alone.",
        "",
        "## Protocol and budget",
        "",
        f"Data sets (protected attribute): {', '.join(f'{p.dataset_name} ({p.sensitive})' for p in plans)}; "
        f"each its bundled split (protocol `official`), seeds {list(plan.seeds)}. One loop for every method: "
        f"MLP {list(config.hidden)}, Adam lr {config.lr}, {config.epochs} epochs of {config.iterations} batches "
        f"of {config.batch_size} ({config.epochs * config.iterations} optimizer steps on every data set), "
        "each method's own batches (`sampling=auto`), the epoch with the best validation AP kept. expgrad fits "
        "fairlearn's reduction over logistic regression outside the loop; thresholdopt fits fairlearn's "
        "`ThresholdOptimizer` (demographic parity, relaxed by `tol`) on the training-split scores of the ERM network "
        "of the same seed and loop.",
        "",
        "Tuning budget per data set: " + ", ".join(f"{method} {count}" for method, count in budget.items())
        + " setting(s). Every method with a fairness knob gets the same number of knob values, all for "
        "demographic parity (so under the `eodds_gap_hard` bounds each method is tuned with its DP knob); ERM has "
        "no knob and trains once per seed. Knobs: "
        + ", ".join(f"{m} `{KNOBS[m][0]}`" for m in budget if m in KNOBS) + ".",
        "",
        "Choice: for each data set, method, seed, gap and bound, the run with the best **validation** AP among "
        "those whose **validation** gap is within the bound (`selection.choose_on_validation`); the test split is "
        "read for the chosen run only. Cells: mean test AP over the seeds that met the bound, with a 95 % t "
        "interval, and the mean test gap. Hard gaps at threshold 0.5 (fairlearn's definitions); `dp_ks` is the "
        "Kolmogorov-Smirnov distance between the groups' score distributions. gmn's verdict is a paired "
        "comparison over seeds with the best peer: the one of best mean test AP among the peers that met the bound "
        "on every seed gmn met it on (`selection.compare_to_best_peer`); peers: " + ", ".join(PEERS)
        + " (ERM is not a mitigation; " + ", ".join(REFERENCES) + " reads the protected attribute at prediction, "
        "so it is a reference, marked *(needs attribute)*, not a peer; its score is the probability that its "
        "randomized group thresholds select a row, which takes few values, so its AP is that of a decision).",
        "",
    ]
    order = {method: index for index, method in enumerate(budget)}
    summaries, verdict_table = [], {}
    sections = {plan.dataset_name: [f"## {plan.dataset_name} ({plan.sensitive})", ""] for plan in plans}
    for gap, bounds in BOUNDS.items():
        for bound in bounds:
            choices = choices_for(runs, gap, bound)
            summary = summarize_choices(choices, gap=gap)
            summary = summary.sort_values("method", key=lambda m: m.map(order), kind="stable")
            summaries.append(summary.assign(gap=gap, bound=bound))
            verdicts = compare_to_best_peer(choices, method="gmn", peers=PEERS) if "gmn" in order else {}
            verdict_table[f"{gap} <= {bound:g}"] = verdicts
            for dataset, rows in summary.groupby("dataset", sort=False):
                sections[dataset] += [f"### {dataset}: {gap} <= {bound:g}", "",
                                      report.markdown_table(_shown(rows, gap)), ""]
                if dataset in verdicts:
                    sections[dataset] += [f"gmn against the best peer: {verdicts[dataset]}.", ""]
    for section in sections.values():
        lines += section
    lines += _cross_summary(pd.concat(summaries, ignore_index=True), runs)
    if any(verdict_table.values()):
        lines += ["gmn against the best peer per data set (paired over seeds; the goal of issue 15 reads the "
                  "`dp_gap_hard <= 0.05` and `dp_ks <= 0.1` columns):", "",
                  report.markdown_table(pd.DataFrame(verdict_table).fillna("—").rename_axis("dataset").reset_index()),
                  ""]
    lines += _monotonicity_section(runs)
    lines += ["## Fronts (every setting, test means over seeds, standard deviations as bars)", ""]
    for dataset, paths in plots.items():
        lines += [f"![{dataset}: {p.stem}]({p.relative_to(results_dir).as_posix()})" for p in paths] + [""]
    return "\n".join(lines)


def _shown(rows: pd.DataFrame, gap: str) -> pd.DataFrame:
    return pd.DataFrame({
        "method": [f"{m} *(needs attribute)*" if m in REFERENCES else m for m in rows["method"]],
        "test AP (95 % CI)": [str(v) if v is not None else "—" for v in rows["test_ap"]],
        f"test {gap}": [f"{v.estimate:.4f}" if v is not None else "—" for v in rows[f"test_{gap}"]],
        "seeds met": [f"{met}/{n}" for met, n in zip(rows["feasible_seeds"], rows["seeds"])],
        "settings chosen": [f"`{s}`" if s else "—" for s in rows["settings"]],
    })


def _cross_summary(summaries: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Per gap and bound: each method's mean rank of validated test AP over the data sets (a method that met
    the bound on no seed ranks last) and its mean AP relative to ERM's (ERM's single setting, mean test AP)."""
    from groupmixnorm.experiments import report

    summaries = summaries.assign(ap=[v.estimate if v is not None else np.nan for v in summaries["test_ap"]])
    erm_ap = runs[runs["method"] == "erm"].groupby("dataset")["test_ap"].mean()
    ranks, ratios = {}, {}
    for (gap, bound), table in summaries.groupby(["gap", "bound"], sort=False):
        column = f"{gap} <= {bound:g}"
        table = table.assign(rank=table.groupby("dataset")["ap"].rank(ascending=False, na_option="bottom"))
        ranks[column] = table.groupby("method", sort=False)["rank"].mean()
        table = table.assign(ratio=table["ap"] / table["dataset"].map(erm_ap))
        ratios[column] = table.groupby("method", sort=False)["ratio"].mean()
    lines = ["## Across data sets", "",
             "Mean rank of each method's validated test AP over the data sets (1 is best; a method that met the "
             "bound on no seed of a data set ranks last there, tied with the others that missed it):", "",
             report.markdown_table(pd.DataFrame(ranks).map("{:.2f}".format).rename_axis("method").reset_index()), ""]
    if len(erm_ap):
        lines += ["Validated test AP divided by ERM's mean test AP on the same data set (FFB's normalisation), mean "
                  "over the data sets where the method met the bound:", "",
                  report.markdown_table(pd.DataFrame(ratios).map(lambda v: "—" if np.isnan(v) else f"{v:.3f}")
                                        .rename_axis("method").reset_index()), ""]
    return lines


def knob_monotonicity(runs: pd.DataFrame, gap: str = "dp_gap_hard") -> pd.DataFrame:
    """How monotone each method's validation ``gap`` is in its knob, from weak to strong (:data:`KNOBS`):
    per method, over data sets and seeds, the mean Spearman correlation between the knob's strength rank and
    the gap (-1: the gap always falls as the knob strengthens) and the share of (data set, seed) sweeps in
    which the gap never rises from one value to the next. A method whose gap is monotone could be searched
    by bisection; the others need a search that assumes nothing (``train --max-gap`` uses Optuna's TPE)."""
    rows = []
    for method, (knob, values) in KNOBS.items():
        strength = {f"{knob}={value}": rank for rank, value in enumerate(values)}
        own = runs[runs["method"] == method]
        ranks = own["setting"].map(lambda label: next((r for key, r in strength.items() if key in label.split(",")), None))
        own = own.assign(strength=ranks).dropna(subset=["strength"])
        correlations, monotone = [], []
        for _, sweep in own.groupby(["dataset", "seed"]):
            ordered = sweep.sort_values("strength")[f"val_{gap}"].to_numpy(float)
            if len(ordered) < 3:
                continue
            monotone.append(bool(np.all(np.diff(ordered) <= 0)))
            if np.ptp(ordered) > 0:  # a constant sweep (every gap 0, say) is monotone but has no correlation
                correlations.append(pd.Series(ordered).corr(pd.Series(np.arange(len(ordered))), method="spearman"))
        if monotone:
            rows.append({"method": method, "knob": knob, "sweeps": len(monotone),
                         "mean Spearman": f"{np.nanmean(correlations):.2f}",
                         "monotone sweeps": f"{np.mean(monotone):.0%}"})
    return pd.DataFrame(rows)


def _monotonicity_section(runs: pd.DataFrame) -> list[str]:
    from groupmixnorm.experiments import report

    table = knob_monotonicity(runs)
    if table.empty:
        return []
    return ["## Is each knob monotone?", "",
            "Validation `dp_gap_hard` against each knob's six values, weak to strong, per data set and seed "
            "(`tabular_bench.knob_monotonicity`): the mean Spearman correlation (-1 when the gap always falls) and "
            "the share of sweeps where it never rises. This is why `train --max-gap` searches with Optuna's TPE "
            "rather than by bisection.", "",
            report.markdown_table(table), ""]


def budget_per_method(plan: BenchPlan) -> dict[str, int]:
    """How many settings each method has in ``plan``."""
    counts: dict[str, int] = {}
    for setting in plan.settings:
        counts[setting.method] = counts.get(setting.method, 0) + 1
    return counts


__all__ = ["BOUNDS", "BUDGET", "DATASETS", "KNOBS", "PEERS", "REFERENCES", "budget_per_method", "choices_for", "run_tabular",
           "tabular_markdown", "tabular_plans", "tabular_settings",
           "write_tabular_results"]

"""A self-contained HTML fairness report of one run (a checkpoint or a run folder) or of a bench.

The file needs nothing beside itself: plots are PNGs embedded as base64, tables are HTML. For one model it
shows the test metrics beside the majority-class accuracy (and beside a baseline model's, with
``baseline=``), per-group selection, true and false positive rates with bootstrap intervals, each group's
selection rate against the highest (the four-fifths rule), the gaps between groups with their intervals,
score distributions by group, accuracy and gaps against the decision threshold, calibration by group, a
warning for each group too small to measure well, and, for a model chosen by ``train --max-gap``, the
validation front of the search; for a bench (or with ``bench=``) the AP-versus-gap trade-off plots. The
numbers about the decision come from :mod:`groupmixnorm.experiments.report_decision`, its plots from
:mod:`groupmixnorm.experiments.report_plots`.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.experiments import report_decision as decision
from groupmixnorm.experiments.constraint import RESAMPLES
from groupmixnorm.experiments.report_decision import gap_table
from groupmixnorm.experiments.report_plots import png_bytes as _png
from groupmixnorm.experiments.report_plots import pyplot as _pyplot
from groupmixnorm.experiments.report_plots import score_histograms_plot, threshold_sweep_plot
from groupmixnorm.metrics import useless_model_warnings
from groupmixnorm.metrics.sanity import majority_accuracy
from groupmixnorm.files import write_text_atomic

#: Per-group columns shown, in order, with their headers.
RATE_COLUMNS = {"count": "rows", "base_rate": "base rate", "selection_rate": "selection rate",
                "tpr": "true positive rate", "fpr": "false positive rate", "accuracy": "accuracy",
                "mean_score": "mean score"}
#: Files of a run folder that are not checkpoints.
NOT_CHECKPOINTS = ("train_state.pt",)


@dataclass
class RunView:
    """What the report shows about one model: where it comes from, its metrics, its per-group rates (empty
    when unknown), its decision threshold, (when a checkpoint was available) the test labels, scores and
    groups behind the intervals and plots, and the search that chose it, if any."""

    title: str
    facts: dict[str, str]
    metrics: dict[str, float]
    rates: pd.DataFrame
    scored: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    threshold: float = 0.5
    search: decision.SearchFront | None = None
    #: Why there are no test scores (``scored`` is None), for the sections that need them.
    no_scores: str = "there is no checkpoint to give them"


def write_report(source: str | Path, out: str | Path, *, bench: str | Path | None = None,
                 data: str | Path | None = None, baseline: str | Path | None = None,
                 resamples: int = RESAMPLES) -> Path:
    """Write the HTML report of ``source`` to ``out`` atomically.

    Parameters
    ----------
    source : path
        A checkpoint (``train --save``), a run folder with ``metrics.json`` (``train --out``; a checkpoint
        in it adds calibration), or a bench results folder with ``runs.csv``.
    out : path
        The HTML file to write.
    bench : path, optional
        A bench results folder whose trade-off plots are added to a run's report.
    data : path, optional
        A copy of a CSV run's training file, read instead of the path the checkpoint records (checked by
        the same sha256); read for ``baseline``'s checkpoint too.
    baseline : path, optional
        A checkpoint or run folder of a plain (say ERM) model of the same data, whose test metrics and gaps
        are shown beside the model's.
    resamples : int, default :data:`~groupmixnorm.experiments.constraint.RESAMPLES`
        Bootstrap resamples of the intervals.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ValueError
        If ``source`` (or ``bench``, or ``baseline``) is none of the above, or ``bench``'s runs or the
        baseline trained on another data set or protected attribute than the run.
    """
    paths = {name: None if value is None else Path(value) for name, value in (("bench", bench), ("baseline", baseline))}
    return write_text_atomic(out, build_report(Path(source), data=data, resamples=resamples, **paths))


def build_report(source: Path, *, bench: Path | None = None, data: str | Path | None = None,
                 baseline: Path | None = None, resamples: int = RESAMPLES) -> str:
    """The report of ``source`` as one HTML document (see :func:`write_report`)."""
    if bench is not None and not (bench / "runs.csv").is_file():
        raise ValueError(f"--bench {bench} is not a bench results folder (it has no runs.csv)")
    if resamples < 1:
        raise ValueError(f"--resamples must be at least 1, got {resamples}")
    if _is_bench(source):
        if bench is not None:
            raise ValueError(f"--bench adds a bench's plots to a run's report, and {source} is a bench folder itself")
        if data is not None:
            raise ValueError(f"--data is read to score a checkpoint again, and {source} is a bench folder")
        if baseline is not None:
            raise ValueError(f"--baseline is compared with one model, and {source} is a bench folder")
        return _document(f"Bench report: {source.name}", _bench_sections(source))
    view = load_run_view(source, data=data)
    if bench is not None:
        _check_same_data(view, bench)
    other = None if baseline is None else load_baseline(baseline, view, data=data)
    sections = _run_sections(view, other, resamples) + ([] if bench is None else _bench_sections(bench))
    return _document(view.title, sections)


def _is_bench(source: Path) -> bool:
    return source.is_dir() and (source / "runs.csv").is_file() and not (source / "metrics.json").is_file()


def load_baseline(path: Path, view: RunView, *, data: str | Path | None = None) -> RunView:
    """The :class:`RunView` of ``--baseline``, loaded as the main source is; ``ValueError`` (one line, naming
    ``--baseline``) if it is missing, a bench, or of other test data than ``view``. ``data`` is read only
    when the baseline has a checkpoint to score."""
    if not path.exists():
        raise ValueError(f"--baseline {path}: no checkpoint or run folder there")
    if _is_bench(path):
        raise ValueError(f"--baseline {path} is a bench folder; give the checkpoint or run folder of one model")
    scores_again = path.is_file() or _checkpoint_in(path) is not None
    try:
        other = load_run_view(path, data=data if scores_again else None)
    except ValueError as error:
        raise ValueError(f"--baseline {path}: {error}") from None
    ours, theirs = (", ".join(f"{key} {v.facts.get(key)}" for key in ("dataset", "protected attribute", "test rows"))
                    for v in (view, other))
    if ours != theirs:
        raise ValueError(f"--baseline {path} was tested on other data ({theirs}) than the model ({ours}); a "
                         "baseline is compared on the same test split")
    return other


def load_run_view(source: Path, *, data: str | Path | None = None) -> RunView:
    """A :class:`RunView` of a checkpoint file or of a run folder (``metrics.json``, maybe a checkpoint);
    ``data``: a copy of a CSV run's training file (see :func:`write_report`)."""
    from groupmixnorm.training.checkpoint import load_checkpoint

    if source.is_file():
        view = _view_of_checkpoint(load_checkpoint(source), source, data)
        _attach_search_beside(view, source.parent)
        return view
    if not source.is_dir():
        raise ValueError(f"no run folder, checkpoint or bench folder at {source}")
    record_path = source / "metrics.json"
    if not record_path.is_file():
        raise ValueError(f"{source} has neither metrics.json (a run folder) nor runs.csv (a bench folder)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    view = _view_of_record(record, record_path)
    view.search = decision.search_front(source)
    checkpoint = _checkpoint_in(source) or _recorded_checkpoint(record)
    if checkpoint is None and data is not None:
        raise ValueError(f"--data is read to score a checkpoint again, and {source} has none")
    if checkpoint is None:
        view.no_scores = "the run folder has no checkpoint (train --save DIR/model.pt)"
        view.notes.append(f"No checkpoint in the run folder (train --save DIR/model.pt): {_NEEDS_SCORES} are left "
                          "out, each with a line saying so.")
    else:
        scored = _view_of_checkpoint(load_checkpoint(checkpoint), checkpoint, data)
        view.scored, view.threshold = scored.scored, scored.threshold
        if view.rates.empty:  # a search's metrics.json stores no per-group rates
            view.rates = scored.rates
        view.facts["checkpoint"] = str(checkpoint)
    return view


#: The sections that need a checkpoint's test scores.
_NEEDS_SCORES = "the intervals, score histograms, threshold sweep and calibration plot"


def _recorded_checkpoint(record: dict[str, Any]) -> Path | None:
    """The checkpoint a search's ``metrics.json`` names (``train --max-gap --save FILE``), if it is there."""
    path = record.get("checkpoint")
    return Path(path) if path and Path(path).is_file() else None


def _attach_search_beside(view: RunView, folder: Path) -> None:
    """The search in a checkpoint's folder, if it chose this model (same method and threshold); a note
    otherwise."""
    search = decision.search_front(folder)
    if search is None:
        return
    chosen = search.chosen
    if (chosen["method"], float(chosen["threshold"])) == (view.facts["method"], view.threshold):
        view.search = search
    else:
        view.notes.append(f"The search in {folder} chose {chosen['method']} at threshold {chosen['threshold']}, not "
                          f"this checkpoint ({view.facts['method']} at {view.threshold:g}), so its front is not shown.")


def _view_of_checkpoint(checkpoint: Any, path: Path, data_file: str | Path | None = None) -> RunView:
    """Score the test split the checkpoint's run was evaluated on and compute metrics and rates from it."""
    import torch

    from groupmixnorm.metrics import fairness_report, group_rates
    from groupmixnorm.training.loop import evaluate, to_tensors

    data = checkpoint.run_data(data_file)
    _, scores = evaluate(checkpoint.method, checkpoint.model, to_tensors(data.test, torch.device("cpu")))
    scored = pd.DataFrame({"y": data.test.y, "score": scores,
                           "group": [data.group_names[int(a)] for a in data.test.a]})
    threshold = checkpoint.threshold  # 0.5 unless train --max-gap chose one on validation
    groups = scored["group"].to_numpy()
    metrics = fairness_report(data.test.y, scores, groups, threshold)
    rates = group_rates(data.test.y, scores, groups, threshold)
    spec = checkpoint.spec
    facts = {"source": str(path), "method": checkpoint.method.name,
             "options": _options_text(checkpoint.method.options()), "dataset": spec["dataset"],
             "protected attribute": data.sensitive, "groups": ", ".join(data.group_names),
             "split": data.protocol, "test rows": str(len(data.test)), "seed": str(spec["config"]["seed"]),
             "decision threshold": f"{threshold:g}"}
    return RunView(f"Fairness report: {checkpoint.method.name} on {spec['dataset']}", facts, metrics, rates, scored,
                   threshold=threshold)


def _view_of_record(record: dict[str, Any], path: Path) -> RunView:
    """The numbers a run (or a ``train --max-gap`` search) wrote to its ``metrics.json``."""
    from groupmixnorm.metrics import METRIC_NAMES

    if "chosen" in record:
        return _view_of_search_record(record, path)
    dataset = record["dataset"]
    rates = pd.DataFrame.from_dict(record["group_rates"], orient="index")
    rates.index.name = "group"
    facts = {"source": str(path), "method": record["method"], "options": record["setting"],
             "dataset": dataset["name"], "protected attribute": dataset["sensitive"],
             "groups": ", ".join(dataset["group_names"]), "split": dataset["protocol"],
             "test rows": str(dataset["rows"]["test"]), "seed": str(record["seed"]),
             "selected epoch": f"{record['selected_epoch'] + 1} of {len(record['history'])}",
             "command": record.get("command", "")}
    metrics = {key: record[key] for key in METRIC_NAMES if key in record}  # older runs measured fewer
    return RunView(f"Fairness report: {record['method']} on {dataset['name']}", facts, metrics, rates)


def _view_of_search_record(record: dict[str, Any], path: Path) -> RunView:
    """The numbers a ``train --max-gap`` search wrote for the model it chose (no per-group rates)."""
    chosen, dataset = record["chosen"], record["dataset"]
    bounds = ", ".join(f"{name} <= {bound:g}" for name, bound in record["bounds"].items())
    facts = {"source": str(path), "method": chosen["method"], "options": _options_text(chosen["options"]),
             "dataset": dataset["name"], "protected attribute": dataset["sensitive"],
             "groups": ", ".join(dataset["group_names"]), "test rows": str(dataset["rows"]["test"]),
             "decision threshold": f"{chosen['threshold']:g}",
             "chosen by": f"train --max-gap {bounds}: the best validation {record['select']} of "
                          f"{record['feasible_trials']} feasible trials (of {record['trials']})",
             "command": chosen.get("command", "")}
    rates = pd.DataFrame(columns=list(RATE_COLUMNS)).rename_axis("group")
    return RunView(f"Fairness report: {chosen['method']} on {dataset['name']} (chosen by train --max-gap)", facts,
                   dict(record["test"]["metrics"]), rates, threshold=float(chosen["threshold"]))


def bench_data(folder: Path) -> tuple[str, str]:
    """The data set and protected attribute that the runs of a bench folder trained on, read from the
    ``groupmixnorm train`` commands in its ``runs.csv``; ``ValueError`` unless they all name the same."""
    runs = pd.read_csv(folder / "runs.csv")
    commands = runs["command"].dropna().unique() if "command" in runs else []
    found = {_data_of(command) for command in commands}
    if len(found) != 1 or None in found:
        named = ", ".join(sorted(f"{d} ({s})" for d, s in (pair for pair in found if pair is not None))) or "none"
        raise ValueError(f"--bench {folder}: the commands in its runs.csv do not name one data set and protected "
                         f"attribute (--dataset, --sensitive; found {named}), so it cannot be matched to the run")
    return found.pop()


def _data_of(command: str) -> tuple[str, str] | None:
    """``(--dataset, --sensitive)`` of a ``groupmixnorm train`` command, or ``None`` without either."""
    words = shlex.split(command)
    values = [words[words.index(flag) + 1] if flag in words[:-1] else None for flag in ("--dataset", "--sensitive")]
    return None if None in values else (values[0], values[1])


def _check_same_data(view: RunView, bench: Path) -> None:
    """A bench's trade-off plots belong in a run's report only if both trained on the same data set and
    protected attribute."""
    dataset, sensitive = bench_data(bench)
    run = (view.facts["dataset"], view.facts["protected attribute"])
    if (dataset, sensitive) != run:
        raise ValueError(f"--bench {bench} trained on {dataset} (protected attribute {sensitive}), the run on "
                         f"{run[0]} (protected attribute {run[1]}): a bench's trade-off plots compare runs of the "
                         "same data set only")


def _checkpoint_in(folder: Path) -> Path | None:
    """The checkpoint saved in a run folder (``model.pt`` first), if any."""
    candidates = sorted(folder.glob("*.pt"), key=lambda p: (p.name != "model.pt", p.name))
    return next((p for p in candidates if p.name not in NOT_CHECKPOINTS), None)


# ---------------------------------------------------------------------------------------------- sections


def _run_sections(view: RunView, baseline: RunView | None, resamples: int) -> list[str]:
    """The sections of one model's report (with a baseline's numbers beside its own, if given)."""
    intervals = None if view.scored is None else decision.decision_intervals(view.scored, view.threshold,
                                                                              resamples=resamples)
    sections = [
        _run_section(view),
        _metrics_section(view, baseline, intervals),
        _rates_section(view, intervals),
        _ratio_section(view, intervals),
        _gaps_section(view, baseline, intervals),
        _scores_section(view),
        _sweep_section(view),
        _calibration_section(view),
    ]
    return sections + ([] if view.search is None else [_front_section(view.search)])


def _run_section(view: RunView) -> str:
    sizes = _group_sizes(view)
    warnings = [] if sizes is None else decision.small_group_lines(sizes)
    return _section("Run", "".join(_warning(line) for line in warnings) + _facts_table(view.facts)
                    + "".join(_note(note) for note in view.notes))


def _group_sizes(view: RunView) -> pd.Series | None:
    """Test rows per group: counted from the scores, else from the rates table; ``None`` if unknown."""
    if view.scored is not None:
        return view.scored["group"].value_counts().sort_index()
    return view.rates["count"] if "count" in view.rates and len(view.rates) else None


#: The row of the metrics table that holds the majority-class accuracy.
MAJORITY = "majority-class accuracy"


def _metrics_section(view: RunView, baseline: RunView | None, intervals: decision.Intervals | None) -> str:
    majority = _majority(view)
    table = pd.DataFrame({"model": _with_majority(view.metrics, majority)})
    if intervals is not None:
        table[f"{intervals.confidence:.0%} interval"] = _interval_texts(intervals.metrics, brackets_only=True)
    if baseline is not None:
        table[_baseline_column(baseline)] = pd.Series(_with_majority(baseline.metrics, _majority(baseline)))
    text = (f"<p>The {MAJORITY} predicts the test split's more common label for everyone: "
            f"max(p, 1 &minus; p) for the base rate p. Thresholded numbers use <code>score &ge; "
            f"{view.threshold:g}</code>.</p>")
    if majority is None:
        text += _note("No majority-class accuracy: the record has no per-group counts and there is no checkpoint.")
    if view.scored is not None:
        text += "".join(_warning(line) for line in useless_model_warnings(
            view.scored["y"], view.scored["score"], view.threshold, model="the model"))
    return _section("Test metrics", text + _table(table, "metrics") + _intervals_note(intervals))


def _majority(view: RunView) -> float | None:
    rate = decision.base_rate(view.scored, view.rates)
    return None if rate is None else majority_accuracy(rate)


def _with_majority(metrics: dict[str, float], majority: float | None) -> dict[str, float]:
    """``metrics`` with the majority-class accuracy right after the accuracy."""
    rows: dict[str, float] = {}
    for key, value in metrics.items():
        rows[key] = value
        if key == "accuracy":
            rows[MAJORITY] = float("nan") if majority is None else majority
    return rows


def _baseline_column(baseline: RunView) -> str:
    return f"baseline ({baseline.facts['method']})"


def _rates_section(view: RunView, intervals: decision.Intervals | None) -> str:
    if view.rates.empty:
        return _section("Rates by group", _note("No per-group rates: a --max-gap search's metrics.json stores none, "
                                                "and there is no checkpoint of the chosen model (--save)."))
    rates = view.rates[[c for c in RATE_COLUMNS if c in view.rates]].rename(columns=RATE_COLUMNS)
    body = (f"<p>Predictions are <code>score &ge; {view.threshold:g}</code>, made without the protected "
            "attribute.</p>" + _table(rates, "group-rates") + _image(_rates_plot(view.rates), "rates by group"))
    if intervals is None:
        return _section("Rates by group", body + _without_scores(view, "intervals"))
    cells = intervals.rates.apply(_interval_text, axis=1).unstack("rate")
    cells = cells[list(decision.INTERVAL_COLUMNS)].rename(columns=RATE_COLUMNS).rename_axis(columns=None)
    return _section("Rates by group", body + f"<p>Each rate with its {intervals.confidence:.0%} bootstrap interval "
                    "(base rates and counts are fixed: resampling keeps each group's size and base rate):</p>"
                    + _table(cells, "rate-intervals") + _intervals_note(intervals))


def _ratio_section(view: RunView, intervals: decision.Intervals | None) -> str:
    heading = "Selection-rate ratios (four-fifths rule)"
    if view.rates.empty:
        return _section(heading, _note("No ratios: they need the per-group selection rates, which are not known."))
    ratios = decision.selection_ratios(view.rates)
    table = pd.DataFrame({"selection rate": view.rates["selection_rate"], "ratio to the highest": ratios})
    if intervals is not None:
        table[f"{intervals.confidence:.0%} interval"] = _interval_texts(intervals.ratios, brackets_only=True)
    table["four-fifths rule"] = ["below 0.8" if r < decision.FOUR_FIFTHS else "passes" for r in ratios]
    flagged = [str(group) for group, r in ratios.items() if r < decision.FOUR_FIFTHS]
    smallest = view.metrics.get("dp_ratio", float(ratios.min()))
    verdict = _warning(f"Selected at under {decision.FOUR_FIFTHS:g} times the highest rate: {', '.join(flagged)}.") \
        if flagged else "<p>Every group passes.</p>"
    return _section(heading, f"<p>Each group's selection rate divided by the highest; the smallest ratio is "
                    f"<code>dp_ratio</code> = {smallest:.4f}. The four-fifths rule flags a ratio under "
                    f"{decision.FOUR_FIFTHS:g}.</p>" + verdict + _table(table, "ratios"))


def _gaps_section(view: RunView, baseline: RunView | None, intervals: decision.Intervals | None) -> str:
    table = gap_table(view.rates, view.metrics)
    if intervals is not None:
        table[f"{intervals.confidence:.0%} interval"] = _interval_texts(intervals.gaps, brackets_only=True)
    if baseline is not None:
        table[_baseline_column(baseline)] = gap_table(baseline.rates, baseline.metrics)["gap"]
    note = "" if intervals is not None else _without_scores(view, "intervals")
    return _section("Gaps between groups", _table(table, "gaps") + note + _intervals_note(intervals))


def _scores_section(view: RunView) -> str:
    heading = "Score distributions by group"
    if view.scored is None:
        return _section(heading, _without_scores(view, "score histograms"))
    return _section(heading, "<p>Each group's test scores (a density: each group's bars cover the same area), with "
                    "the decision threshold dashed.</p>"
                    + _image(score_histograms_plot(view.scored, view.threshold), "score histograms by group"))


def _sweep_section(view: RunView) -> str:
    heading = "Accuracy and gaps against the threshold"
    if view.scored is None:
        return _section(heading, _without_scores(view, "threshold sweep"))
    sweep = decision.threshold_sweep(view.scored)
    return _section(heading, "<p>What another global threshold would do on the test split (the model's is dashed; "
                    "choosing one by the test split would overfit it: <code>train --max-gap</code> chooses on "
                    "validation).</p>"
                    + _image(threshold_sweep_plot(sweep, view.threshold, _majority(view)), "threshold sweep")
                    + "<details><summary>The numbers</summary>" + _table(sweep, "threshold-sweep") + "</details>")


def _calibration_section(view: RunView) -> str:
    heading = "Calibration by group"
    if view.scored is None:
        return _section(heading, _without_scores(view, "calibration plot"))
    return _section(heading, "<p>Mean predicted score against the observed positive rate, in ten quantile bins of "
                    "each group's scores. A calibrated model follows the diagonal in every group.</p>"
                    + _image(_calibration_plot(view.scored), "calibration by group"))


def _front_section(search: decision.SearchFront) -> str:
    table = search.table
    trials = table.drop(columns=["seconds", "chosen"], errors="ignore").assign(
        chosen=["\u2714 chosen" if chosen else "" for chosen in table["chosen"]])
    trials.index = range(1, len(trials) + 1)
    judged_on = search.record.get("judged_on", "the validation split")  # searches before cross-fitting say nothing
    return _section("Validation front of the search", f"<p>Every trial of the <code>train --max-gap</code> search "
                    f"in {html.escape(str(search.folder))}, judged on {html.escape(judged_on)}: the objective against "
                    "each bounded gap's bootstrap upper end, the bound dashed, the chosen model circled.</p>"
                    + _image(search.png, "validation front with the chosen trial")
                    + _table(trials, "front"))


def _interval_text(row: pd.Series) -> str:
    """``estimate [low, high]``, as :class:`~groupmixnorm.metrics.uncertainty.Interval` prints it."""
    from groupmixnorm.metrics.uncertainty import Interval

    return "–" if row.isna().any() else str(Interval(row["estimate"], row["low"], row["high"]))


def _interval_texts(frame: pd.DataFrame, *, brackets_only: bool = False) -> pd.Series:
    """Each row's interval as text (just ``[low, high]`` with ``brackets_only``, beside a column of estimates)."""
    texts = frame.apply(_interval_text, axis=1)
    return texts.str.replace(r"^\S+ \[", "[", regex=True) if brackets_only else texts


def _intervals_note(intervals: decision.Intervals | None) -> str:
    if intervals is None:
        return ""
    return (f"<p><small>Intervals: {intervals.confidence:.0%} percentile bootstrap, {intervals.resamples} resamples "
            "of the test rows within each group and label, seed 0.</small></p>")


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _without_scores(view: RunView, what: str) -> str:
    """The one line of a section that needs the test scores ``view`` lacks."""
    return _note(f"No {what}: that needs the test labels and scores, and {view.no_scores}.")


def _warning(text: str) -> str:
    return f"<p class='warning'>&#9888; {html.escape(text)}</p>"


def _bench_sections(folder: Path) -> list[str]:
    """The trade-off plots of a bench folder (drawn from runs.csv when the PNGs are absent) and, per gap and
    bound, each method's test AP for the setting chosen on validation."""
    from groupmixnorm.experiments import report

    runs = pd.read_csv(folder / "runs.csv")
    summary = report.summarize(runs.rename(columns=lambda c: c.removeprefix("test_")))
    parts = []
    for gap in report.FRONT_GAPS:
        png = folder / f"ap_vs_{gap}.png"
        if not png.is_file():
            png = report.plot_fronts(summary, gap, Path(tempfile.mkdtemp()) / png.name, f"{folder.name}: AP vs {gap}")
        parts.append(f"<h3>AP against {gap}</h3>" + _image(png.read_bytes(), f"trade-off: AP against {gap}")
                     + "<p>Mean test AP over seeds of the setting chosen per seed on validation (best validation "
                       f"AP among those whose validation {gap} is within the bound; seeds that met it):</p>"
                     + _table(_validated_best(runs, gap), f"best-ap-{gap}"))
    return [_section(f"Trade-off: bench {folder.name}", "".join(parts))]


def _validated_best(runs: pd.DataFrame, gap: str) -> pd.DataFrame:
    """One row per method, one column per bound of ``gap``: the chosen runs' mean test AP and seeds met."""
    from groupmixnorm.experiments.selection import BOUNDS, choose_on_validation, summarize_choices

    if "dataset" not in runs.columns:
        runs = runs.assign(dataset="bench")
    table: dict[str, dict[str, str]] = {}
    for bound in BOUNDS[gap]:
        cells = summarize_choices(choose_on_validation(runs, gap=gap, bound=bound), gap=gap)
        for row in cells.itertuples():
            ap = "—" if row.test_ap is None else f"{row.test_ap.estimate:.4f}"
            table.setdefault(row.method, {})[f"<= {bound:g}"] = f"{ap} ({row.feasible_seeds}/{row.seeds})"
    return pd.DataFrame(table).T.rename_axis("method")


# ------------------------------------------------------------------------------------------------- plots


def _rates_plot(rates: pd.DataFrame) -> bytes:
    plt = _pyplot()
    names = [("selection_rate", "selection rate"), ("tpr", "true positive rate"), ("fpr", "false positive rate")]
    figure, axes = plt.subplots(figsize=(7.5, 3.8))
    positions = np.arange(len(rates))
    width = 0.8 / len(names)
    for offset, (column, label) in enumerate(names):
        axes.bar(positions + (offset - 1) * width, rates[column].to_numpy(dtype=float), width, label=label)
    axes.set_xticks(positions, [str(g) for g in rates.index], rotation=20 if len(rates) > 4 else 0)
    axes.set_ylim(0, 1)
    axes.set_ylabel("rate on the test split")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def _calibration_plot(scored: pd.DataFrame) -> bytes:
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 5.0))
    axes.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
    for group, rows in scored.groupby("group", sort=True):
        if rows["y"].nunique() < 2:
            continue  # a calibration curve needs both labels in the group
        observed, predicted = calibration_curve(rows["y"], rows["score"], n_bins=10, strategy="quantile")
        axes.plot(predicted, observed, "-o", markersize=4, label=f"{group} (n={len(rows)})")
    axes.set_xlabel("mean predicted score")
    axes.set_ylabel("observed positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


# -------------------------------------------------------------------------------------------------- html


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; font-family: monospace; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #a33; }
.warning { background: #fff3cd; border-left: 4px solid #d39e00; padding: 0.4em 0.8em; }
summary { cursor: pointer; color: #555; }
"""


def _document(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(sections)
            + "\n<p><small>Written by groupmixnorm report.</small></p></body></html>\n")


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>{body}</section>"


def _table(frame: pd.DataFrame, identifier: str) -> str:
    # Without index names: pandas would give them a header row of their own.
    return frame.rename_axis(index=None).to_html(table_id=identifier, border=0, na_rep="–",
                                                 float_format=lambda v: f"{v:.4f}")


def _facts_table(facts: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(key)}</th><td class='text'>{html.escape(value)}</td></tr>"
                   for key, value in facts.items())
    return f"<table id='facts'>{rows}</table>"


def _image(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(options.items())) or "default"

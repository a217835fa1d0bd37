"""A self-contained HTML fairness report of one run (a checkpoint or a run folder) or of a bench.

The file needs nothing beside itself: plots are PNGs embedded as base64, tables are HTML. For one model it
shows the test metrics, per-group selection, true and false positive rates, the gaps between groups, and
calibration by group; for a bench (or with ``bench=``) the AP-versus-gap trade-off plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.training import write_text_atomic

#: Per-group columns shown, in order, with their headers.
RATE_COLUMNS = {"count": "rows", "base_rate": "base rate", "selection_rate": "selection rate",
                "tpr": "true positive rate", "fpr": "false positive rate", "accuracy": "accuracy",
                "mean_score": "mean score"}
#: Files of a run folder that are not checkpoints.
NOT_CHECKPOINTS = ("train_state.pt",)


@dataclass
class RunView:
    """What the report shows about one model: where it comes from, its metrics, its per-group rates, and
    (when a checkpoint was available) the test labels, scores and groups behind the calibration plot."""

    title: str
    facts: dict[str, str]
    metrics: dict[str, float]
    rates: pd.DataFrame
    scored: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def write_report(source: str | Path, out: str | Path, *, bench: str | Path | None = None,
                 data: str | Path | None = None) -> Path:
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
        the same sha256).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ValueError
        If ``source`` (or ``bench``) is none of the above, or ``bench``'s runs trained on another data set
        or protected attribute than the run.
    """
    return write_text_atomic(out, build_report(Path(source), bench=None if bench is None else Path(bench), data=data))


def build_report(source: Path, *, bench: Path | None = None, data: str | Path | None = None) -> str:
    """The report of ``source`` as one HTML document (see :func:`write_report`)."""
    if bench is not None and not (bench / "runs.csv").is_file():
        raise ValueError(f"--bench {bench} is not a bench results folder (it has no runs.csv)")
    if source.is_dir() and (source / "runs.csv").is_file() and not (source / "metrics.json").is_file():
        if bench is not None:
            raise ValueError(f"--bench adds a bench's plots to a run's report, and {source} is a bench folder itself")
        if data is not None:
            raise ValueError(f"--data is read to score a checkpoint again, and {source} is a bench folder")
        return _document(f"Bench report: {source.name}", _bench_sections(source))
    view = load_run_view(source, data=data)
    if bench is not None:
        _check_same_data(view, bench)
    sections = _run_sections(view) + ([] if bench is None else _bench_sections(bench))
    return _document(view.title, sections)


def load_run_view(source: Path, *, data: str | Path | None = None) -> RunView:
    """A :class:`RunView` of a checkpoint file or of a run folder (``metrics.json``, maybe a checkpoint);
    ``data``: a copy of a CSV run's training file (see :func:`write_report`)."""
    from groupmixnorm.training.checkpoint import load_checkpoint

    if source.is_file():
        return _view_of_checkpoint(load_checkpoint(source), source, data)
    if not source.is_dir():
        raise ValueError(f"no run folder, checkpoint or bench folder at {source}")
    record_path = source / "metrics.json"
    if not record_path.is_file():
        raise ValueError(f"{source} has neither metrics.json (a run folder) nor runs.csv (a bench folder)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    view = _view_of_record(record, record_path)
    checkpoint = _checkpoint_in(source)
    if checkpoint is None and data is not None:
        raise ValueError(f"--data is read to score a checkpoint again, and {source} has none")
    if checkpoint is None:
        view.notes.append("No checkpoint in the run folder (train --save DIR/model.pt), so no calibration plot.")
    else:
        view.scored = _view_of_checkpoint(load_checkpoint(checkpoint), checkpoint, data).scored
        view.facts["checkpoint"] = str(checkpoint)
    return view


def _view_of_checkpoint(checkpoint: Any, path: Path, data_file: str | Path | None = None) -> RunView:
    """Score the test split the checkpoint's run was evaluated on and compute metrics and rates from it."""
    import torch

    from groupmixnorm.training.loop import evaluate, named_group_rates, to_tensors

    data = checkpoint.run_data(data_file)
    metrics, scores = evaluate(checkpoint.method, checkpoint.model, to_tensors(data.test, torch.device("cpu")))
    rates = named_group_rates(data, data.test.y, scores, data.test.a)
    scored = pd.DataFrame({"y": data.test.y, "score": scores,
                           "group": [data.group_names[int(a)] for a in data.test.a]})
    spec = checkpoint.spec
    facts = {"source": str(path), "method": checkpoint.method.name,
             "options": _options_text(checkpoint.method.options()), "dataset": spec["dataset"],
             "protected attribute": data.sensitive, "groups": ", ".join(data.group_names),
             "split": data.protocol, "test rows": str(len(data.test)), "seed": str(spec["config"]["seed"])}
    return RunView(f"Fairness report: {checkpoint.method.name} on {spec['dataset']}", facts, metrics, rates, scored)


def _view_of_record(record: dict[str, Any], path: Path) -> RunView:
    """The numbers a run wrote to its ``metrics.json``."""
    from groupmixnorm.experiments.spec import METRIC_KEYS

    dataset = record["dataset"]
    rates = pd.DataFrame.from_dict(record["group_rates"], orient="index")
    rates.index.name = "group"
    facts = {"source": str(path), "method": record["method"], "options": record["setting"],
             "dataset": dataset["name"], "protected attribute": dataset["sensitive"],
             "groups": ", ".join(dataset["group_names"]), "split": dataset["protocol"],
             "test rows": str(dataset["rows"]["test"]), "seed": str(record["seed"]),
             "selected epoch": f"{record['selected_epoch'] + 1} of {len(record['history'])}",
             "command": record.get("command", "")}
    metrics = {key: record[key] for key in METRIC_KEYS if key in record}  # older runs measured fewer
    return RunView(f"Fairness report: {record['method']} on {dataset['name']}", facts, metrics, rates)


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


def _run_sections(view: RunView) -> list[str]:
    rates = view.rates[[c for c in RATE_COLUMNS if c in view.rates]].rename(columns=RATE_COLUMNS)
    sections = [
        _section("Run", _facts_table(view.facts)
                 + "".join(f"<p class='note'>{html.escape(note)}</p>" for note in view.notes)),
        _section("Test metrics", _table(pd.DataFrame({"value": view.metrics}), "metrics")),
        _section("Rates by group",
                 "<p>Predictions are <code>score &ge; 0.5</code>, made without the protected attribute.</p>"
                 + _table(rates, "group-rates") + _image(_rates_plot(view.rates), "rates by group")),
        _section("Gaps between groups", _table(gap_table(view.rates, view.metrics), "gaps")),
    ]
    if view.scored is not None:
        sections.append(_section(
            "Calibration by group",
            "<p>Mean predicted score against the observed positive rate, in ten quantile bins of each group's "
            "scores. A calibrated model follows the diagonal in every group.</p>"
            + _image(_calibration_plot(view.scored), "calibration by group"),
        ))
    return sections


def gap_table(rates: pd.DataFrame, metrics: dict[str, float]) -> pd.DataFrame:
    """The largest difference between groups of each rate, and the package's soft gaps.

    ``rates`` is :func:`~groupmixnorm.metrics.group_rates`' table and ``metrics`` a
    :func:`~groupmixnorm.metrics.fairness_report` (or a record's test metrics).
    """
    def spread(column: str) -> float:
        return float(rates[column].max() - rates[column].min())

    rows = [
        ("selection rate (demographic parity, dp_gap_hard)", metrics["dp_gap_hard"]),
        ("true positive rate (equal opportunity, eopp_gap_hard)", metrics["eopp_gap_hard"]),
        ("false positive rate", spread("fpr")),
        ("equalized odds: larger of TPR and FPR gaps (eodds_gap_hard)", metrics["eodds_gap_hard"]),
        ("mean score (soft demographic parity, dp_gap)", metrics["dp_gap"]),
        ("mean score of positives (eopp_gap)", metrics["eopp_gap"]),
        ("mean scores given each label, summed (eodds_gap)", metrics["eodds_gap"]),
    ]
    threshold_free = [
        ("selection rate at any threshold (KS distance, dp_ks)", "dp_ks"),
        ("selection rate at any threshold within each label (eodds_ks)", "eodds_ks"),
        ("score CDFs, area between them (abcc)", "abcc"),
    ]
    rows += [(label, metrics[key]) for label, key in threshold_free if key in metrics]  # older runs lack them
    return pd.DataFrame(rows, columns=["between groups, largest difference of", "gap"]).set_index(
        "between groups, largest difference of")


def _bench_sections(folder: Path) -> list[str]:
    """The trade-off plots of a bench folder (drawn from runs.csv when the PNGs are absent) and the best AP
    under each gap bound."""
    from groupmixnorm.experiments import report

    summary = report.summarize(pd.read_csv(folder / "runs.csv"))
    parts = []
    for gap in report.FRONT_GAPS:
        png = folder / f"ap_vs_{gap}.png"
        if not png.is_file():
            png = report.plot_fronts(summary, gap, Path(tempfile.mkdtemp()) / png.name, f"{folder.name}: AP vs {gap}")
        best = report.best_ap_under(summary, gap).set_index("method")
        parts.append(f"<h3>AP against {gap}</h3>" + _image(png.read_bytes(), f"trade-off: AP against {gap}")
                     + f"<p>Best mean test AP among settings whose mean {gap} is within each bound:</p>"
                     + _table(best, f"best-ap-{gap}"))
    return [_section(f"Trade-off: bench {folder.name}", "".join(parts))]


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- html


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; font-family: monospace; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #a33; }
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

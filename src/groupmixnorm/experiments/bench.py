"""Benchmarks: a grid of runs (methods x settings x seeds), a resumable record store, and the result files.

A bench is data first: every run writes one JSON record (atomically) named after its spec's key, and a
finished record is never recomputed. Tables and plots are derived from the records alone, so deleting
``runs.csv`` or the report and running the bench again rebuilds them without training anything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupmixnorm.experiments.spec import RunSpec, execute
from groupmixnorm.training import TrainConfig, write_json_atomic

#: Columns of ``runs.csv``, in order.
RUN_COLUMNS = (
    "method", "setting", "seed", "accuracy", "ap", "dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard",
    "eopp_gap_hard", "eodds_gap_hard", "epoch_seconds", "command",
)


@dataclass(frozen=True)
class Setting:
    """One point of a method's sweep: its options, and the batch sampling the protocol gives it."""

    method: str
    options: dict[str, Any]
    sampling: str = "group"


@dataclass(frozen=True)
class BenchPlan:
    """What a bench trains: its settings, seeds and loop configuration. ``name`` is also the dataset."""

    name: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    config: TrainConfig
    protocol: str = "fairmixup"
    #: Settings timed side by side (ERM first) for the report's time-per-epoch table, and how many rounds.
    timed: tuple[Setting, ...] = ()
    timing_rounds: int = 7

    def specs(self) -> list[RunSpec]:
        """Every run of the plan, seeds outermost so that a partial bench covers all settings evenly."""
        return [
            RunSpec(
                method=setting.method, method_options=dict(setting.options), dataset=self.name, protocol=self.protocol,
                config=dataclasses.replace(self.config, seed=seed, sampling=setting.sampling),
            )
            for seed in self.seeds
            for setting in self.settings
        ]


def _sweep(method: str, knob: str, values: Iterable[Any], **fixed: Any) -> list[Setting]:
    sampling = "group_label" if fixed.get("fairness") == "eo" else "group"
    return [Setting(method, {**fixed, knob: value}, sampling) for value in values]


def _gmn(**options: Any) -> Setting:
    """A gmn setting that names its placement and alignment options, so its command keeps meaning the same
    run if the method's defaults change."""
    options = {"placement": "all", "align": 0.0, "align_quantiles": 0, **options}
    sampling = "group_label" if options.get("fairness") == "eo" else "group"
    return Setting("gmn", options, sampling)


#: GroupMixNorm settings of the Adult bench. The first block is the paper's layer in its variants (no
#: penalty); then alignment at the hidden layers; then the layer on the logit with the alignment weight
#: swept, its quantile variant (the default: align=1, 16 quantiles), the no-mixing ablation, and the
#: equalized-odds variants.
ADULT_GMN_SETTINGS: tuple[Setting, ...] = (
    _gmn(),
    _gmn(mix="pairwise"),
    _gmn(alpha=0.1),
    _gmn(output_scale="mixed"),
    _gmn(eval_mode="group"),
    _gmn(placement="head", eval_mode="group"),
    _gmn(placement="logit", eval_mode="group"),
    _gmn(align=100.0),
    *(_gmn(placement="logit", align=weight) for weight in (1.0, 3.0, 10.0, 30.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16) for weight in (0.3, 1.0, 3.0, 10.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16, p=0.0) for weight in (0.3, 1.0, 3.0)),
    *(_gmn(placement="logit", align=weight, fairness="eo") for weight in (3.0, 10.0, 30.0, 100.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16, fairness="eo") for weight in (1.0, 10.0)),
    *(_gmn(placement="logit", align=weight, fairness="eo", p=0.0) for weight in (10.0, 30.0)),
)


def adult_plan(*, quick: bool = False, seeds: int = 5) -> BenchPlan:
    """The Adult comparison under the Fair Mixup protocol (see the README's "Benchmarks" section).

    Full: every method's trade-off sweep, ``seeds`` seeds, 10 epochs of 100 group-balanced batches of 500
    per group (per group and label for equalized-odds settings), the last epoch kept. Quick: one setting
    per method, one seed, 2 epochs of 20 batches; a smoke test of the whole pipeline in a minute or two.
    """
    if quick:
        settings = (
            Setting("erm", {}),
            Setting("gapreg", {"lam": 1.0, "fairness": "dp"}),
            Setting("adversarial", {"lam": 1.0, "fairness": "dp"}),
            Setting("fairmixup", {"lam": 0.5, "fairness": "dp"}),
            _gmn(),
            _gmn(placement="logit", align=1.0, align_quantiles=16),
            Setting("expgrad", {"fairness": "dp"}),
        )
        config = TrainConfig(epochs=2, iterations=20, batch_size=100, select="last")
        return BenchPlan("adult", settings, (0,), config, timed=settings[:2] + settings[4:6], timing_rounds=1)
    settings = (
        Setting("erm", {}),
        *_sweep("gapreg", "lam", (0.1, 0.3, 0.5, 1.0, 2.0), fairness="dp"),
        *_sweep("gapreg", "lam", (0.5, 1.0, 2.0, 5.0), fairness="eo"),
        *_sweep("adversarial", "lam", (0.1, 0.3, 1.0, 3.0), fairness="dp"),
        *_sweep("adversarial", "lam", (0.3, 1.0, 3.0), fairness="eo"),
        *_sweep("fairmixup", "lam", (0.1, 0.3, 0.5, 0.7, 1.0), fairness="dp"),
        *_sweep("fairmixup", "lam", (0.5, 1.0, 2.0, 5.0), fairness="eo"),
        *ADULT_GMN_SETTINGS,
        Setting("expgrad", {"fairness": "dp"}),
        Setting("expgrad", {"fairness": "eo"}),
    )
    config = TrainConfig(epochs=10, iterations=100, batch_size=500, select="last")
    timed = (
        Setting("erm", {}),
        _gmn(placement="logit", align=1.0, align_quantiles=16),
        _gmn(placement="logit", align=10.0),
        _gmn(),
        _gmn(placement="logit", align=10.0, fairness="eo"),
        Setting("gapreg", {"lam": 1.0, "fairness": "dp"}),
        Setting("gapreg", {"lam": 1.0, "fairness": "eo"}, "group_label"),
        Setting("adversarial", {"lam": 1.0, "fairness": "dp"}),
        Setting("adversarial", {"lam": 1.0, "fairness": "eo"}, "group_label"),
        Setting("fairmixup", {"lam": 0.5, "fairness": "dp"}),
        Setting("fairmixup", {"lam": 1.0, "fairness": "eo"}, "group_label"),
    )
    return BenchPlan("adult", settings, tuple(range(seeds)), config, timed=timed)


PLANS: dict[str, Callable[..., BenchPlan]] = {"adult": adult_plan}


class RecordStore:
    """One JSON file per finished run under ``root``, named by the run's key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, spec: RunSpec) -> Path:
        return self.root / f"{spec.key()}.json"

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        """The finished record of ``spec``, or ``None`` if it has not run (or its file is unreadable)."""
        path = self.path(spec)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # never written by us half-way (writes are atomic), but a hand edit may break it
        # Compare in JSON form: tuples in the spec come back from the file as lists.
        return record if record.get("spec") == json.loads(json.dumps(spec.to_dict())) else None

    def save(self, spec: RunSpec, record: dict[str, Any]) -> Path:
        return write_json_atomic(self.path(spec), record)


def run_plan(
    plan: BenchPlan,
    store: RecordStore,
    *,
    on_run: Callable[[RunSpec, dict[str, Any], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec of ``plan`` that has no record in ``store``; return all records in plan order.

    ``on_run(spec, record, reused)`` is called after each run (``reused`` when it came from the store).
    """
    records = []
    for spec in plan.specs():
        record = store.load(spec)
        reused = record is not None
        if record is None:
            record = execute(spec)
            store.save(spec, record)
        records.append(record)
        if on_run is not None:
            on_run(spec, record, reused)
    return records


def side_by_side_epoch_times(plan: BenchPlan, path: Path) -> Any:
    """Time ``plan.timed`` side by side (see :func:`groupmixnorm.experiments.timing.time_epochs`), once:
    the table is stored at ``path`` (JSON, atomic) and read back on later calls with the same plan."""
    import pandas as pd

    from groupmixnorm.data import load_dataset
    from groupmixnorm.experiments.spec import setting_label
    from groupmixnorm.experiments.timing import time_epochs

    key = {"timed": [dataclasses.asdict(s) for s in plan.timed], "rounds": plan.timing_rounds,
           "config": dataclasses.asdict(plan.config), "protocol": plan.protocol}
    key = json.loads(json.dumps(key))
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return pd.DataFrame(stored["table"])
    contenders = [(f"{s.method} {setting_label(s.options)}", s.method, s.options, s.sampling) for s in plan.timed]
    data = load_dataset(plan.name, protocol=plan.protocol, seed=0)
    table = time_epochs(contenders, data, plan.config, rounds=plan.timing_rounds)
    write_json_atomic(path, {"key": key, "table": table.to_dict(orient="list")})
    return table


def runs_table(records: Sequence[dict[str, Any]]) -> Any:
    """One row per run with :data:`RUN_COLUMNS` (a pandas DataFrame)."""
    import pandas as pd

    rows = []
    for record in records:
        row = {key: record[key] for key in RUN_COLUMNS if key in record}
        row["epoch_seconds"] = record["timings"]["median_epoch_seconds"]
        row["command"] = record["command"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def write_results(plan: BenchPlan, records: Sequence[dict[str, Any]], results_dir: Path, command: str) -> list[Path]:
    """Write ``runs.csv``, the trade-off plots and the Markdown report of a bench from its records.

    Layout: ``results_dir/<name>/runs.csv``, ``results_dir/<name>/ap_vs_<gap>.png`` and
    ``results_dir/<name>.md``.
    """
    from groupmixnorm.experiments import report
    from groupmixnorm.training import write_text_atomic

    folder = Path(results_dir) / plan.name
    runs = runs_table(records)
    summary = report.summarize(runs)
    summary.attrs["needs_attribute"] = sorted(
        {(r["method"], r["setting"]) for r in records if r.get("uses_sensitive_at_prediction")}
    )
    written = [report.write_csv_atomic(runs, folder / "runs.csv")]
    plots = {}
    for gap in report.FRONT_GAPS:
        title = f"{plan.name}: AP vs {gap}, {len(plan.seeds)} seed(s)"
        plots[gap] = report.plot_fronts(summary, gap, folder / f"ap_vs_{gap}.png", title)
        written.append(plots[gap])
    timing = None
    if plan.timed:
        timing = side_by_side_epoch_times(plan, folder / "epoch_time.json")
        written.append(folder / "epoch_time.json")
    text = _markdown_report(plan, records, summary, plots, results_dir, command, timing)
    written.append(write_text_atomic(Path(results_dir) / f"{plan.name}.md", text))
    return written


def _markdown_report(
    plan: BenchPlan, records: Sequence[dict[str, Any]], summary: Any, plots: dict[str, Path], results_dir: Path,
    command: str, timing: Any = None,
) -> str:
    from groupmixnorm.experiments import report

    versions = records[0]["versions"] if records else {}
    erm = summary[summary["method"] == "erm"]
    lines = [
        f"# Bench: {plan.name}",
        "",
        f"Generated by `{command}` from {len(records)} run records in `{plan.name}/records/`; "
        f"every row of [`{plan.name}/runs.csv`]({plan.name}/runs.csv) carries the `groupmixnorm train` "
        "command that reproduces it alone.",
        "",
        f"Protocol `{plan.protocol}`, seeds {list(plan.seeds)}, {plan.config.epochs} epochs of "
        f"{plan.config.iterations} batches, {plan.config.batch_size} samples per group (per group and label "
        f"for equalized-odds settings), hidden {list(plan.config.hidden)}, Adam lr {plan.config.lr}, "
        f"epoch kept: `{plan.config.select}`. Soft gaps on scores; `_hard` gaps at threshold 0.5 "
        "(fairlearn's definitions). Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform") + ".",
        "",
        "## Best AP under a fairness bound (means over seeds)",
        "",
    ]
    for gap in report.FRONT_GAPS:
        lines += [f"### {gap}", "", report.markdown_table(report.best_ap_under(summary, gap)), ""]
    if not erm.empty:
        lines += [f"ERM: AP {erm['ap_mean'].iloc[0]:.4f}, dp_gap {erm['dp_gap_mean'].iloc[0]:.4f}, "
                  f"eodds_gap {erm['eodds_gap_mean'].iloc[0]:.4f}, {erm['epoch_seconds'].iloc[0]:.3f} s/epoch.", ""]
    if "gmn" in set(summary["method"]) and len(set(summary["method"])) > 1:
        lines += ["## GroupMixNorm against its peers", "",
                  "Settings that need the protected attribute at prediction time are left out here.", "",
                  *report.goal_check(summary), ""]
    if timing is not None:
        lines += ["## Time per epoch relative to ERM, measured side by side", "",
                  f"The settings below trained in turns, one epoch each, {plan.timing_rounds} round(s), in one "
                  "process (`groupmixnorm.experiments.timing.time_epochs`), so they share the machine's load; "
                  "medians.", "",
                  report.markdown_table(timing.assign(
                      seconds_per_epoch=timing["seconds_per_epoch"].map("{:.3f}".format),
                      x_reference=timing["x_reference"].map("{:.2f}x".format),
                  ).rename(columns={"x_reference": "x ERM"})), ""]
    lines += ["## Trade-off fronts", ""]
    for gap, path in plots.items():
        lines += [f"![AP vs {gap}]({path.relative_to(results_dir).as_posix()})", ""]
    lines += [
        "## Every setting (mean ± std over seeds)",
        "",
        "Time per epoch is the median over runs; `time vs ERM` divides it by ERM's median epoch in the same bench. "
        "Runs resumed in separate invocations on a shared machine saw different loads: for ratios measured "
        "side by side, use `python benchmarks/epoch_time.py`. "
        "† marks settings that need the protected attribute at prediction time.",
        "",
        report.format_summary_table(summary),
        "",
    ]
    return "\n".join(lines)

"""The invariance benchmarks: how much of the protected attribute each method's layers keep.

On Adult, the models are the Adult bench's best settings per method (best AP with dp_gap <= 0.05, or <= 0.10
where a method has none) and the paper's layer in its variants; on colored and textured digits, ERM with and
without batch normalization, the paper's layer (with and without mixing, and with training's statistics at
prediction) and the best peer. Each is trained exactly as in its grid bench (the same specs), then analyzed
on its test split (:mod:`groupmixnorm.experiments.invariance`): a table model from its saved checkpoint, an
image model in memory right after training (image models have no checkpoints). One JSON record per model,
written atomically; a finished one is never recomputed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from groupmixnorm.experiments.bench import (
    BenchPlan,
    RecordStore,
    adult_plan,
    colored_digits_plan,
    protocol_sampling,
    textured_digits_plan,
    train_with_checkpoint,
)
from groupmixnorm.data import IMAGE_DATASETS
from groupmixnorm.experiments.invariance import AnalysisOptions, analyze_checkpoint, analyze_model, strongest_probe
from groupmixnorm.experiments.report import over_seeds
from groupmixnorm.experiments.spec import RunSpec, execute
from groupmixnorm.files import write_text_atomic

#: One analyzed setting: (method, options as named in the grid bench, why it is analyzed).
Analyzed = tuple[str, dict[str, Any], str]
_PAPER_LAYER = {"placement": "all", "align": 0.0, "align_quantiles": 0}

#: The analyzed settings of the Adult bench.
SETTINGS: tuple[Analyzed, ...] = (
    ("erm", {}, "the unconstrained reference"),
    ("gapreg", {"fairness": "dp", "lam": 1.0}, "best AP with dp_gap <= 0.05"),
    ("adversarial", {"fairness": "dp", "lam": 3.0}, "best AP with dp_gap <= 0.10 (none reaches 0.05)"),
    ("fairmixup", {"fairness": "dp", "lam": 1.0}, "best AP with dp_gap <= 0.05"),
    ("gmn", {"placement": "logit", "align": 1.0, "align_quantiles": 16}, "the default; best AP with dp_gap <= 0.05"),
    ("gmn", _PAPER_LAYER, "the paper's layer after every hidden layer"),
    ("gmn", {**_PAPER_LAYER, "eval_mode": "posterior"}, "the paper's layer, evaluated with posterior group statistics"),
    ("gmn", {**_PAPER_LAYER, "eval_mode": "group"},
     "the paper's layer, evaluated with each row's own group statistics as in training (reads the attribute)"),
    ("gmn", {"placement": "all", "align": 1.0, "align_quantiles": 16},
     "every layer with a per-channel quantile penalty on its input"),
    ("gmn", {"placement": "all", "align": 1.0, "align_quantiles": 16, "align_projections": 16},
     "every layer with a sliced quantile penalty (16 random directions) on its input"),
)

#: The analyzed settings of the digits benches.
DIGITS_SETTINGS: tuple[Analyzed, ...] = (
    ("erm", {}, "the unconstrained reference"),
    ("erm", {"norm": "batchnorm"}, "the same CNN with BatchNorm2d in every block"),
    ("gmn", _PAPER_LAYER, "the paper's layer in every block"),
    ("gmn", {**_PAPER_LAYER, "p": 0.0}, "the paper's layer with its mixing off (batch normalization)"),
    ("gmn", {**_PAPER_LAYER, "eval_mode": "group"},
     "the paper's layer, evaluated with each image's own group statistics as in training (reads the attribute)"),
    ("adversarial", {"fairness": "eo", "lam": 1.0}, "the best peer of colored digits"),
)


@dataclass(frozen=True)
class InvarianceBench:
    """One invariance benchmark: the grid bench whose specs it trains, what it analyzes, and how the report
    names the data and the attribute."""

    name: str
    plan: Callable[..., BenchPlan]
    settings: tuple[Analyzed, ...]
    title: str
    attribute: str
    training: str


BENCHES: dict[str, InvarianceBench] = {
    "adult-invariance": InvarianceBench("adult-invariance", adult_plan, SETTINGS, "Adult, sex", "sex",
                                        "Fair Mixup protocol"),
    "colored-digits-invariance": InvarianceBench(
        "colored-digits-invariance", colored_digits_plan, DIGITS_SETTINGS, "colored digits, color", "color",
        "30 epochs of 20 group-balanced batches"),
    "textured-digits-invariance": InvarianceBench(
        "textured-digits-invariance", textured_digits_plan, DIGITS_SETTINGS, "textured digits, texture", "texture",
        "30 epochs of 20 group-balanced batches"),
}
SUMMARY_LAYERS = ("probe_balanced_accuracy", "probe_auc", "mmd", "mmd_p_value")


def invariance_specs(bench: InvarianceBench = BENCHES["adult-invariance"], *, seeds: int = 5,
                     quick: bool = False) -> list[tuple[RunSpec, str]]:
    """The grid bench's specs of the analyzed settings (quick: its quick loop settings), with each one's
    reason; a setting the grid does not hold gets the grid's loop settings."""
    plan = bench.plan(quick=quick, seeds=seeds)
    chosen = []
    for seed in range(1 if quick else seeds):
        for method, options, why in bench.settings:
            spec = next((s for s in _all_specs(plan, seed)
                         if (s.method, json.dumps(s.method_options, sort_keys=True)) == (method, json.dumps(options, sort_keys=True))),
                        None)
            chosen.append((spec if spec is not None else _spec_like(plan, method, options, seed), why))
    return chosen


def _all_specs(plan: BenchPlan, seed: int) -> list[RunSpec]:
    return [spec for spec in plan.specs() if spec.config.seed == seed]


def _spec_like(plan: BenchPlan, method: str, options: dict[str, Any], seed: int) -> RunSpec:
    """A spec for a setting the (quick) plan does not hold, with the plan's loop settings."""
    config = dataclasses.replace(plan.config, seed=seed, sampling=protocol_sampling(options))
    return RunSpec(method=method, method_options=dict(options), dataset=plan.dataset_name, sensitive=plan.sensitive,
                   protocol=plan.protocol, config=config, dataset_options=dict(plan.dataset_options))


def run_invariance(root: Path, bench: InvarianceBench = BENCHES["adult-invariance"], *, seeds: int = 5,
                   quick: bool = False, on_run: Callable[[str], None] | None = None,
                   plots_dir: Path | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) and analyze every model of ``bench`` under ``root``; return the records.

    Embedding plots of seed 0 go to ``plots_dir/<method>-<n>/`` when given."""
    store = RecordStore(root)
    options = AnalysisOptions(permutations=50, max_rows=1000, mmd_rows_per_group=200) if quick else AnalysisOptions()
    records = []
    for index, (spec, why) in enumerate(invariance_specs(bench, seeds=seeds, quick=quick)):
        setting_index = index % len(bench.settings)

        def train_and_analyze() -> dict[str, Any]:
            plots = plots_dir / f"{spec.method}-{setting_index}" if plots_dir is not None and spec.config.seed == 0 else None
            if spec.dataset in IMAGE_DATASETS:
                record, analysis = _train_and_analyze_in_memory(store, spec, plots, options)
            else:
                record, checkpoint = train_with_checkpoint(store, spec, save=True)
                analysis = analyze_checkpoint(checkpoint, plots, options=options)
            return analysis_record(spec, record, analysis, why, setting_index)

        records.append(store.reuse_or_make(f"analysis-{spec.key()}", train_and_analyze))
        if on_run:
            on_run(f"{spec.method} seed {spec.config.seed}")
    return records


def _train_and_analyze_in_memory(store: RecordStore, spec: RunSpec, plots: Path | None,
                                 options: AnalysisOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``spec`` and analyze its model before it is gone (image models are not saved as checkpoints);
    the run's record is stored as the grid benches store theirs."""
    analyses = []
    about = {"method": spec.method, "method_options": spec.method_options}
    record = execute(spec, inspect=lambda model, method, data: analyses.append(
        analyze_model(model, method, data, plots, options=options, about=about)))
    record["command"] = spec.command(out="OUT")
    store.save(spec, record)
    return record, analyses[0]


def analysis_record(spec: RunSpec, record: dict[str, Any], analysis: dict[str, Any], why: str,
                    setting_index: int) -> dict[str, Any]:
    """What the report keeps of one model: its outcome, why it is in the bench, and each layer's probes."""
    return {
        "method": spec.method, "setting": record["setting"], "setting_index": setting_index, "why": why,
        "seed": spec.config.seed, "ap": record["ap"], "dp_gap": record["dp_gap"], "eodds_gap": record["eodds_gap"],
        "layers": analysis["layers"], "chance_balanced_accuracy": analysis["chance_balanced_accuracy"],
        "analysis_options": analysis["options"], "train_command": record["command"],
    }


def invariance_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean and std over seeds of every layer's numbers, per setting and layer (layers in forward order);
    ``output`` marks the model's output. The probe numbers are those of :func:`strongest_probe`, taken from
    each layer's probes, so that records of older analyses are summarized the same way."""
    rows = [{"setting_index": r["setting_index"], "method": r["method"], "setting": r["setting"], "layer": layer,
             "seed": r["seed"], "output": values.get("output", layer == "logit"),
             **{key: values[key] for key in SUMMARY_LAYERS}, **_probe_numbers(values["probes"])}
            for r in records for layer, values in r["layers"].items()]
    frame = pd.DataFrame(rows)
    frame["mmd_p_value_median"] = frame["mmd_p_value"]
    table = over_seeds(frame, ("setting_index", "method", "setting", "layer", "output"), SUMMARY_LAYERS,
                       medians=("mmd_p_value_median",))
    return table.reset_index()


def _probe_numbers(probes: dict[str, dict[str, float]]) -> dict[str, float]:
    name, auc = strongest_probe(probes)
    return {"probe_auc": auc, "probe_balanced_accuracy": probes[name]["balanced_accuracy"]}


def write_invariance_report(records: list[dict[str, Any]], path: Path, command: str,
                            bench: InvarianceBench = BENCHES["adult-invariance"]) -> Path:
    """``<bench>.md``: per method and layer, how well probes recover the attribute, and MMD; plain verdicts."""
    from groupmixnorm.experiments.report import markdown_table, plus_minus

    table = invariance_table(records)
    shown = pd.DataFrame({
        "method": table["method"], "setting": [f"`{s}`" for s in table["setting"]], "layer": table["layer"],
        "seeds": table["seeds"],
        "probe AUC either way": plus_minus(table["probe_auc_mean"], table["probe_auc_std"]),
        "probe balanced accuracy": plus_minus(table["probe_balanced_accuracy_mean"], table["probe_balanced_accuracy_std"]),
        "MMD^2": plus_minus(table["mmd_mean"], table["mmd_std"]),
        "MMD p (median)": table["mmd_p_value_median"].map("{:.3f}".format),
    })
    outcomes = pd.DataFrame([{"setting_index": r["setting_index"], "ap": r["ap"], "dp_gap": r["dp_gap"]} for r in records])
    outcomes = outcomes.groupby("setting_index").mean()
    chance = records[0]["chance_balanced_accuracy"]
    lines = [
        f"# Does the representation forget the protected attribute? ({bench.title})", "",
        f"Generated by `{command}`. The models are the grid bench's settings named below, trained with the same "
        f"specs ({bench.training}) and saved; `groupmixnorm analyze` then measures every layer on the test split "
        "(a stratified subsample): AUC, taken either way round (max(AUC, 1 - AUC)), and balanced accuracy of the "
        "stronger of two probes by that AUC (logistic regression, MLP with 64 hidden units) trained on half the "
        f"rows to predict {bench.attribute} and scored on the other half; the unbiased MMD^2 between the groups "
        "(RBF kernel, median heuristic) with its permutation p-value. Image features are averaged over their "
        "spatial positions first. "
        f"Invariance means a probe at chance: AUC 0.50, balanced accuracy {chance:.2f}. Layers: `hidden_k` is the "
        "k-th hidden block's output (after its ReLU), `groupmixnorm_k` the k-th GroupMixNorm layer's output, "
        "`logit` the model's output (a GroupMixNorm layer on the logit computes the output: that layer's row "
        "is the output's).", "",
        "## Where each method stands", "",
        *_verdicts(table, outcomes, records, chance, bench.attribute), "",
        "## Every layer (mean ± std over seeds)", "",
        markdown_table(shown), "",
        f"Embeddings (PCA of each layer, seed 0, colored by {bench.attribute} and by label) are in "
        f"`{bench.name}/<method>-<n>/`.",
        "", f"Reproduce one model: `{records[0]['train_command']}`, then `groupmixnorm analyze --checkpoint FILE --out DIR`.",
        "",
    ]
    return write_text_atomic(path, "\n".join(lines))


def _verdicts(table: pd.DataFrame, outcomes: pd.DataFrame, records: list[dict[str, Any]], chance: float,
              attribute: str) -> list[str]:
    """One plain sentence per setting: its most revealing hidden layer and its output, against chance, by
    the probes' AUC either way round."""
    lines = []
    whys = {r["setting_index"]: r["why"] for r in records}
    for index, rows in table.groupby("setting_index", sort=True):
        first = rows.iloc[0]
        output = rows[rows["output"]].iloc[0]
        hidden = rows[~rows["output"]]
        worst = hidden.loc[hidden["probe_auc_mean"].idxmax()] if len(hidden) else output
        lines.append(
            f"- **{first['method']}** (`{first['setting']}`; {whys[index]}; AP {outcomes.loc[index, 'ap']:.3f}, "
            f"dp_gap {outcomes.loc[index, 'dp_gap']:.3f}): a probe recovers {attribute} from `{worst['layer']}` "
            "with AUC "
            f"{worst['probe_auc_mean']:.3f} and balanced accuracy {worst['probe_balanced_accuracy_mean']:.3f} (chance: "
            f"0.50 and {chance:.2f}); from the output (`{output['layer']}`) with AUC {output['probe_auc_mean']:.3f} and "
            f"balanced accuracy {output['probe_balanced_accuracy_mean']:.3f}. "
            f"{_plainly(worst['probe_auc_mean'], attribute)}"
        )
    return lines


def _plainly(auc: float, attribute: str) -> str:
    """A verdict on the AUC either way round of the most revealing hidden layer (chance 0.5)."""
    if auc < 0.53:
        return f"Its hidden features are invariant to {attribute} by this measure."
    if auc < 0.60:
        return f"Its hidden features keep a weak trace of {attribute}."
    return f"Its hidden features are not invariant: {attribute} is readily recovered."

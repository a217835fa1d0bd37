"""The paper's claim in one table: GroupMixNorm without any penalty against ERM, paired over seeds.

For every setting of the layer alone (``align=0``) a grid bench ran, and each ERM reference trained under the
same protocol quirks (plain, and with batch normalization where the bench has it), the report gives the
test ``dp_gap_hard`` and AP of both, their mean paired differences with 95 % t intervals, and a verdict:
*fairer* or *less fair* only when the interval of the difference excludes zero, else a tie. The bar the
layer is held to: a gap significantly smaller than ERM's, smaller by at least 30 % on the means, at a mean
AP of at least 0.97 times ERM's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from groupmixnorm.experiments.report import markdown_table
from groupmixnorm.metrics.uncertainty import paired_comparison

#: ERM references by their options: the plain model and the same model with batch normalization.
REFERENCES = {"erm": {}, "erm with batch norm": {"norm": "batchnorm"}}
#: The bar of the layer-alone claim: the share of ERM's gap cut, at this share of ERM's AP or more.
GAP_CUT, AP_SHARE = 0.30, 0.97


def layer_alone_section(records: Sequence[dict[str, Any]], family: Any) -> list[str]:
    """The report's section on the layer alone; ``family(record)`` names a record's row of the validated
    tables, whose bracketed suffix (its protocol quirks) pairs a setting with the ERM run of the same quirks.
    Empty when the bench has no layer-alone setting or no ERM reference."""
    rows = []
    for setting, runs in _by_setting(records, lambda r: r["method"] == "gmn" and r["options"].get("align", 0.0) == 0):
        for name, options in REFERENCES.items():
            reference = _reference_runs(records, options, _quirks(family(runs[0])), family)
            if reference:
                rows.append(_row(setting, runs, name, reference))
    if not rows:
        return []
    return [
        "## The layer alone against ERM (paired over seeds)", "",
        "Every GroupMixNorm setting without a penalty against ERM trained under the same protocol, on the same "
        "seeds: test means, and the mean paired difference (layer minus ERM) with its 95 % t interval. "
        "A verdict other than a tie needs an interval that excludes zero. `gap cut` is 1 - the layer's mean "
        "dp_gap_hard / ERM's (negative: the layer's gap is larger). `bar met` asks for a fairer verdict, a cut "
        f"of at least {GAP_CUT:.0%} and a mean AP of at least {AP_SHARE:g} times ERM's. "
        "† marks settings that read the attribute at prediction.", "",
        markdown_table(pd.DataFrame(rows)), "",
    ]


def _by_setting(records: Sequence[dict[str, Any]], keep: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if keep(record):
            grouped.setdefault(record["setting"], []).append(record)
    return list(grouped.items())


def _quirks(family_name: str) -> str:
    """The bracketed protocol quirks of a family name (``""`` for none)."""
    return family_name[family_name.index(" ["):] if " [" in family_name else ""


def _reference_runs(records: Sequence[dict[str, Any]], options: dict[str, Any], quirks: str,
                    family: Any) -> list[dict[str, Any]]:
    """The ERM runs given exactly ``options`` and the same quirks, on the bench's own batches (no other
    sampling)."""
    return [r for r in records if r["method"] == "erm" and r["spec"]["method_options"] == options
            and "sampling=" not in r["setting"] and _quirks(family(r)) == quirks]


def _row(setting: str, runs: list[dict[str, Any]], name: str, reference: list[dict[str, Any]]) -> dict[str, Any]:
    ours = {r["seed"]: r for r in runs}
    theirs = {r["seed"]: r for r in reference}
    seeds = sorted(set(ours) & set(theirs))
    row: dict[str, Any] = {"setting": f"`{setting}`" + (" †" if runs[0].get("uses_sensitive_at_prediction") else ""),
                           "against": name, "seeds": len(seeds)}
    means = {}
    for metric, better in (("dp_gap_hard", "fairer"), ("ap", "higher AP")):
        a = [ours[s][metric] for s in seeds]
        b = [theirs[s][metric] for s in seeds]
        means[metric] = (sum(a) / len(a), sum(b) / len(b))
        row[f"{metric} (layer, ERM)"] = f"{means[metric][0]:.3f}, {means[metric][1]:.3f}"
        if len(seeds) < 2:
            row[f"Δ {metric}"], row[f"{metric} verdict"] = "—", "—"
            continue
        difference = paired_comparison(a, b).difference
        row[f"Δ {metric}"] = f"{difference.estimate:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}]"
        row[f"{metric} verdict"] = "tie" if 0.0 in difference else (
            better if (difference.estimate < 0) == (metric == "dp_gap_hard") else _opposite(better))
    gap, ap = means["dp_gap_hard"], means["ap"]
    met = (row["dp_gap_hard verdict"] == "fairer" and gap[0] <= (1 - GAP_CUT) * gap[1]
           and ap[0] >= AP_SHARE * ap[1])
    row["gap cut"] = f"{1 - gap[0] / gap[1]:+.0%}" if gap[1] > 0 else "—"
    row["bar met"] = "yes" if met else "no"
    return row


def _opposite(verdict: str) -> str:
    return {"fairer": "less fair", "higher AP": "lower AP"}[verdict]

"""The bench reports' section on the layer alone against ERM."""

from __future__ import annotations

from groupmixnorm.experiments.bench import setting_family
from groupmixnorm.experiments.layer_alone import layer_alone_section


def _run(method: str, options: dict, seed: int, gap: float, ap: float, *, select: str = "last") -> dict:
    setting = ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
    if select != "last":
        setting += f",select={select}"
    full = {"align": 1.0, **options} if method == "gmn" else {"norm": "none", **options}
    return {"method": method, "setting": setting, "seed": seed, "dp_gap_hard": gap, "ap": ap, "options": full,
            "spec": {"method_options": options, "quantize": False, "config": {"select": select}}}


def _rows(records: list[dict]) -> list[list[str]]:
    lines = layer_alone_section(records, setting_family)
    table = lines[4].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table]


def test_a_layer_that_halves_the_gap_on_every_seed_meets_the_bar_and_a_noisy_one_ties() -> None:
    layer = {"placement": "all", "align": 0.0}
    noisy = {"placement": "first", "align": 0.0}
    records = []
    for seed, wobble in enumerate((0.1, -0.1, 0.12, -0.12)):
        records += [_run("erm", {}, seed, 0.30, 0.90), _run("erm", {"norm": "batchnorm"}, seed, 0.20, 0.92),
                    _run("gmn", layer, seed, 0.10 + 0.001 * seed, 0.91), _run("gmn", noisy, seed, 0.25 + wobble, 0.90),
                    _run("gmn", {"placement": "logit", "align": 1.0}, seed, 0.01, 0.70)]  # a penalty: not shown
    rows = {(row[0], row[1]): row for row in _rows(records)}
    assert len(rows) == 4  # two layer-alone settings against two references
    halved = rows[("`align=0.0,placement=all`", "erm")]
    assert halved[2] == "4" and halved[3] == "0.102, 0.300" and halved[5] == "fairer"
    assert halved[-2] == "+66%" and halved[-1] == "yes"
    tie = rows[("`align=0.0,placement=first`", "erm")]
    assert tie[5] == "tie" and tie[-1] == "no"  # a 15 % cut on the means, inside the noise
    against_norm = rows[("`align=0.0,placement=all`", "erm with batch norm")]
    # A lower AP, yet at least 0.97 times ERM's (0.91 >= 0.97 * 0.92): the bar is met.
    assert against_norm[5] == "fairer" and against_norm[8] == "lower AP" and against_norm[-1] == "yes"


def test_a_setting_with_its_own_epoch_rule_is_paired_with_erm_under_the_same_rule() -> None:
    records = []
    for seed in range(3):
        records += [_run("erm", {}, seed, 0.30, 0.90), _run("erm", {}, seed, 0.10, 0.80, select="dp_gap"),
                    _run("gmn", {"align": 0.0}, seed, 0.20 + 0.01 * seed, 0.85, select="dp_gap")]
    (row,) = _rows(records)
    assert row[1] == "erm" and row[3] == "0.210, 0.100" and row[5] == "less fair" and row[-2] == "-110%"


def test_no_section_without_a_layer_alone_setting_or_an_erm_reference() -> None:
    assert layer_alone_section([_run("erm", {}, 0, 0.3, 0.9)], setting_family) == []
    assert layer_alone_section([_run("gmn", {"align": 0.0}, 0, 0.3, 0.9)], setting_family) == []

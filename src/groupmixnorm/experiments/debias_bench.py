"""The debiasing benchmark: fine-tune pre-trained ERM models on small fractions of the data.

For every seed an ERM model is trained and saved (official split, ``groupmixnorm train`` defaults); it is
then fine-tuned by ``groupmixnorm debias`` with GroupMixNorm and with GapReg on each fraction of the
training rows. GroupMixNorm trained from scratch on all rows is the reference a user would otherwise pick.
Records are JSON files written atomically; a finished one is never recomputed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from groupmixnorm.experiments.bench import RecordStore
from groupmixnorm.experiments.spec import RunSpec, execute
from groupmixnorm.training import TrainConfig, write_json_atomic, write_text_atomic

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
FINE_TUNERS = ("gmn", "gapreg")
FINE_TUNE_EPOCHS = 5
COLUMNS = ("accuracy", "ap", "dp_gap", "eodds_gap")


def run_debias_bench(
    root: Path, *, seeds: int = 5, fractions: tuple[float, ...] = FRACTIONS, epochs: int = 10,
    on_run: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) everything the debiasing table needs under ``root``; return the records."""
    from groupmixnorm.training.checkpoint import load_checkpoint

    store = RecordStore(root)
    records = []
    for seed in range(seeds):
        config = TrainConfig(epochs=epochs, seed=seed)
        erm, pretrained = _train_once(store, RunSpec(method="erm", config=config), save=True)
        scratch, _ = _train_once(store, RunSpec(method="gmn", config=config), save=False)
        records += [{**erm, "role": "pre-trained ERM"}, {**scratch, "role": "gmn from scratch"}]
        if on_run:
            on_run(f"erm and gmn seed {seed}")
        checkpoint = load_checkpoint(pretrained)
        for fraction in fractions:
            for method in FINE_TUNERS:
                record = _debias_once(root, checkpoint, pretrained, method, fraction, seed)
                records.append({**record, "role": f"debias {method}", "fraction": fraction})
                if on_run:
                    on_run(f"debias {method} {fraction:g} seed {seed}")
    return records


def _train_once(store: RecordStore, spec: RunSpec, *, save: bool) -> tuple[dict[str, Any], Path]:
    """The record of ``spec`` (trained now unless stored), and where its checkpoint is when ``save``."""
    checkpoint = store.root / f"{spec.key()}.pt"
    record = store.load(spec)
    if record is None or (save and not checkpoint.exists()):  # checkpoints are not committed: retrain
        record = execute(spec, save_to=checkpoint if save else None)
        record["command"] = spec.command(out="OUT") + (f" --save {shlex.quote(str(checkpoint))}" if save else "")
        store.save(spec, record)
    return record, checkpoint


def _debias_once(
    root: Path, checkpoint: Any, checkpoint_path: Path, method: str, fraction: float, seed: int
) -> dict[str, Any]:
    from groupmixnorm.experiments.debias import debias

    path = Path(root) / f"debias-{method}-f{fraction:g}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    command = shlex.join(["groupmixnorm", "debias", "--checkpoint", str(checkpoint_path), "--method", method,
                          "--fraction", f"{fraction:g}", "--epochs", str(FINE_TUNE_EPOCHS), "--seed", str(seed),
                          "--out", "OUT"])
    record = debias(checkpoint, method=method, fraction=fraction, command=command,
                    config=TrainConfig(epochs=FINE_TUNE_EPOCHS, seed=seed, select="last"))
    write_json_atomic(path, record)
    return record


def debias_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean and std over seeds per role and fraction, with the median fine-tuning (or training) time."""
    rows = [{"role": r["role"], "fraction": r.get("fraction", 1.0 if r["role"] != "pre-trained ERM" else None),
             "seed": r["seed"], **{k: r[k] for k in COLUMNS}, "seconds": r["timings"]["total_seconds"]}
            for r in records]
    frame = pd.DataFrame(rows)
    frame["fraction"] = frame["fraction"].fillna(-1)
    grouped = frame.groupby(["role", "fraction"], sort=False)
    table = grouped[list(COLUMNS)].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    table["seconds"] = grouped["seconds"].median()
    return table.reset_index()


def write_debias_report(records: list[dict[str, Any]], path: Path, command: str) -> Path:
    """``adult-debias.md``: the table, how it was made, and how to reproduce one row."""
    from groupmixnorm.experiments.report import markdown_table, plus_minus

    table = debias_table(records)
    shown = pd.DataFrame({
        "model": table["role"],
        "training rows": [("all" if f in (-1, 1.0) else f"{f:.0%}") for f in table["fraction"]],
        "seeds": table["seeds"],
        **{metric: plus_minus(table[f"{metric}_mean"], table[f"{metric}_std"]) for metric in COLUMNS},
        "seconds (median)": table["seconds"].map("{:.1f}".format),
    })
    example = next(r["command"] for r in records if r["role"].startswith("debias"))
    text = "\n".join([
        "# Debiasing a pre-trained model on Adult",
        "",
        f"Generated by `{command}`. Official split; for each seed an ERM model is trained with "
        "`groupmixnorm train` defaults and saved, then fine-tuned for "
        f"{FINE_TUNE_EPOCHS} epochs by `groupmixnorm debias` with GroupMixNorm on the logit (alignment weight 1, "
        "16 quantiles) or with GapReg (lam 0.5) on a share of the training rows stratified by group and label. "
        "Seconds are the whole fine-tuning (or training) run, evaluation included.",
        "",
        markdown_table(shown),
        "",
        f"Reproduce one row: train the seed's ERM model with the command in its record, then e.g. `{example}`.",
        "",
    ])
    return write_text_atomic(path, text)

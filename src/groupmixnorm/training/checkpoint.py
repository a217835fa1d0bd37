"""Checkpoints: a trained model with everything needed to score raw rows again.

A checkpoint holds the run's spec, the method and its options, the model's weights, the fitted
preprocessing of the raw columns, and the sha256 of the data the run trained on (checked whenever the
data are loaded again: ``report``, ``analyze``, ``debias``). It is written atomically with
``torch.save``. It contains a pickled scikit-learn transformer, so load only checkpoints you trust, as
with any pickle.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

FORMAT = "groupmixnorm-checkpoint"
#: 2: the training data's fingerprint (``data_source``); Linear layers just before a normalization layer
#: have no bias, so the weights of format 1 do not load into today's models anyway.
FORMAT_VERSION = 2
#: Rows named in the error about rows that cannot be scored (the count covers them all).
SHOWN_ROWS = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, of another format version, or not ours."""


class FilledCategoriesWarning(UserWarning):
    """Rows were scored with missing categories filled in, as the run's training filled them in."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``predict_proba(frame)`` scores raw rows (columns named as in training)."""

    spec: dict[str, Any]
    method: Any
    model: nn.Module
    preprocessor: Any
    input_columns: list[str]
    sensitive: str
    group_names: list[str]
    versions: dict[str, str]
    data_source: dict[str, Any] | None = None
    fills_missing_categories: bool = False
    #: The decision threshold ``predict`` applies by default (chosen on validation by ``train --max-gap``).
    threshold: float = 0.5

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive label for each row of ``frame`` (extra columns are ignored).

        The protected attribute is needed only by a model trained with ``eval_mode="group"``. Rows the
        model cannot score are refused (see :meth:`model_inputs`), never given a blank or default score;
        missing categories filled in as in training are announced with a :class:`FilledCategoriesWarning`.
        """
        inputs, note = self.model_inputs(frame)
        if note is not None:
            warnings.warn(note, FilledCategoriesWarning, stacklevel=2)
        features = torch.as_tensor(np.asarray(self.preprocessor.transform(inputs), dtype=np.float32))
        groups = self._groups(frame) if self.method.uses_sensitive_at_prediction() else None
        self.model.eval()
        with torch.no_grad():
            logits = self.method.predict_logits(self.model, features, groups)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def model_inputs(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
        """The input columns of ``frame`` as the preprocessing expects them (numeric columns as floats),
        and a note on the rows whose missing categories are filled in (``None`` when there are none).

        A missing category is filled in only where the run's training filled them in too (Adult's
        official protocol, with the most frequent training value); a CSV run dropped its rows with missing
        values, so there is nothing of training's to repeat. Other faults are refused with a one-line
        ``ValueError`` that counts the rows and names the first ones, with column and value (rows counted
        from 1 in the order of ``frame``: for a CSV, data rows after the header): a missing value, text in a
        numeric column, an infinite number.
        """
        absent = [column for column in self.input_columns if column not in frame.columns]
        if absent:
            raise ValueError(f"the rows lack column(s) the model was trained on: {', '.join(absent)}")
        inputs = frame[self.input_columns].reset_index(drop=True)
        numeric = set(_numeric_columns(self.preprocessor))
        faults: list[tuple[str, np.ndarray, Callable[[int], str]]] = []  # column, rows at fault, what is wrong
        filled: dict[str, np.ndarray] = {}  # categorical column -> rows filled in
        for column in self.input_columns:
            missing = inputs[column].isna().to_numpy()
            if column in numeric:
                inputs[column], column_faults = _as_numbers(column, inputs[column], missing)
                faults += column_faults
            elif self.fills_missing_categories:
                filled[column] = missing
                continue
            faults.append((column, missing, lambda row: "is missing"))
        unusable = np.flatnonzero(np.logical_or.reduce([rows for _, rows, _ in faults]))
        if len(unusable):
            shown = [f"row {row + 1}: " + ", ".join(f"{column!r} {describe(row)}"
                                                    for column, rows, describe in faults if rows[row])
                     for row in unusable[:SHOWN_ROWS]]
            raise ValueError(_unusable_rows_message(shown, len(unusable), len(inputs)))
        return _as_trained_categories(inputs, self.preprocessor), _filled_note(filled, len(inputs))

    def run_data(self, data_file: str | os.PathLike | None = None) -> Any:
        """The dataset of the run that trained this model (same rows, split and preprocessing), after
        checking that its file is the one trained on (:class:`~groupmixnorm.experiments.spec.DataChangedError`
        if not); ``data_file`` is a copy of a CSV run's training file at another path, checked the same way."""
        from groupmixnorm.experiments.spec import load_run_data

        return load_run_data(self.spec, source=self.data_source, data_file=data_file)

    def _groups(self, frame: pd.DataFrame) -> torch.Tensor:
        from groupmixnorm.data.csv import row_groups, sensitive_columns
        from groupmixnorm.data.tabular import encode_groups

        on_csv = self.spec.get("dataset") == "csv"  # a CSV run may name several columns (intersectional groups)
        columns = sensitive_columns(self.sensitive) if on_csv else [self.sensitive]
        absent = [column for column in columns if column not in frame.columns]
        if absent:
            raise ValueError(f"this model was trained with eval_mode='group' and needs the column(s) "
                             f"{', '.join(map(repr, absent))} to predict")
        # A CSV run's groups are its values as text, so that a numeric column read again matches them.
        values = row_groups(frame, self.sensitive).where(frame[columns].notna().all(axis=1)) if on_csv \
            else frame[self.sensitive]
        return torch.tensor(encode_groups(values, self.group_names))  # a copy: pandas' arrays are read-only


def _as_numbers(
    column: str, values: pd.Series, missing: np.ndarray
) -> tuple[pd.Series, list[tuple[str, np.ndarray, Callable[[int], str]]]]:
    """A numeric column as floats, and its faults: text that is not a number, infinite numbers."""
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
    text = numbers.isna().to_numpy() & ~missing
    return numbers, [(column, text, lambda row: f"is {values.iloc[row]!r}, not a number"),
                     (column, np.isinf(numbers.to_numpy()), lambda row: f"is {numbers.iloc[row]:g}, not finite")]


def _filled_note(filled: dict[str, np.ndarray], total: int) -> str | None:
    """The note on rows with missing categories filled in as training did, or ``None`` if there are none."""
    columns = [column for column, rows in filled.items() if rows.any()]
    if not columns:
        return None
    count = int(np.logical_or.reduce([filled[column] for column in columns]).sum())
    return (f"{count} of {total} rows have a missing category ({', '.join(columns)}), filled in with the most "
            "frequent training value as in training")


def _numeric_columns(preprocessor: Any) -> list[str]:
    """The raw columns the preprocessing standardizes (the rest are one-hot encoded)."""
    return [str(c) for name, _, columns in preprocessor.transformers_ if name == "numeric" for c in columns]


def _as_trained_categories(inputs: pd.DataFrame, preprocessor: Any) -> pd.DataFrame:
    """``inputs`` with the values of text categories as text: a column of digits that training read as
    text ('1', '2', 'x') and that is read as numbers now would otherwise match no category at all."""
    for name, fitted, columns in preprocessor.transformers_:
        if name != "categorical" or not len(columns):
            continue
        for column, categories in zip(columns, fitted[-1].categories_):
            if all(isinstance(c, str) for c in categories) and not pd.api.types.is_object_dtype(inputs[column]):
                inputs[column] = inputs[column].map(_category_text).astype(object)
    return inputs


def _category_text(value: Any) -> Any:
    """A category read as a number, as text (``2.0`` as ``'2'``); a missing value stays missing."""
    if pd.isna(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _unusable_rows_message(shown: list[str], count: int, total: int) -> str:
    """One line: how many rows cannot be scored, and what is wrong with those in ``shown``."""
    more = f"; and {count - len(shown)} more row(s)" if count > len(shown) else ""
    return (f"{count} of {total} rows cannot be scored (rows counted from 1, header not counted): "
            f"{'; '.join(shown)}{more}; complete, fix or remove them (prediction fills in no value that "
            "training did not fill in: a CSV run dropped its rows with missing values)")


def save_checkpoint(
    path: str | os.PathLike, *, model: nn.Module, method: Any, spec: Any, data: Any,
    source: dict[str, Any] | None = None, threshold: float = 0.5,
) -> Path:
    """Write ``model`` (trained by ``method`` on ``data`` as ``spec`` says) to ``path`` atomically.

    ``source`` is the fingerprint of the training data
    (:func:`~groupmixnorm.experiments.spec.data_fingerprint`, taken before the data were loaded); without
    it the data are fingerprinted now. ``threshold`` is the decision threshold ``predict`` and the ONNX
    sidecar use unless told otherwise.
    """
    from groupmixnorm.experiments.spec import data_fingerprint, fills_missing_categories
    from groupmixnorm.training.environment import environment_versions
    from groupmixnorm.files import atomic_output

    if len(data.input_shape) > 1:
        raise ValueError(f"cannot save {path}: checkpoints hold models that score table rows; image models are "
                         "not saved yet")
    if data.preprocessor is None or getattr(spec, "quantize", False):
        raise ValueError(f"cannot save {path}: the run's preprocessing is not a fitted transformer (the spec's "
                         "quantize quirk is not supported)")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "method": method.name,
        "method_options": method.options(),
        "model_spec": {"in_features": data.num_features, "num_groups": data.num_groups,
                       "hidden": list(spec.config.hidden)},
        "state_dict": model.state_dict(),
        "preprocessor": data.preprocessor,
        "input_columns": [str(c) for c in data.preprocessor.feature_names_in_],
        "sensitive": data.sensitive,
        "group_names": list(data.group_names),
        "versions": environment_versions(),
        "data_source": source if source is not None else data_fingerprint(spec.to_dict()),
        "fills_missing_categories": fills_missing_categories(spec.to_dict()),
        "threshold": float(threshold),
    }
    with atomic_output(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` names what is wrong."""
    from groupmixnorm.methods import make_method
    from groupmixnorm.methods.base import ModelSpec

    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {source}")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, AttributeError, ModuleNotFoundError) as error:
        raise CheckpointError(f"{source} is not a readable groupmixnorm checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a groupmixnorm checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format {payload.get('format_version')}, this version of groupmixnorm reads "
            f"format {FORMAT_VERSION} (written by groupmixnorm {payload.get('versions', {}).get('groupmixnorm', '?')})"
        )
    method = make_method(payload["method"], **payload["method_options"])
    shape = payload["model_spec"]
    model = method.build_model(ModelSpec(shape["in_features"], shape["num_groups"], tuple(shape["hidden"])))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        spec=payload["spec"], method=method, model=model, preprocessor=payload["preprocessor"],
        input_columns=payload["input_columns"], sensitive=payload["sensitive"],
        group_names=payload["group_names"], versions=payload["versions"], data_source=payload["data_source"],
        fills_missing_categories=payload["fills_missing_categories"],
        threshold=float(payload.get("threshold", 0.5)),  # checkpoints written before thresholds were stored
    )

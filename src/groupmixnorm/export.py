"""ONNX export of a checkpoint's network, with its preprocessing written out for the deployment side.

The ONNX graph maps preprocessed feature rows to the logit and the probability of the positive label. It
has no protected-attribute input. The raw columns become feature rows through the checkpoint's fitted
``ColumnTransformer``; :func:`preprocessing_spec` writes that transformer out as plain numbers (means,
scales, categories, fill values) so that a runtime without scikit-learn can reproduce it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Names of the ONNX graph's input and outputs.
INPUT_NAME = "features"
OUTPUT_NAMES = ("logit", "probability")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went, and how far onnxruntime's outputs were from PyTorch's on a check batch."""

    onnx_path: Path
    preprocessing_path: Path
    max_abs_difference: float | None


class ScoringNetwork(nn.Module):
    """A trained network as deployed: feature rows ``(N, d)`` to the logit ``(N,)`` and ``sigmoid(logit)``."""

    def __init__(self, model: nn.Module, method: Any) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.method.predict_logits(self.model, features)
        return logit, torch.sigmoid(logit)


def export_onnx(checkpoint: Any, path: str | os.PathLike, *, check_rows: int = 64) -> ExportResult:
    """Write the checkpoint's network as ONNX to ``path`` and its preprocessing to ``<path>.json``.

    Parameters
    ----------
    checkpoint : groupmixnorm.training.checkpoint.Checkpoint
        A loaded checkpoint (:func:`~groupmixnorm.training.checkpoint.load_checkpoint`).
    path : path-like
        The ONNX file to write (atomically).
    check_rows : int
        Rows of random features on which onnxruntime's outputs are compared with PyTorch's, when
        onnxruntime is installed.

    Returns
    -------
    ExportResult
        The files written and the largest absolute difference found (``None`` without onnxruntime).

    Raises
    ------
    ValueError
        For a model that needs the protected attribute at prediction (``eval_mode="group"``), or when the
        ONNX exporter (the ``export`` extra) is missing.
    """
    from groupmixnorm.files import atomic_output, write_json_atomic

    if checkpoint.method.uses_sensitive_at_prediction():
        raise ValueError("this model needs the protected attribute at prediction (eval_mode='group'); only "
                         "attribute-free models are exported")
    _require("onnx", "onnxscript")
    network = ScoringNetwork(checkpoint.model.eval(), checkpoint.method).eval()
    width = len(checkpoint.preprocessor.get_feature_names_out())
    example = torch.zeros(2, width)
    target = Path(path)
    with atomic_output(target) as temporary, _quiet_exporter():
        torch.onnx.export(
            network, (example,), str(temporary), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    sidecar = write_json_atomic(target.with_name(target.name + ".json"), preprocessing_spec(checkpoint))
    return ExportResult(target, sidecar, _check_with_onnxruntime(network, target, width, check_rows))


def preprocessing_spec(checkpoint: Any) -> dict[str, Any]:
    """How raw rows become the ONNX input, as plain JSON-ready data.

    Returns
    -------
    dict
        ``input``/``outputs`` (names and meaning), ``raw_columns`` (what to read), ``steps`` (one per
        column group, in the order their outputs are concatenated), ``feature_names`` (the input's columns),
        the ``threshold`` of ``predict``, and the protected attribute and groups the model was trained for
        (never an input).
    """
    transformer = checkpoint.preprocessor
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", len(transformer.get_feature_names_out())]},
        "outputs": {"logit": "log-odds of the positive label, shape (batch,)",
                    "probability": "sigmoid(logit), shape (batch,)"},
        "threshold": checkpoint.threshold,
        "raw_columns": list(checkpoint.input_columns),
        "missing_values": "numeric columns must be present; missing categories take the 'fill' value",
        "steps": [_step(name, fitted, columns) for name, fitted, columns in transformer.transformers_
                  if fitted != "drop" and len(columns)],
        "feature_names": [str(name) for name in transformer.get_feature_names_out()],
        "protected_attribute": {"name": checkpoint.sensitive, "groups": list(checkpoint.group_names),
                                "is_input": False},
        "method": checkpoint.method.name,
        "versions": checkpoint.versions,
    }


def _step(name: str, fitted: Any, columns: list[str]) -> dict[str, Any]:
    """One column group of the ColumnTransformer as numbers: standardization, or imputation + one-hot."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = list(fitted.named_steps.values()) if isinstance(fitted, Pipeline) else [fitted]
    step: dict[str, Any] = {"name": name, "columns": [str(c) for c in columns]}
    for part in parts:
        if isinstance(part, StandardScaler):
            step["standardize"] = {"mean": _floats(part.mean_), "scale": _floats(part.scale_),
                                   "formula": "(value - mean) / scale"}
        elif isinstance(part, OneHotEncoder):
            step["one_hot"] = {"categories": [[_plain(v) for v in values] for values in part.categories_],
                               "unknown": "all zeros"}
        elif hasattr(part, "statistics_"):  # SimpleImputer
            step["impute_missing"] = {"strategy": part.strategy, "fill": [_plain(v) for v in part.statistics_]}
        else:
            raise ValueError(f"cannot describe the preprocessing step {type(part).__name__} for export")
    return step


def _check_with_onnxruntime(network: nn.Module, path: Path, width: int, rows: int) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    features = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [output.numpy() for output in network(features)]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(list(OUTPUT_NAMES), {INPUT_NAME: features.numpy()})
    return float(max(np.abs(a - e).max() for a, e in zip(actual, expected)))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about optional packages (torchvision) and its deprecation warnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install 'groupmixnorm[export]'")


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def _plain(value: Any) -> Any:
    """A category or fill value as JSON: numbers stay numbers, everything else becomes text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)

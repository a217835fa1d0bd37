"""Checkpoints: a trained model with everything needed to score raw rows again.

A checkpoint holds the run's spec, the method and its options, the model's weights, and the fitted
preprocessing of the raw columns. It is written atomically with ``torch.save``. It contains a pickled
scikit-learn transformer, so load only checkpoints you trust, as with any pickle.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

FORMAT = "groupmixnorm-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, of another format version, or not ours."""


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

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive label for each row of ``frame`` (extra columns are ignored).

        The protected attribute is needed only by a model trained with ``eval_mode="group"``.
        """
        missing = [column for column in self.input_columns if column not in frame.columns]
        if missing:
            raise ValueError(f"the rows lack column(s) the model was trained on: {', '.join(missing)}")
        features = torch.as_tensor(
            np.asarray(self.preprocessor.transform(frame[self.input_columns]), dtype=np.float32)
        )
        groups = self._groups(frame) if self.method.uses_sensitive_at_prediction() else None
        self.model.eval()
        with torch.no_grad():
            logits = self.method.predict_logits(self.model, features, groups)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def _groups(self, frame: pd.DataFrame) -> torch.Tensor:
        from groupmixnorm.data.tabular import encode_groups

        if self.sensitive not in frame.columns:
            raise ValueError(
                f"this model was trained with eval_mode='group' and needs the column {self.sensitive!r} to predict"
            )
        return torch.as_tensor(encode_groups(frame[self.sensitive], self.group_names))


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, method: Any, spec: Any, data: Any) -> Path:
    """Write ``model`` (trained by ``method`` on ``data`` as ``spec`` says) to ``path`` atomically."""
    from groupmixnorm.training.records import atomic_output, environment_versions

    if len(data.input_shape) > 1:
        raise ValueError("--save writes models that score CSV rows (predict); image models are not saved yet")
    if data.preprocessor is None or getattr(spec, "quantize", False):
        raise ValueError("this run cannot be saved for prediction: its preprocessing is not a fitted transformer "
                         "(the --quantize quirk is not supported)")
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
        group_names=payload["group_names"], versions=payload["versions"],
    )

"""A run as data: what to train, on what, with which loop settings; and the record it produces."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from groupmixnorm.data import load_dataset
from groupmixnorm.methods import make_method
from groupmixnorm.training import TrainConfig, environment_versions, train
from groupmixnorm.training.resume import ResumePoint

METRIC_KEYS = ("accuracy", "ap", "dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard")


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one training run; equal specs give equal numbers on the CPU.

    ``dataset_options`` are further options of the dataset's loader, such as ``target``, ``data_dir`` and
    ``image_size`` for CelebA or ``bias`` for colored digits; each is also a ``train`` flag.
    """

    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "adult"
    sensitive: str = "sex"
    protocol: str = "official"
    quantize: bool = False
    config: TrainConfig = TrainConfig()
    dataset_options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """A short stable name for this spec, used as the record's file name."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return f"{self.method}-s{self.config.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict[str, Any]:
        spec = {
            "method": self.method, "method_options": dict(self.method_options), "dataset": self.dataset,
            "sensitive": self.sensitive, "protocol": self.protocol, "quantize": self.quantize,
            "config": dataclasses.asdict(self.config),
        }
        if self.dataset_options:  # only when set, so that the keys of earlier (Adult) records stay the same
            spec["dataset_options"] = dict(self.dataset_options)
        return spec

    def command(self, out: str = "OUT") -> str:
        """The ``groupmixnorm train`` command line that reproduces this run on its own."""
        words = ["groupmixnorm", "train", "--dataset", self.dataset, "--sensitive", self.sensitive,
                 "--protocol", self.protocol]
        if self.quantize:
            words.append("--quantize")
        for name, value in sorted(self.dataset_options.items()):
            words += [_flag(name), _word(value)]
        words += ["--method", self.method]
        for name, value in sorted(self.method_options.items()):
            words += [_flag(name), _word(value)]
        for item in dataclasses.fields(TrainConfig):
            value = getattr(self.config, item.name)
            if item.name == "device" or value is None:
                continue
            words += [_flag(item.name), _word(value)]
        words += ["--out", out]
        return shlex.join(words)


def execute(
    spec: RunSpec,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    save_to: str | Path | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the run described by ``spec`` and return its JSON-ready record.

    With ``save_to``, the selected model is also written there as a checkpoint
    (:func:`groupmixnorm.training.checkpoint.save_checkpoint`) that ``groupmixnorm predict`` can use.
    With ``state_path``, the loop's state is saved there after every epoch, and with ``resume`` a run
    continues from a state found there (see :func:`groupmixnorm.training.train`).
    """
    started = time.perf_counter()
    data = load_run_data(spec.to_dict())
    method = make_method(spec.method, **spec.method_options)
    if save_to is not None and method.name == "expgrad":
        raise ValueError("--save supports the torch-trained methods; expgrad models are not saved")
    point = None if state_path is None else ResumePoint(Path(state_path), spec.to_dict(), resume)
    result = train(method, data, spec.config, on_epoch=on_epoch, resume=point)
    if save_to is not None:
        from groupmixnorm.training.checkpoint import save_checkpoint

        save_checkpoint(save_to, model=result.model, method=method, spec=spec, data=data)
    return run_record(
        method, data, result, spec=spec.to_dict(), setting=setting_label(spec.method_options), seed=spec.config.seed,
        command=spec.command(), started=started,
    )


def run_record(
    method: Any, data: Any, result: Any, *, spec: dict[str, Any], setting: str, seed: int, command: str, started: float
) -> dict[str, Any]:
    """The JSON-ready record of a finished training: test metrics at the top level, then everything that
    explains them (spec, options, data, selection, validation metrics, rates, history, timings, versions)."""
    record: dict[str, Any] = {key: result.metrics[key] for key in METRIC_KEYS}
    record.update(
        method=method.name,
        setting=setting,
        seed=seed,
        spec=spec,
        options=method.options(),
        uses_sensitive_at_prediction=method.uses_sensitive_at_prediction(),
        dataset={"name": data.name, "sensitive": data.sensitive, "protocol": data.protocol,
                 "group_names": list(data.group_names), "features": data.num_features,
                 "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}},
        selected_epoch=result.selected_epoch,
        val={key: result.val_metrics[key] for key in METRIC_KEYS},
        group_rates=json.loads(result.group_rates.to_json(orient="index")),
        history=result.history,
        timings={"epoch_seconds": result.epoch_seconds, "median_epoch_seconds": result.median_epoch_seconds,
                 "total_seconds": time.perf_counter() - started},
        versions=environment_versions(),
        command=command,
    )
    return record


def setting_label(options: dict[str, Any]) -> str:
    """A compact, readable name for a method's options, e.g. ``mix=shared,alpha=1.0``; ``default`` if none."""
    return ",".join(f"{k}={_word(v)}" for k, v in sorted(options.items())) or "default"


def load_run_data(spec: dict[str, Any]) -> Any:
    """The dataset of a run, from its spec in dict form (:meth:`RunSpec.to_dict`, as records and checkpoints
    store it): the same rows, split and preprocessing the run trained on."""
    options: dict[str, Any] = {"sensitive": spec["sensitive"], "protocol": spec["protocol"],
                               **spec.get("dataset_options", {})}
    if spec.get("quantize"):
        options["quantize"] = True
    if spec["protocol"] == "fairmixup":
        options["seed"] = spec["config"]["seed"]  # the reference protocol re-draws the split with every seed
    return load_dataset(spec["dataset"], **options)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _word(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)

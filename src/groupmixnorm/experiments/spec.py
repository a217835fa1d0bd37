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
from groupmixnorm.data.csv import CSVError, read_table
from groupmixnorm.files import json_digest
from groupmixnorm.methods import make_method
from groupmixnorm.metrics import METRIC_NAMES, useless_model_warnings
from groupmixnorm.training import TrainConfig, train
from groupmixnorm.training.environment import environment_versions
from groupmixnorm.training.resume import ResumePoint


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
        return f"{self.method}-s{self.config.seed}-{json_digest(self.to_dict())}"

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
    inspect: Callable[[Any, Any, Any], None] | None = None,
) -> dict[str, Any]:
    """Train the run described by ``spec`` and return its JSON-ready record.

    ``inspect(model, method, data)``, if given, is called with the selected model after training (to
    analyze a model that is not saved, such as an image model).

    With ``save_to``, the selected model is also written there as a checkpoint
    (:func:`groupmixnorm.training.checkpoint.save_checkpoint`) that ``groupmixnorm predict`` can use.
    With ``state_path``, the loop's state is saved there after every epoch, and with ``resume`` a run
    continues from a state found there (see :func:`groupmixnorm.training.train`). The record's
    ``dataset.source`` (and the checkpoint's) is the :func:`data_fingerprint` of the data, taken before they
    are loaded.
    """
    started = time.perf_counter()
    source = data_fingerprint(spec.to_dict())  # before loading: a file changed meanwhile fails the later check
    data = load_run_data(spec.to_dict())
    method = make_method(spec.method, **spec.method_options)
    if save_to is not None and method.fitted_outside_loop:
        raise ValueError(f"save_to supports the torch-trained methods; {method.name} models are not saved")
    point = None if state_path is None else ResumePoint(Path(state_path), spec.to_dict(), resume)
    result = train(method, data, spec.config, on_epoch=on_epoch, resume=point)
    if save_to is not None:
        from groupmixnorm.training.checkpoint import save_checkpoint

        save_checkpoint(save_to, model=result.model, method=method, spec=spec, data=data, source=source)
    if inspect is not None:
        inspect(result.model, method, data)
    record = run_record(
        method, data, result, spec=spec.to_dict(), setting=setting_label(spec.method_options), seed=spec.config.seed,
        command=spec.command(), started=started,
    )
    if source is not None:
        record["dataset"]["source"] = source
    return record


def run_record(
    method: Any, data: Any, result: Any, *, spec: dict[str, Any], setting: str, seed: int, command: str, started: float
) -> dict[str, Any]:
    """The JSON-ready record of a finished training: test metrics at the top level, then everything that
    explains them (spec, options, data, selection, validation metrics, rates, history, timings, versions),
    and ``warnings``: the lines of :func:`~groupmixnorm.metrics.useless_model_warnings` on the test split
    (empty for a model of some use)."""
    record: dict[str, Any] = {key: result.metrics[key] for key in METRIC_NAMES}
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
        val={key: result.val_metrics[key] for key in METRIC_NAMES},
        group_rates=json.loads(result.group_rates.to_json(orient="index")),
        history=result.history,
        timings={"epoch_seconds": result.epoch_seconds, "median_epoch_seconds": result.median_epoch_seconds,
                 "total_seconds": time.perf_counter() - started},
        versions=environment_versions(),
        command=command,
        warnings=useless_model_warnings(data.test.y, result.test_scores),
    )
    return record


def setting_label(options: dict[str, Any]) -> str:
    """A compact, readable name for a method's options, e.g. ``mix=shared,alpha=1.0``; ``default`` if none."""
    return ",".join(f"{k}={_word(v)}" for k, v in sorted(options.items())) or "default"


def load_run_data(
    spec: dict[str, Any], *, source: dict[str, Any] | None = None, data_file: str | Path | None = None
) -> Any:
    """The dataset of a run, from its spec in dict form (:meth:`RunSpec.to_dict`, as records and checkpoints
    store it): the same rows, split and preprocessing the run trained on.

    Parameters
    ----------
    spec : dict
        The run's spec.
    source : dict, optional
        The run's :func:`data_fingerprint` (checkpoints and records store it): the file(s) found now must
        match it, or :class:`DataChangedError` is raised before anything is loaded.
    data_file : path, optional
        For a run trained on a CSV: a copy of the training file at another path, read instead of the
        spec's (checked against ``source`` like the original).
    """
    options: dict[str, Any] = {"sensitive": spec["sensitive"], "protocol": spec["protocol"],
                               **spec.get("dataset_options", {})}
    if data_file is not None:
        if spec["dataset"] != "csv":
            raise ValueError(f"--data applies to runs trained on a CSV (train --csv); this run trained on the "
                             f"{spec['dataset']} data set")
        if source is None:
            raise ValueError("a copy of the training file is checked against the sha256 stored at training, "
                             "and none was given (source=)")
        options["csv"] = str(data_file)
    if source is not None:
        check_data_source(source, spec, data_file)
    if spec.get("quantize"):
        options["quantize"] = True
    if spec["protocol"] == "fairmixup":
        options["seed"] = spec["config"]["seed"]  # the reference protocol re-draws the split with every seed
    return load_dataset(spec["dataset"], **options)


#: The bundled files an Adult run reads, whatever its protocol.
ADULT_FILES = ("adult.data.gz", "adult.test.gz")


class DataChangedError(ValueError):
    """The data file a run trained on differs from the one found now (edited, replaced, moved or deleted)."""


def data_fingerprint(spec: dict[str, Any]) -> dict[str, Any] | None:
    """What identifies the data of a run, to be checked when they are loaded again.

    For a CSV run: the file's absolute path, sha256 and number of data rows (as read, before rows with
    missing values are dropped). For Adult and the benchmark tables: the sha256 of each bundled file (they
    ship with the package, so a mismatch means another installed version; hashing them takes milliseconds).
    ``None`` for image data sets: hashing every image of a folder would cost more than the runs that read
    them, and image models are not saved as checkpoints.
    """
    if spec["dataset"] == "csv":
        path = spec.get("dataset_options", {}).get("csv")
        return None if path is None else {"kind": "csv", **_csv_fingerprint(Path(path))}  # None: the loader says why
    from groupmixnorm.data.benchmarks import BENCHMARKS

    if spec["dataset"] == "adult" or spec["dataset"] in BENCHMARKS:
        from groupmixnorm.data.adult import bundled_file

        names = ADULT_FILES if spec["dataset"] == "adult" else (BENCHMARKS[spec["dataset"]].file,)
        return {"kind": "bundled", "files": {name: _sha256(bundled_file(name).read_bytes()) for name in names}}
    return None


def fills_missing_categories(spec: dict[str, Any]) -> bool:
    """Whether the run's training filled in missing categories (with the most frequent training value), so
    that scoring new rows may do the same: Adult's official protocol keeps its rows with a missing
    category, while a CSV run and Adult's fairmixup protocol drop every row with a missing value."""
    return spec["dataset"] == "adult" and spec["protocol"] == "official"


def check_data_source(source: dict[str, Any], spec: dict[str, Any], data_file: str | Path | None = None) -> None:
    """Raise :class:`DataChangedError` unless the data a run would load now are those ``source`` describes
    (``data_file``: a copy of a CSV run's training file to check instead of the original)."""
    if source["kind"] == "bundled":
        _check_bundled(source["files"])
        return
    path = Path(data_file if data_file is not None else spec["dataset_options"]["csv"])  # the file to be read
    expected = f"sha256 {source['sha256'][:12]} with {source['rows']} rows"
    retry = "pass a copy of the training file with --data FILE (checked by the same hash)"
    if not path.is_file():
        if data_file is not None:
            raise DataChangedError(f"--data {path}: no such file")
        raise DataChangedError(f"no file at {path}: the training file was moved or deleted since training "
                               f"({expected}); {retry}")
    digest = _file_sha256(path)
    if digest == source["sha256"]:
        return
    try:
        found = f"found {digest[:12]} with {len(read_table(path))} rows"
    except CSVError:
        found = f"found {digest[:12]}, not a readable CSV"
    if data_file is not None:
        raise DataChangedError(f"--data {path} is not the file this model was trained on: expected {expected}, "
                               f"{found} (the training file was {source['path']})")
    raise DataChangedError(f"the training file {path} changed since training: expected {expected}, {found}; put "
                           f"the original back, or {retry}")


def _check_bundled(expected: dict[str, str]) -> None:
    from groupmixnorm.data.adult import bundled_file

    for name, digest in expected.items():
        found = _sha256(bundled_file(name).read_bytes())
        if found != digest:
            raise DataChangedError(
                f"the bundled data file {name} is not the one this run trained on (expected sha256 {digest[:12]}, "
                f"found {found[:12]}): the installed groupmixnorm ships other data; use the version that trained "
                "the model")


def _csv_fingerprint(path: Path) -> dict[str, Any]:
    """Absolute path, sha256 and data rows of a CSV (:func:`read_table`'s errors for a file it cannot read)."""
    rows = len(read_table(path))
    return {"path": str(path.resolve()), "sha256": _file_sha256(path), "rows": rows}


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _word(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)

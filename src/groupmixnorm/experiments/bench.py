"""Benchmarks: a grid of runs (methods x settings x seeds), a resumable record store, and the result files.

A bench is data first: every run writes one JSON record (atomically) named after its spec's key, and a
finished record is never recomputed. Tables and plots are derived from the records alone, so deleting
``runs.csv`` or the report and running the bench again rebuilds them without training anything.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupmixnorm.experiments.executors import Executor, ExecutorError, Sequential, stream_all
from groupmixnorm.experiments.spec import RunSpec, execute, setting_label
from groupmixnorm.metrics import METRIC_NAMES
from groupmixnorm.training import TrainConfig
from groupmixnorm.files import JsonStore, same_as_json

@dataclass(frozen=True)
class Setting:
    """One point of a method's sweep: its options, and the batch sampling the protocol gives it.

    ``quantize`` and ``select`` override the plan for this setting only: Fair Mixup's quantized Adult inputs,
    and the loop's epoch rule (e.g. ``"dp_gap"``, the epoch of the lowest validation gap)."""

    method: str
    options: dict[str, Any]
    sampling: str = "group"
    quantize: bool = False
    select: str | None = None


@dataclass(frozen=True)
class BenchPlan:
    """What a bench trains: its settings, seeds and loop configuration. ``name`` names the result files and
    is also the dataset unless ``dataset`` says otherwise."""

    name: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    config: TrainConfig
    protocol: str = "fairmixup"
    #: Settings timed side by side (ERM first) for the report's time-per-epoch table, and how many rounds.
    timed: tuple[Setting, ...] = ()
    timing_rounds: int = 7
    dataset: str = ""
    sensitive: str = "sex"
    #: Loader options of every run (``RunSpec.dataset_options``), e.g. CelebA's target and folder.
    dataset_options: dict[str, Any] = field(default_factory=dict)
    #: A paragraph for the report on what the data are (Markdown).
    notes: str = ""

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.name

    def specs(self) -> list[RunSpec]:
        """Every run of the plan, seeds outermost so that a partial bench covers all settings evenly."""
        return [
            RunSpec(
                method=setting.method, method_options=dict(setting.options), dataset=self.dataset_name,
                sensitive=self.sensitive, protocol=self.protocol, quantize=setting.quantize,
                config=dataclasses.replace(self.config, seed=seed, sampling=setting.sampling,
                                           select=setting.select or self.config.select),
                dataset_options=dict(self.dataset_options),
            )
            for seed in self.seeds
            for setting in self.settings
        ]


def protocol_sampling(options: dict[str, Any]) -> str:
    """The batches the Fair Mixup protocol gives a setting: per group and label for equalized-odds
    settings and for mixing within labels, per group otherwise."""
    by_label = options.get("fairness") == "eo" or options.get("mix_within") == "label"
    return "group_label" if by_label else "group"


def run_label(spec: RunSpec, plan_select: str | None = None) -> str:
    """A run's setting label: its method options, plus its sampling where that is not the protocol's, and
    ``quantize`` and its epoch rule where they are a setting's own (``select`` differs from ``plan_select``)."""
    extras = []
    if spec.config.sampling not in ("auto", protocol_sampling(spec.method_options)):
        extras.append(f"sampling={spec.config.sampling}")
    if spec.quantize:
        extras.append("quantize")
    if plan_select is not None and spec.config.select != plan_select:
        extras.append(f"select={spec.config.select}")
    label = setting_label(spec.method_options)
    if not extras:
        return label
    return ",".join(extras) if label == "default" else ",".join([label, *extras])


def _sweep(method: str, knob: str, values: Iterable[Any], *, sampling: str | None = None, **fixed: Any) -> list[Setting]:
    return [Setting(method, {**fixed, knob: value}, sampling or protocol_sampling(fixed)) for value in values]


def _gmn(*, sampling: str | None = None, **options: Any) -> Setting:
    """A gmn setting that names its placement and alignment options, so its command keeps meaning the same
    run if the method's defaults change."""
    options = {"placement": "all", "align": 0.0, "align_quantiles": 0, **options}
    return Setting("gmn", options, sampling or protocol_sampling(options))


#: The layer's own chances, on tabular data and on images alike: the paper's layer only in the first block,
#: mixing only within each label, and every layer with a quantile penalty on its input per channel or along
#: random directions of the channels (a sliced distance).
LAYER_CHANCES: tuple[Setting, ...] = (
    _gmn(placement="first"),
    _gmn(mix_within="label"),
    _gmn(align=1.0, align_quantiles=16),
    _gmn(align=1.0, align_quantiles=16, align_projections=16),
)


#: GroupMixNorm settings of the Adult bench. The first block is the paper's layer in its variants (no
#: penalty), evaluated with population, group (needs the attribute) and posterior statistics; then
#: alignment at the hidden layers; then the layer on the logit with the alignment weight swept, its quantile variant (the default: align=1, 16 quantiles), the no-mixing ablation, and the
#: equalized-odds variants, on per-label batches as the protocol has it and on group-balanced ones; last,
#: the layer's own chances: only after the first block, mixing within each label, and a per-channel or a
#: sliced (random directions) quantile penalty on every layer's input.
ADULT_GMN_SETTINGS: tuple[Setting, ...] = (
    _gmn(),
    _gmn(mix="pairwise"),
    _gmn(alpha=0.1),
    _gmn(output_scale="mixed"),
    _gmn(eval_mode="group"),
    _gmn(placement="head", eval_mode="group"),
    _gmn(placement="logit", eval_mode="group"),
    *(_gmn(placement=placement, eval_mode="posterior") for placement in ("all", "head", "logit")),
    _gmn(align=100.0),
    *(_gmn(placement="logit", align=weight) for weight in (1.0, 3.0, 10.0, 30.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16) for weight in (0.3, 1.0, 3.0, 10.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16, p=0.0) for weight in (0.3, 1.0, 3.0)),
    *(_gmn(placement="logit", align=weight, fairness="eo") for weight in (3.0, 10.0, 30.0, 100.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16, fairness="eo") for weight in (1.0, 3.0, 10.0)),
    *(_gmn(placement="logit", align=weight, fairness="eo", p=0.0) for weight in (10.0, 30.0)),
    *(_gmn(placement="logit", align=weight, fairness="eo", sampling="group") for weight in (3.0, 10.0, 30.0)),
    *(_gmn(placement="logit", align=weight, align_quantiles=16, fairness="eo", sampling="group") for weight in (1.0, 3.0)),
    *LAYER_CHANCES,
    _gmn(align=3.0, align_quantiles=16),
    *(_gmn(align=weight, align_quantiles=16, align_projections=16) for weight in (3.0, 10.0, 30.0)),
)


#: The Fair Mixup code's own choices, which the paper's numbers were most likely measured under: Adult's
#: inputs quantized as that code does, and the epoch of the lowest validation gap kept (whatever its AP). The
#: paper's layer, ERM and Fair Mixup run under them, so that the paper's claim can show up if it is there.
FAIRMIXUP_QUIRKS: tuple[Setting, ...] = tuple(
    dataclasses.replace(setting, quantize=True, select="dp_gap")
    for setting in (Setting("erm", {}), _gmn(), Setting("fairmixup", {"lam": 0.5, "fairness": "dp"}))
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
        # Equalized-odds settings on group-balanced batches (not per label), and ERM on per-label batches:
        # how much of the equalized-odds comparison is the sampling rather than the method.
        Setting("erm", {}, "group_label"),
        *_sweep("gapreg", "lam", (1.0, 2.0, 5.0), fairness="eo", sampling="group"),
        *_sweep("fairmixup", "lam", (0.5, 1.0, 2.0), fairness="eo", sampling="group"),
        *ADULT_GMN_SETTINGS,
        Setting("expgrad", {"fairness": "dp"}),
        Setting("expgrad", {"fairness": "eo"}),
        *FAIRMIXUP_QUIRKS,
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


def image_settings(*, quick: bool = False) -> tuple[Setting, ...]:
    """The sweep of every method on an image bench (a CNN; see :func:`colored_digits_plan`).

    Quick: one setting per method. Full: ERM without and with ``BatchNorm2d``; GapReg, adversarial
    debiasing and Fair Mixup over their weight for DP and EO; GroupMixNorm as the paper places it (in every
    convolution block, no penalty), the same with mixing switched off (``p=0``: batch normalization through
    the same code, the ablation), and on the logit with the quantile alignment penalty over its weight (DP,
    and EO within each label); the layer's own chances (:data:`LAYER_CHANCES`), and the paper's layer
    evaluated with each image's own statistics; ERM and the paper's layer with the epoch of the lowest
    validation gap kept; expgrad's logistic regression on the pixels.
    """
    if quick:
        return (
            Setting("erm", {}),
            Setting("gapreg", {"lam": 1.0, "fairness": "dp"}),
            Setting("adversarial", {"lam": 1.0, "fairness": "dp"}),
            Setting("fairmixup", {"lam": 0.5, "fairness": "dp"}),
            _gmn(),
            _gmn(placement="logit", align=1.0, align_quantiles=16),
            Setting("expgrad", {"fairness": "dp"}),
        )
    return (
        Setting("erm", {}),
        Setting("erm", {"norm": "batchnorm"}),
        *_sweep("gapreg", "lam", (0.3, 1.0, 3.0), fairness="dp"),
        *_sweep("gapreg", "lam", (1.0, 3.0), fairness="eo"),
        *_sweep("adversarial", "lam", (0.1, 0.3, 1.0), fairness="dp"),
        *_sweep("adversarial", "lam", (0.3, 1.0), fairness="eo"),
        *_sweep("fairmixup", "lam", (0.3, 1.0, 3.0), fairness="dp"),
        *_sweep("fairmixup", "lam", (1.0, 3.0), fairness="eo"),
        _gmn(),
        _gmn(p=0.0),
        *(_gmn(placement="logit", align=weight, align_quantiles=16) for weight in (0.3, 1.0, 3.0)),
        *(_gmn(placement="logit", align=weight, align_quantiles=16, fairness="eo") for weight in (1.0, 3.0)),
        *LAYER_CHANCES,
        _gmn(eval_mode="instance"),  # each image's own statistics at prediction: no attribute, no tint
        # The Fair Mixup code's epoch rule (the lowest validation gap; its other quirk, quantized inputs, is Adult's).
        *(dataclasses.replace(setting, select="dp_gap") for setting in (Setting("erm", {}), _gmn())),
        Setting("expgrad", {"fairness": "dp"}),
        Setting("expgrad", {"fairness": "eo"}, protocol_sampling({"fairness": "eo"})),  # sampling unused; the label stays plain
    )


COLORED_DIGITS_NOTES = (
    "Data: colored digits (`groupmixnorm.data.colored_digits`), built from scikit-learn's bundled 8x8 "
    "digits: label `digit >= 5`, protected attribute the color (red or green tint). In train and validation the "
    "color agrees with the label with probability 0.9 (a 0.8 correlation); in test every digit appears once in "
    "each color, so color is independent of the label. Model: a CNN of two `Conv2d(3x3) -> [norm] -> ReLU -> "
    "MaxPool` blocks of 16 and 32 channels, global average pooling and a linear logit (`hidden` lists its "
    "channels); expgrad fits logistic regression on the 192 normalized pixels."
)


TEXTURED_DIGITS_NOTES = (
    "Data: textured digits (`groupmixnorm.data.textured_digits`), built from scikit-learn's bundled 8x8 "
    "digits upsampled to 24x24 gray images: label `digit >= 5`, protected attribute the orientation of "
    "background stripes (horizontal or vertical), and a random contrast and brightness per image. The two "
    "textures give the images the same mean and variance, so the groups do not differ in any channel's "
    "statistics at the input. In train and validation the texture agrees with the label with probability 0.9; "
    "in test every digit appears once with each texture. Model: a CNN of three `Conv2d(3x3) -> [norm] -> ReLU "
    "-> MaxPool` blocks of 16, 32 and 64 channels, global average pooling and a linear logit; expgrad fits "
    "logistic regression on the 576 normalized pixels."
)


def colored_digits_plan(*, quick: bool = False, seeds: int = 3) -> BenchPlan:
    """Every method on colored digits (:func:`image_settings`), ``seeds`` seeds, group-balanced batches of
    64 per group (per group and label for EO settings), 30 epochs of 20 batches, the last epoch kept; about
    two minutes per seed on one CPU thread. Quick: one setting per method, one seed, 2 epochs of 5 batches."""
    return _digits_plan("colored-digits", "color", (16, 32), COLORED_DIGITS_NOTES, quick=quick, seeds=seeds)


def textured_digits_plan(*, quick: bool = False, seeds: int = 3) -> BenchPlan:
    """:func:`colored_digits_plan` on textured digits, where the group is a spatial pattern that leaves the
    channels' statistics alike, with a CNN of three blocks (16, 32, 64 channels)."""
    return _digits_plan("textured-digits", "texture", (16, 32, 64), TEXTURED_DIGITS_NOTES, quick=quick, seeds=seeds)


def _digits_plan(name: str, sensitive: str, channels: tuple[int, ...], notes: str, *, quick: bool,
                 seeds: int) -> BenchPlan:
    config = TrainConfig(epochs=30, iterations=20, batch_size=64, hidden=channels, select="last")
    timed = (Setting("erm", {}), Setting("erm", {"norm": "batchnorm"}), _gmn(),
             _gmn(placement="logit", align=3.0, align_quantiles=16))
    if quick:
        config = dataclasses.replace(config, epochs=2, iterations=5)
        return BenchPlan(name, image_settings(quick=True), (0,), config, protocol="official",
                         sensitive=sensitive, timed=timed[:3], timing_rounds=1, notes=notes)
    return BenchPlan(name, image_settings(), tuple(range(seeds)), config, protocol="official",
                     sensitive=sensitive, timed=timed, notes=notes)


def celeba_plan(*, quick: bool = False, seeds: int = 3, target: str = "Smiling", data_dir: str | None = None) -> BenchPlan:
    """The same comparison on CelebA (official partition, 64x64 images, protected attribute Male), for one
    ``target``; results are named ``celeba-<target>``. Full: :func:`image_settings`, a CNN of four blocks
    (32, 64, 128, 128 channels), 10 epochs of 200 group-balanced batches of 64 per group. Quick: 2 epochs
    of 5 batches, one seed. Needs ``data_dir`` (the official layout, see :mod:`groupmixnorm.data.celeba`)."""
    if data_dir is None:
        raise ValueError("bench celeba needs --data-dir DIR, the folder with img_align_celeba/, list_attr_celeba.txt "
                         "and list_eval_partition.txt (see the README)")
    config = TrainConfig(epochs=10, iterations=200, batch_size=64, hidden=(32, 64, 128, 128), select="last")
    if quick:
        config = dataclasses.replace(config, epochs=2, iterations=5)
    notes = (f"Data: CelebA from `{data_dir}`, official partition, target `{target}`, protected attribute `Male`, "
             "center-cropped and resized to 64x64, normalized per channel. expgrad fits logistic regression on "
             "the normalized pixels.")
    return BenchPlan(f"celeba-{target.lower()}", image_settings(quick=quick), (0,) if quick else tuple(range(seeds)),
                     config, protocol="official", dataset="celeba", sensitive="Male",
                     dataset_options={"data_dir": data_dir, "target": target}, notes=notes)


PLANS: dict[str, Callable[..., BenchPlan]] = {
    "adult": adult_plan, "colored-digits": colored_digits_plan, "textured-digits": textured_digits_plan,
    "celeba": celeba_plan,
}


#: Where a bench writes its report, tables and plots: the full bench (the committed results) ...
FULL_RESULTS_DIR = Path("docs/results")
#: ... and a partial one (``--quick``, ``--methods``, fewer seeds), relative to the current directory.
PARTIAL_RESULTS_DIR = Path("runs/bench-partial")


def _plan_words(command: str) -> list[str]:
    """A bench command's words without ``--results-dir``: where the results go is not part of the plan."""
    words = shlex.split(command)
    return [w for i, w in enumerate(words) if w != "--results-dir" and (i == 0 or words[i - 1] != "--results-dir")]


def check_partial_results_dir(results_dir: Path, name: str, command: str) -> None:
    """Refuse (``ValueError``) to let the partial bench ``command`` write bench ``name``'s results into
    ``results_dir`` when that would replace a table another command made.

    The rule: ``results_dir/<name>.md`` must be absent (with no ``<name>/runs.csv`` either), or say it was
    generated by the same command, ``--results-dir`` aside. So a partial run may resume or redo itself,
    and never replaces a full bench's table (the committed results).
    """
    report, table = Path(results_dir) / f"{name}.md", Path(results_dir) / name / "runs.csv"
    advice = (f"this partial run (`{command}`) would replace its table: leave out --results-dir "
              f"(a partial run writes to {PARTIAL_RESULTS_DIR}/) or name another folder")
    if not report.exists():
        if table.exists():
            raise ValueError(f"--results-dir {results_dir} holds {name}/runs.csv but no {name}.md saying which "
                             f"command wrote it; {advice}")
        return
    found = re.search(r"Generated by `([^`]+)`", report.read_text(encoding="utf-8"))
    if found is None:
        raise ValueError(f"--results-dir {results_dir}: {report.name} does not say which command generated it; {advice}")
    if _plan_words(found.group(1)) != _plan_words(command):
        raise ValueError(f"--results-dir {results_dir}: {report.name} there was generated by `{found.group(1)}`; "
                         f"{advice}")


class RecordStore(JsonStore):
    """The store of training runs: one record per :class:`RunSpec`, named by its key."""

    def path(self, spec: RunSpec) -> Path:
        return self.file(spec.key())

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        """The finished record of ``spec``, or ``None`` if it has not run, its file is unreadable, it was made
        for another spec, or it was made before one of today's metrics existed
        (:data:`~groupmixnorm.metrics.METRIC_NAMES`, on test and validation): such a run is trained again, so
        that every table is computed from one set of metrics."""
        def current(record: dict[str, Any]) -> bool:
            measured = set(record) & set(record.get("val", {}))
            return same_as_json(record.get("spec"), spec.to_dict()) and set(METRIC_NAMES) <= measured

        return self.read(spec.key(), current)

    def save(self, spec: RunSpec, record: dict[str, Any]) -> Path:
        return self.write(spec.key(), record)


def train_with_checkpoint(store: RecordStore, spec: RunSpec, *, save: bool) -> tuple[dict[str, Any], Path]:
    """The record of ``spec`` (trained now unless stored), and where its checkpoint is when ``save``.

    Checkpoints sit beside the records but are not committed, so a stored record whose checkpoint is
    needed and missing is trained again."""
    checkpoint = store.root / f"{spec.key()}.pt"
    record = store.load(spec)
    if record is None or (save and not checkpoint.exists()):
        record = execute(spec, save_to=checkpoint if save else None)
        record["command"] = spec.command(out="OUT") + (f" --save {shlex.quote(str(checkpoint))}" if save else "")
        store.save(spec, record)
    return record, checkpoint


def run_plan(
    plan: BenchPlan,
    store: RecordStore,
    *,
    on_run: Callable[[RunSpec, dict[str, Any], bool], None] | None = None,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Run every spec of ``plan`` that has no record in ``store``; return all records in plan order.

    ``on_run(spec, record, reused)`` is called in this process for each run: first for those found in the
    store (``reused``), then for the others as they finish. ``executor`` (see
    :mod:`~groupmixnorm.experiments.executors`; default :class:`~groupmixnorm.experiments.executors.Sequential`,
    this process) runs them; the records are the same whichever runs them.
    """
    return run_plans([(plan, store)], on_run=on_run, executor=executor)[0]


def run_plans(
    jobs: Sequence[tuple[BenchPlan, RecordStore]],
    *,
    on_run: Callable[[RunSpec, dict[str, Any], bool], None] | None = None,
    executor: Executor | None = None,
) -> list[list[dict[str, Any]]]:
    """:func:`run_plan` for several plans, each with its store, on one executor (so that no worker waits
    for the last runs of one plan before the next plan starts); the records per plan, in plan order.

    Each record is written once, atomically: by the task where it shares this disk, else here. An error of a
    run stops the sweep (and closes the executor); the records written before it stay. Otherwise the
    executor stays open for more work: close it, or use it in a ``with`` block.
    """
    executor = executor or Sequential()
    specs = [plan.specs() for plan, _ in jobs]
    records: list[list[Any]] = [[store.load(spec) for spec in plan_specs]
                                for (_, store), plan_specs in zip(jobs, specs)]
    calls = []
    for j, (plan, store) in enumerate(jobs):
        task = _PlanRun(plan.config.select, store if executor.shares_disk else None)
        for i, (spec, record) in enumerate(zip(specs[j], records[j])):
            if record is None:
                calls.append(((j, i), functools.partial(task, spec)))
            elif on_run is not None:
                on_run(spec, record, True)
    try:
        for (j, i), record in stream_all(executor, calls):
            spec = specs[j][i]
            if not executor.shares_disk:
                jobs[j][1].save(spec, record)
            records[j][i] = record
            if on_run is not None:
                on_run(spec, record, False)
    except ExecutorError as error:
        done = sum(record is not None for plan_records in records for record in plan_records)
        raise ExecutorError(f"{error}: {done} of {sum(map(len, records))} runs are recorded, and running the "
                            "same sweep again resumes from there") from None
    return records


@dataclass(frozen=True)
class _PlanRun:
    """One run of a plan as an executor's task: train, label, and save the record when ``store`` is given."""

    select: str | None
    store: RecordStore | None

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        record = execute(spec)
        record["setting"] = run_label(spec, self.select)
        if self.store is not None:
            self.store.save(spec, record)
        return record


def side_by_side_epoch_times(plan: BenchPlan, path: Path) -> Any:
    """Time ``plan.timed`` side by side (see :func:`groupmixnorm.experiments.timing.time_epochs`), once:
    the table is stored at ``path`` (JSON, atomic) and read back on later calls with the same plan."""
    import pandas as pd

    from groupmixnorm.data import load_dataset
    from groupmixnorm.experiments.timing import time_epochs

    key = {"timed": [dataclasses.asdict(s) for s in plan.timed], "rounds": plan.timing_rounds,
           "config": dataclasses.asdict(plan.config), "protocol": plan.protocol}
    if plan.dataset_name != "adult":  # only then, so that the stored Adult table keeps its key
        key.update(dataset=plan.dataset_name, sensitive=plan.sensitive, dataset_options=plan.dataset_options)

    def measure() -> dict[str, Any]:
        contenders = [(f"{s.method} {setting_label(s.options)}", s.method, s.options, s.sampling) for s in plan.timed]
        data = load_dataset(plan.dataset_name, sensitive=plan.sensitive, protocol=plan.protocol, seed=0,
                            **plan.dataset_options)
        table = time_epochs(contenders, data, plan.config, rounds=plan.timing_rounds)
        return {"key": key, "table": table.to_dict(orient="list")}

    stored = JsonStore(path.parent).reuse_or_make(path.stem, measure, valid=lambda s: same_as_json(s.get("key"), key))
    return pd.DataFrame(stored["table"])


def write_results(plan: BenchPlan, records: Sequence[dict[str, Any]], results_dir: Path, command: str) -> list[Path]:
    """Write ``runs.csv``, the trade-off plots and the Markdown report of a bench from its records.

    Layout: ``results_dir/<name>/runs.csv``, ``results_dir/<name>/ap_vs_<gap>.png`` and
    ``results_dir/<name>.md``.
    """
    from groupmixnorm.experiments import report
    from groupmixnorm.files import write_text_atomic

    from groupmixnorm.experiments.selection import validated_runs_table

    folder = Path(results_dir) / plan.name
    runs = validated_runs_table(records)
    summary = report.summarize(runs.rename(columns=lambda c: c.removeprefix("test_")))
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
    from groupmixnorm.experiments.layer_alone import layer_alone_section

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
        *([plan.notes, ""] if plan.notes else []),
        *validated_section(records),
        *layer_alone_section(records, setting_family),
    ]
    if not erm.empty:
        lines += [f"ERM: AP {erm['ap_mean'].iloc[0]:.4f}, dp_gap_hard {erm['dp_gap_hard_mean'].iloc[0]:.4f}, "
                  f"eodds_gap_hard {erm['eodds_gap_hard_mean'].iloc[0]:.4f}, "
                  f"{erm['epoch_seconds'].iloc[0]:.3f} s/epoch (means over seeds).", ""]
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


#: The families of a sweep bench's validated tables: GroupMixNorm's layer without and with its alignment
#: penalty are reported apart, since the paper's claim is about the layer alone.
GMN_LAYER_ONLY, GMN_WITH_ALIGNMENT = "gmn (layer only)", "gmn (layer + alignment)"


def setting_family(record: dict[str, Any]) -> str:
    """The row a run belongs to in the validated tables: its method, gmn split by whether it aligns, and
    settings with their own protocol quirks (``quantize``, their own epoch rule) in a row of their own."""
    family = record["method"]
    if family == "gmn":
        family = GMN_WITH_ALIGNMENT if record["options"].get("align", 0.0) > 0 else GMN_LAYER_ONLY
    quirks = ["quantized"] if record["spec"].get("quantize") else []
    if "select=" in record["setting"]:
        quirks.append(f"epoch by {record['spec']['config']['select']}")
    return family + (f" [{', '.join(quirks)}]" if quirks else "")


def validated_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """The report's main tables: per family and bound, the test AP of the setting chosen per seed on
    validation (:func:`~groupmixnorm.experiments.selection.choose_on_validation`), with a t interval over the
    seeds that met the bound; then gmn's paired verdicts. Settings that need the attribute at prediction are
    left out."""
    import pandas as pd

    from groupmixnorm.experiments import report
    from groupmixnorm.experiments.selection import (
        BOUNDS, SOFT_BOUNDS, choose_on_validation, compare_to_best_peer, summarize_choices, validated_runs_table,
    )

    kept = [r for r in records if not r.get("uses_sensitive_at_prediction")]
    runs = validated_runs_table(kept).assign(method=[setting_family(r) for r in kept])
    families = list(dict.fromkeys(runs["method"]))
    peers = [f for f in families if f != "erm" and not f.startswith("gmn")]
    lines = ["## Test AP of the setting chosen on validation, under each bound", "",
             "For each family of settings and seed: among the family's settings whose **validation** gap is within "
             "the bound, the one of best validation AP; the test split is read for that run only. Cells: mean test "
             "AP over the seeds that met the bound [95 % t interval] (seeds met). Families have sweeps of different "
             "sizes (see the table of every setting), so this is not an equal-budget comparison; "
             "`bench tabular` is. Settings that read the attribute at prediction are left out. Hard gaps at "
             "threshold 0.5; `dp_ks` is the KS distance between the groups' scores; the soft `dp_gap` and "
             "`eodds_gap` are shown for comparison with published numbers only.", ""]
    verdicts: dict[str, dict[str, str]] = {}
    for gap, bounds in {**BOUNDS, **SOFT_BOUNDS}.items():
        table = pd.DataFrame({"family": families})
        for bound in bounds:
            choices = choose_on_validation(runs, gap=gap, bound=bound)
            cells = summarize_choices(choices, gap=gap).set_index("method")
            table[f"{gap} <= {bound:g}"] = [_validated_cell(cells.loc[f]) for f in families]
            for ours in (GMN_LAYER_ONLY, GMN_WITH_ALIGNMENT):
                if ours in families and peers:
                    found = compare_to_best_peer(choices, method=ours, peers=peers)
                    verdicts.setdefault(ours, {})[f"{gap} <= {bound:g}"] = next(iter(found.values()), "—")
        lines += [f"### {gap}", "", report.markdown_table(table), ""]
    if verdicts:
        lines += ["gmn against the best peer (paired over seeds; peers: " + ", ".join(peers) + "):", "",
                  report.markdown_table(pd.DataFrame(verdicts).T.rename_axis("family").reset_index()), ""]
    return lines


def _validated_cell(row: Any) -> str:
    if row["test_ap"] is None:
        return f"— (0/{row['seeds']})"
    ap = row["test_ap"]
    return f"{ap.estimate:.3f} [{ap.low:.3f}, {ap.high:.3f}] ({row['feasible_seeds']}/{row['seeds']})"


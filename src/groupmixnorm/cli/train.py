"""``groupmixnorm train``: its flags (data, method options, loop), the run, and what it prints."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupmixnorm.cli.common import UsageError, _add_threads, _subcommand


@dataclass(frozen=True)
class DatasetDefaults:
    """What ``train`` assumes for a dataset: its protected attribute, its ``--hidden`` (MLP widths, or the
    CNN's channels for images), and which data flags (loader options) apply to it."""

    sensitive: str
    hidden: str
    options: tuple[str, ...] = ()


DATASET_DEFAULTS = {
    "adult": DatasetDefaults("sex", "200,200"),
    "colored-digits": DatasetDefaults("color", "16,32", ("bias",)),
    "celeba": DatasetDefaults("Male", "32,64,128,128", ("data_dir", "target", "image_size")),
    # Any table: --csv FILE names the dataset; --sensitive is required (no column is a safe guess).
    "csv": DatasetDefaults("", "200,200", ("csv", "label", "positive", "drop", "test_size", "split_seed", "strict")),
}
DATASETS = tuple(DATASET_DEFAULTS)


#: The file in a run's --out directory that holds the loop's state while it trains (see --resume).
STATE_FILE = "train_state.pt"


def _add_train(commands: argparse._SubParsersAction) -> None:
    from groupmixnorm.methods import METHODS

    train = _subcommand(
        commands,
        "train",
        help="train one model and write DIR/metrics.json",
        description="Train one model, print its test metrics and write OUT/metrics.json.",
    )
    data = train.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=None,
                      help="adult (bundled), colored-digits (built from scikit-learn's digits), celeba (--data-dir), "
                      "csv (--csv FILE) [default: adult, or csv when --csv is given]")
    data.add_argument("--sensitive", default=None,
                      help="protected attribute: sex, race or sex*race (adult; default sex), color (colored-digits), "
                      "an attribute name such as Male (celeba; default Male), a column name (csv; required)")
    data.add_argument("--data-dir", dest="data_data_dir", type=Path, default=None,
                      help="celeba: folder with img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt")
    data.add_argument("--target", dest="data_target", default=None,
                      help="celeba: attribute to predict, e.g. Smiling, Attractive, Wavy_Hair [default: Smiling]")
    data.add_argument("--image-size", dest="data_image_size", type=int, default=None,
                      help="celeba: side of the square images after center crop and resize [default: 64]")
    data.add_argument("--bias", dest="data_bias", type=float, default=None,
                      help="colored-digits: probability that color agrees with the label in train and "
                      "validation [default: 0.9]")
    data.add_argument("--csv", dest="data_csv", type=Path, default=None, metavar="FILE",
                      help="train on any table: a CSV file with a header row (with --label and --sensitive)")
    data.add_argument("--label", dest="data_label", default=None, metavar="COL", help="csv: the column to predict")
    data.add_argument("--positive", dest="data_positive", default=None, metavar="VALUE",
                      help="csv: the label value that is positive (needed when the label has more than two "
                      "values) [default: the larger of the two values]")
    data.add_argument("--drop", dest="data_drop", nargs="+", action="extend", default=None, metavar="COL",
                      help="csv: columns to leave out of the inputs (names, or comma-separated lists)")
    data.add_argument("--test-size", dest="data_test_size", type=float, default=None, metavar="FRACTION",
                      help="csv: share of the rows held out for testing [default: 0.3]")
    data.add_argument("--split-seed", dest="data_split_seed", type=int, default=None, metavar="SEED",
                      help="csv: seed of the test and validation splits [default: 0]")
    data.add_argument("--strict", dest="data_strict", nargs="?", const=True, type=_parse_bool, default=None,
                      metavar="BOOL",
                      help="csv: refuse rows with missing values instead of dropping them")
    data.add_argument(
        "--protocol", choices=("official", "fairmixup"), default="official",
        help="official: UCI train/test files, validation carved from train; "
        "fairmixup: merged files, rows with missing values dropped, seeded 60/20/20 split",
    )
    data.add_argument("--quantize", action="store_true",
                      help="fairmixup protocol only: reproduce its 10-bin quantization quirk")

    method = train.add_argument_group("method")
    method.add_argument("--method", choices=sorted(METHODS), default="gmn", help="training method")
    _add_method_options(method)

    loop = train.add_argument_group("training loop")
    _add_config_options(loop)

    train.add_argument("--out", required=True, type=Path, help="directory for metrics.json")
    train.add_argument("--resume", action="store_true",
                       help=f"continue from the state an interrupted run left in --out ({STATE_FILE}), if any")
    train.add_argument("--save", type=Path, default=None,
                       help="also write the trained model, its preprocessing and config to this file, for predict")
    train.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    _add_threads(train)
    train.set_defaults(handler=_run_train)


def _add_method_options(group: argparse._ArgumentGroup) -> None:
    """One flag per method option; each flag lists the methods it applies to and their defaults."""
    from groupmixnorm.methods import METHODS
    from groupmixnorm.methods.base import method_fields

    owners: dict[str, list[tuple[str, Any]]] = {}
    for name, cls in sorted(METHODS.items()):
        for item in method_fields(cls):
            owners.setdefault(item.name, []).append((name, item))
    for option_name, users in owners.items():
        first = users[0][1]
        kind = first.type if isinstance(first.type, type) else _type_from_annotation(first.type)
        description = SHARED_OPTION_HELP.get(option_name, first.metadata.get("help", "")) if len(users) > 1 \
            else first.metadata.get("help", "")
        defaults = ", ".join(f"{method} {item.default}" for method, item in users)
        group.add_argument(
            "--" + option_name.replace("_", "-"), dest=f"method_{option_name}", type=kind,
            choices=first.metadata.get("choices"), default=argparse.SUPPRESS,
            help=f"{description} [default: {defaults}]",
        )


#: Help for options that several methods share (each method's docstring says what it does with them).
SHARED_OPTION_HELP = {
    "lam": "weight of the method's fairness term in the loss",
    "fairness": "criterion the method targets: dp (demographic parity) or eo (equalized odds)",
}


def _type_from_annotation(annotation: str) -> Any:
    return {"float": float, "int": int, "str": str, "bool": _parse_bool}.get(annotation.split("|")[0].strip(), str)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--epochs", type=int, default=10, help="training epochs")
    group.add_argument("--batch-size", type=int, default=256,
                       help="batch size (for group-balanced methods: samples per group, or per group and label)")
    group.add_argument("--iterations", type=int, default=None,
                       help="batches per epoch (default: one pass over the training data)")
    group.add_argument("--sampling", choices=("auto", "random", "group", "group_label"), default="auto",
                       help="batch drawing: the method's choice, shuffled passes, or balanced per group "
                       "(per group and label)")
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    group.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    group.add_argument("--hidden", default=None,
                       help="hidden layer widths, comma-separated; for images the CNN's channels per block "
                       "[default: adult 200,200, colored-digits 16,32, celeba 32,64,128,128]")
    group.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and batch order")
    group.add_argument("--select", choices=("ap", "last", "dp_gap", "eodds_gap"), default="ap",
                       help="epoch to keep, chosen on validation: best AP (within --gap-target if given), "
                       "the last one, or the smallest gap")
    group.add_argument("--gap-metric", choices=("dp_gap", "eopp_gap", "eodds_gap"), default="dp_gap",
                       help="validation gap that --gap-target bounds")
    group.add_argument("--gap-target", type=float, default=None,
                       help="with --select ap: keep the best-AP epoch whose validation gap is at most this")
    group.add_argument("--device", default="cpu", help="torch device")


def spec_from_args(args: argparse.Namespace) -> Any:
    """Turn parsed ``train`` arguments into a :class:`~groupmixnorm.experiments.RunSpec`."""
    from groupmixnorm.experiments import RunSpec
    from groupmixnorm.methods import METHODS
    from groupmixnorm.methods.base import method_fields
    from groupmixnorm.training import TrainConfig

    known = {item.name for item in method_fields(METHODS[args.method])}
    given = {key[len("method_"):]: value for key, value in vars(args).items()
             if key.startswith("method_") and value is not None}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise UsageError(f"{flags} does not apply to --method {args.method}")
    args.dataset = _dataset_name(args)
    defaults = DATASET_DEFAULTS[args.dataset]
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, iterations=args.iterations, lr=args.lr,
        weight_decay=args.weight_decay, hidden=_parse_hidden(args.hidden or defaults.hidden), seed=args.seed,
        select=args.select, gap_metric=args.gap_metric, gap_target=args.gap_target, sampling=args.sampling,
        device=args.device,
    )
    return RunSpec(method=args.method, method_options=given, dataset=args.dataset,
                   sensitive=args.sensitive or defaults.sensitive, protocol=args.protocol, quantize=args.quantize,
                   config=config, dataset_options=_dataset_options(args))


def _dataset_name(args: argparse.Namespace) -> str:
    """``--dataset`` as given, else ``csv`` with ``--csv`` and ``adult`` without."""
    if args.data_csv is not None and args.dataset not in (None, "csv"):
        raise UsageError(f"--csv trains on a CSV file; it does not combine with --dataset {args.dataset}")
    return args.dataset or ("csv" if args.data_csv is not None else "adult")


def _dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags given, as loader options; a flag that does not apply to the dataset is an error."""
    given = {key[len("data_"):]: value for key, value in vars(args).items()
             if key.startswith("data_") and value is not None}
    foreign = sorted(set(given) - set(DATASET_DEFAULTS[args.dataset].options))
    if args.quantize and args.dataset != "adult":
        foreign.append("quantize")
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise UsageError(f"{flags} does not apply to --dataset {args.dataset}")
    if args.dataset == "celeba" and "data_dir" not in given:
        raise UsageError("--dataset celeba needs --data-dir DIR, the folder with img_align_celeba/, "
                         "list_attr_celeba.txt and list_eval_partition.txt (see the README)")
    if "data_dir" in given:
        given["data_dir"] = str(given["data_dir"])
    if args.dataset == "csv":
        _check_csv_options(args, given)
    return given


def _check_csv_options(args: argparse.Namespace, given: dict[str, Any]) -> None:
    """What ``--csv`` needs (a file, a label and a protected column), with the path made absolute so that
    a checkpoint or record can find the file again from another folder."""
    missing = [flag for flag, value in (("--csv FILE", given.get("csv")), ("--label COLUMN", given.get("label")),
                                        ("--sensitive COLUMN", args.sensitive)) if value is None]
    if missing:
        raise UsageError(f"training on a CSV needs {', '.join(missing)}")
    given["csv"] = str(Path(given["csv"]).resolve())
    if "drop" in given:  # --drop a b and --drop a,b alike; a spec writes lists back comma-separated
        given["drop"] = [name for word in given["drop"] for name in word.split(",") if name]


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers like 200,200, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise UsageError(f"--hidden widths must be positive, got {text!r}")
    return widths


def _run_train(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments import execute
    from groupmixnorm.training import TrainingDiverged, write_json_atomic

    spec = spec_from_args(args)
    # Under torchrun every process trains; rank 0 alone reports and writes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    progress = None if args.quiet or not main_process else _epoch_progress(spec.config.epochs, spec.method)
    state = args.out / STATE_FILE
    try:
        record = execute(spec, on_epoch=progress.update if progress else None,
                         save_to=args.save if main_process else None, state_path=state, resume=args.resume)
    except TrainingDiverged as error:
        raise UsageError(f"{error}; the state of the last good epoch is in {state} (lower --lr, or inspect it)") from error
    finally:
        if progress:
            progress.close()
    if not main_process:
        return 0
    record["command"] = spec.command(out=str(args.out))
    path = write_json_atomic(args.out / "metrics.json", record)
    state.unlink(missing_ok=True)  # the run is complete: metrics.json (and --save) are its results
    if not args.quiet:
        if spec.dataset == "csv":  # what was read: the positive class, the rows dropped, the split
            print(record["dataset"]["protocol"])
        print(format_summary(record))
        print(f"wrote {path}")
    return 0



class _epoch_progress:
    """A tqdm bar over epochs that shows the validation AP and gaps; it appears with the first finished
    epoch, so an error while loading data prints only its own line."""

    def __init__(self, epochs: int, method: str) -> None:
        self.epochs, self.method, self.bar = epochs, method, None

    def update(self, epoch: int, val: dict[str, float]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.epochs, desc=f"train {self.method}", unit="epoch", file=sys.stderr)
        self.bar.set_postfix(val_ap=f"{val['ap']:.3f}", val_dp=f"{val['dp_gap']:.3f}",
                             val_eodds=f"{val['eodds_gap']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.bar.n  # a method fitted outside the loop reports one "epoch"
            self.bar.close()


def format_summary(record: dict[str, Any]) -> str:
    """The test metrics of one record, and its per-group rates, as aligned text tables."""
    import pandas as pd

    from groupmixnorm.experiments import METRIC_KEYS

    metrics = pd.DataFrame({"test": [record[k] for k in METRIC_KEYS],
                            "validation": [record["val"][k] for k in METRIC_KEYS]}, index=list(METRIC_KEYS))
    rates = pd.DataFrame.from_dict(record["group_rates"], orient="index")
    columns = [c for c in ("count", "base_rate", "mean_score", "selection_rate", "tpr", "fpr") if c in rates]
    timing = record["timings"]
    lines = [
        f"{record['method']} ({record['setting']}), seed {record['seed']}, selected epoch {record['selected_epoch']}, "
        f"{timing['median_epoch_seconds']:.2f} s/epoch",
        metrics.to_string(float_format=lambda v: f"{v:.4f}"),
        "",
        f"per group ({record['dataset']['sensitive']}, test):",
        rates[columns].to_string(float_format=lambda v: f"{v:.4f}"),
    ]
    return "\n".join(lines)


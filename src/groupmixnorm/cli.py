"""The ``groupmixnorm`` command line.

Every error a user can cause ends with one clear line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn


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


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        print("groupmixnorm: error: a command is required (see the list above)", file=sys.stderr)
        return 2
    try:
        _set_threads(args)
        return args.handler(args)
    except (UsageError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a bug of ours: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, not a traceback
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an exception's text may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), like the other errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(ValueError(message))} (see {self.prog} --help)\n")


#: Datasets and benches of images, which keep torch's default thread count.
IMAGE_WORKLOADS = ("colored-digits", "celeba")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: 1 for tabular data (small matrix products run fastest "
                        "on one thread, and far slower with two on a busy machine), torch's own default for images")


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (if the subcommand has it), or the default for the workload."""
    if not hasattr(args, "threads"):
        return
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
        return
    workload = getattr(args, "dataset", None) or getattr(args, "name", None)
    if workload not in IMAGE_WORKLOADS:
        import torch

        torch.set_num_threads(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="groupmixnorm",
        description="Train and measure fair models with the GroupMixNorm layer.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_bench(commands)
    _add_predict(commands)
    _add_debias(commands)
    _add_analyze(commands)
    _add_export(commands)
    _add_report(commands)
    return parser


def _subcommand(commands: argparse._SubParsersAction, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser that shows defaults in its help and takes its own ``--debug``."""
    parser = commands.add_parser(name, help=help, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: without the flag here, a --debug given before the subcommand keeps its value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    return parser


# ------------------------------------------------------------------------------------------------- train


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


# ----------------------------------------------------------------------------------------------- predict


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = _subcommand(
        commands,
        "predict",
        help="score the rows of a CSV with a saved model (no protected attribute needed)",
        description="Score new rows with a checkpoint written by `train --save`. The CSV has a header row and "
        "the raw column names the model was trained on (for Adult the UCI names: age, workclass, ...); the "
        "protected attribute and the label may be absent. Writes OUT with the columns [ID], score, prediction.",
    )
    predict.add_argument("--checkpoint", type=Path, required=True, help="file written by train --save")
    predict.add_argument("--csv", type=Path, required=True, help="rows to score")
    predict.add_argument("--out", type=Path, required=True, help="where to write the scores (CSV)")
    predict.add_argument("--id-column", default=None, help="a column of the input to copy into the output")
    predict.add_argument("--threshold", type=float, default=0.5, help="score at or above which prediction is 1")
    predict.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from groupmixnorm.training import write_text_atomic
    from groupmixnorm.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    frame = _read_csv(args.csv)
    if args.id_column is not None and args.id_column not in frame.columns:
        raise UsageError(f"--id-column {args.id_column!r} is not a column of {args.csv}")
    scores = checkpoint.predict_proba(frame)
    output = pd.DataFrame({"score": scores, "prediction": (scores >= args.threshold).astype(int)})
    if args.id_column is not None:
        output.insert(0, args.id_column, frame[args.id_column].to_numpy())
    write_text_atomic(args.out, output.to_csv(index=False))
    print(f"scored {len(output)} rows; wrote {args.out}")
    return 0


def _read_csv(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise UsageError(f"no CSV file at {path}")
    try:
        frame = pd.read_csv(path, skipinitialspace=True, na_values="?")
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not a readable CSV: {error}") from None
    if frame.empty:
        raise UsageError(f"{path} has a header but no rows")
    return frame


# ----------------------------------------------------------------------------------------------- analyze


def _add_analyze(commands: argparse._SubParsersAction) -> None:
    from groupmixnorm.experiments.invariance import EMBEDDINGS, AnalysisOptions

    defaults = AnalysisOptions()
    analyze = _subcommand(
        commands,
        "analyze",
        help="measure how much each layer of a saved model reveals the protected attribute",
        description="For each hidden layer of a checkpoint's model on its test split: balanced accuracy and AUC "
        "of logistic-regression and MLP probes that predict the protected attribute (trained on half the rows, "
        "scored on the other half), the MMD between groups with a permutation p-value, and a 2-D embedding "
        "plot. Writes OUT/analysis.json and OUT/embedding_<layer>.png.",
    )
    analyze.add_argument("--checkpoint", type=Path, required=True, help="file written by train --save")
    analyze.add_argument("--out", type=Path, required=True, help="directory for analysis.json and the plots")
    analyze.add_argument("--seed", type=int, default=defaults.seed, help="seed of the subsamples, splits and probes")
    analyze.add_argument("--max-rows", type=int, default=defaults.max_rows, help="test rows used (stratified by group)")
    analyze.add_argument("--mmd-rows-per-group", type=int, default=defaults.mmd_rows_per_group,
                         help="rows per group in the MMD test")
    analyze.add_argument("--permutations", type=int, default=defaults.permutations, help="permutations of the MMD test")
    analyze.add_argument("--embedding", choices=EMBEDDINGS, default=defaults.embedding, help="2-D embedding of the plots")
    analyze.add_argument("--quiet", action="store_true", help="print nothing but errors")
    analyze.set_defaults(handler=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.invariance import AnalysisOptions, analyze_checkpoint

    for name in ("max_rows", "mmd_rows_per_group", "permutations"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    options = AnalysisOptions(seed=args.seed, max_rows=args.max_rows, mmd_rows_per_group=args.mmd_rows_per_group,
                              permutations=args.permutations, embedding=args.embedding)
    analysis = analyze_checkpoint(args.checkpoint, args.out, options=options)
    if not args.quiet:
        chance = analysis["chance_balanced_accuracy"]
        print(f"{analysis['method']}: can a probe recover {analysis['sensitive']}? (chance: balanced accuracy {chance:.2f})")
        for name, layer in analysis["layers"].items():
            print(f"  {name:<16} probe balanced accuracy {layer['probe_balanced_accuracy']:.3f}  AUC "
                  f"{layer['probe_auc']:.3f}  MMD^2 {layer['mmd']:.4f} (p = {layer['mmd_p_value']:.3f})")
        print(f"wrote {args.out / 'analysis.json'}")
    return 0


# ------------------------------------------------------------------------------------------------ debias


def _add_debias(commands: argparse._SubParsersAction) -> None:
    debias = _subcommand(
        commands,
        "debias",
        help="fine-tune a pre-trained ERM model with GroupMixNorm (or GapReg) on a fraction of the data",
        description="Load an ERM checkpoint (train --method erm --save ...), insert GroupMixNorm on the logit "
        "(--method gmn) or keep the network as it is (--method gapreg), fine-tune on a seeded fraction of the "
        "training rows stratified by group and label, and write OUT/metrics.json.",
    )
    debias.add_argument("--checkpoint", type=Path, required=True, help="ERM checkpoint written by train --save")
    debias.add_argument("--fraction", type=float, default=0.05, help="share of the training rows to fine-tune on")
    debias.add_argument("--method", choices=("gmn", "gapreg"), default="gmn", help="fine-tuning method")
    debias.add_argument("--align", type=float, default=None, help="gmn: alignment weight (default: gmn's)")
    debias.add_argument("--align-quantiles", type=int, default=None, help="gmn: quantiles compared (default: gmn's)")
    debias.add_argument("--lam", type=float, default=None, help="gapreg: weight of the gap (default: gapreg's)")
    debias.add_argument("--fairness", choices=("dp", "eo"), default=None, help="criterion targeted (default: dp)")
    debias.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    debias.add_argument("--batch-size", type=int, default=256, help="batch size")
    debias.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    debias.add_argument("--seed", type=int, default=0, help="seed of the fraction drawn and of training")
    debias.add_argument("--out", type=Path, required=True, help="directory for metrics.json")
    debias.add_argument("--quiet", action="store_true", help="no table")
    _add_threads(debias)
    debias.set_defaults(handler=_run_debias)


def _run_debias(args: argparse.Namespace) -> int:
    import shlex

    from groupmixnorm.experiments.debias import debias
    from groupmixnorm.training import TrainConfig, write_json_atomic
    from groupmixnorm.training.checkpoint import load_checkpoint

    options = {name: value for name, value in (("align", args.align), ("align_quantiles", args.align_quantiles),
                                                ("lam", args.lam), ("fairness", args.fairness)) if value is not None}
    foreign = {"gmn": {"lam"}, "gapreg": {"align", "align_quantiles"}}[args.method] & set(options)
    if foreign:
        raise UsageError(f"{', '.join('--' + f.replace('_', '-') for f in sorted(foreign))} does not apply to --method {args.method}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, select="last")
    checkpoint = load_checkpoint(args.checkpoint)
    command = shlex.join(["groupmixnorm", "debias", *sys.argv[2:]]) if sys.argv[1:2] == ["debias"] else ""
    record = debias(checkpoint, method=args.method, options=options, fraction=args.fraction, config=config,
                    command=command)
    path = write_json_atomic(args.out / "metrics.json", record)
    if not args.quiet:
        print(format_summary(record))
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ export


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = _subcommand(
        commands,
        "export",
        help="write a saved model as ONNX (no protected-attribute input) with its preprocessing as JSON",
        description="Export the network of a checkpoint (train --save) to ONNX. The graph's input 'features' is "
        "the preprocessed rows (float32, batch x width); its outputs are 'logit' and 'probability'. How raw "
        "columns become features (means, scales, categories) is written beside it as ONNX.json. The export "
        "is checked against PyTorch with onnxruntime when it is installed.",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="file written by train --save")
    export.add_argument("--onnx", type=Path, required=True, help="the ONNX file to write")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from groupmixnorm.training.checkpoint import load_checkpoint
    from groupmixnorm.training.export import export_onnx

    result = export_onnx(load_checkpoint(args.checkpoint), args.onnx)
    print(f"wrote {result.onnx_path} and {result.preprocessing_path}")
    if result.max_abs_difference is None:
        print("onnxruntime is not installed: the export was not checked")
    else:
        print(f"onnxruntime vs PyTorch on 64 random rows: max abs difference {result.max_abs_difference:.2e}")
    return 0


# ------------------------------------------------------------------------------------------------ report


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = _subcommand(
        commands,
        "report",
        help="write a self-contained HTML fairness report of a run, a checkpoint or a bench",
        description="Write one HTML file (plots embedded) with per-group selection, true and false positive "
        "rates, their gaps and calibration by group. SOURCE is a checkpoint (train --save), a run folder "
        "(train --out; with a checkpoint inside for calibration), or a bench results folder (runs.csv): "
        "then the report shows the trade-off plots.",
    )
    report.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT", help="what to report on")
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--bench", type=Path, default=None,
                        help="a bench results folder (e.g. docs/results/adult) whose trade-off plots to include")
    report.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.html_report import write_report

    path = write_report(args.source, args.out, bench=args.bench)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------- bench


def _add_bench(commands: argparse._SubParsersAction) -> None:
    from groupmixnorm.experiments.bench import PLANS

    bench = _subcommand(
        commands,
        "bench",
        help="run a benchmark grid (resumable) and write its runs.csv, plots and report",
        description="Run every method and setting of a benchmark over seeds, skipping runs whose record "
        "exists, then write RESULTS/NAME/runs.csv, RESULTS/NAME/*.png and RESULTS/NAME.md.",
    )
    bench.add_argument("name", choices=sorted([*PLANS, "adult-debias", "adult-invariance", "adult-unseen"]), help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="one setting per method, one seed, 2 short epochs")
    bench.add_argument("--seeds", type=int, default=5, help="seeds per setting (full bench)")
    bench.add_argument("--results-dir", type=Path, default=Path("docs/results"), help="where result files go")
    bench.add_argument("--records-dir", type=Path, default=None,
                       help="where run records go (default: RESULTS/NAME/records)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated methods to run (default: all); the report covers what was run")
    bench.add_argument("--data-dir", type=Path, default=None, help="celeba: the folder in the official layout")
    bench.add_argument("--target", default=None, help="celeba: the attribute to predict [default: Smiling]")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads(bench)
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from groupmixnorm.experiments.bench import PLANS, RecordStore, run_plan, write_results

    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    if args.methods and args.name not in PLANS:
        names = sorted(PLANS)
        raise UsageError(f"--methods applies to the {', '.join(names[:-1])} and {names[-1]} benches, not {args.name}")
    if args.name == "adult-debias":
        return _run_debias_bench(args)
    if args.name == "adult-unseen":
        return _run_unseen_bench(args)
    if args.name == "adult-invariance":
        return _run_invariance_bench(args)
    plan = PLANS[args.name](quick=args.quick, seeds=args.seeds, **_bench_data_options(args))
    if args.methods:
        plan = _only_methods(plan, args.methods)
    store = RecordStore(args.records_dir or args.results_dir / plan.name / "records")
    total = len(plan.specs())
    bar = tqdm(total=total, desc=f"bench {plan.name}", unit="run", file=sys.stderr, disable=args.quiet)

    def advance(spec: Any, record: dict[str, Any], reused: bool) -> None:
        bar.set_postfix_str(f"{spec.method} {record['setting']} seed {spec.config.seed}" + (" (done before)" if reused else ""))
        bar.update(1)

    try:
        records = run_plan(plan, store, on_run=advance)
    finally:
        bar.close()
    command = _bench_command(args)
    for path in write_results(plan, records, args.results_dir, command):
        if not args.quiet:
            print(f"wrote {path}")
    return 0


def _run_debias_bench(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.debias_bench import FINE_TUNERS, FRACTIONS, run_debias_bench, write_debias_report

    seeds, fractions, epochs = (1, (0.05, 1.0), 2) if args.quick else (args.seeds, FRACTIONS, 10)
    return _run_record_bench(
        args, total=seeds * (1 + len(fractions) * len(FINE_TUNERS)),
        run=lambda root, advance: run_debias_bench(root, seeds=seeds, fractions=fractions, epochs=epochs,
                                                   on_run=advance),
        report=write_debias_report,
    )


def _run_unseen_bench(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.unseen import METHODS, SCENARIOS, run_unseen, write_unseen_report

    seeds, epochs = (1, 1) if args.quick else (args.seeds, 10)
    return _run_record_bench(
        args, total=len(SCENARIOS) * seeds * len(METHODS),
        run=lambda root, advance: run_unseen(root, seeds=seeds, epochs=epochs, on_run=advance),
        report=write_unseen_report,
    )


def _run_invariance_bench(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.invariance_bench import SETTINGS, run_invariance, write_invariance_report

    seeds = 1 if args.quick else args.seeds
    plots = args.results_dir / args.name
    return _run_record_bench(
        args, total=seeds * len(SETTINGS),
        run=lambda root, advance: run_invariance(root, seeds=seeds, quick=args.quick, on_run=advance, plots_dir=plots),
        report=write_invariance_report,
    )


def _run_record_bench(args: argparse.Namespace, *, total: int, run: Any, report: Any) -> int:
    """Run a bench whose ``run(records_root, advance)`` returns records, with a progress bar, then write
    ``RESULTS/NAME.md`` with ``report(records, path, command)``."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"bench {args.name}", unit="run", file=sys.stderr, disable=args.quiet)

    def advance(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        records = run(args.records_dir or args.results_dir / args.name / "records", advance)
    finally:
        bar.close()
    path = report(records, args.results_dir / f"{args.name}.md", _bench_command(args))
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def _bench_data_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--data-dir`` and ``--target`` as options of the CelebA plan; an error for any other bench."""
    options = {name: value for name, value in (("data_dir", args.data_dir), ("target", args.target)) if value is not None}
    if options and args.name != "celeba":
        flags = ", ".join("--" + name.replace("_", "-") for name in options)
        raise UsageError(f"{flags} applies to the celeba bench, not {args.name}")
    if "data_dir" in options:
        from groupmixnorm.data.celeba import _checked_folder

        _checked_folder(options["data_dir"])  # a wrong folder is one line now, not an error under a progress bar
        options["data_dir"] = str(options["data_dir"])
    return options


def _only_methods(plan: Any, methods: str) -> Any:
    import dataclasses

    wanted = {name.strip() for name in methods.split(",") if name.strip()}
    known = {setting.method for setting in plan.settings}
    if not wanted or not wanted <= known:
        raise UsageError(f"--methods must name methods of the {plan.name} bench ({', '.join(sorted(known))}), got {methods!r}")
    return dataclasses.replace(plan, settings=tuple(s for s in plan.settings if s.method in wanted))


def _bench_command(args: argparse.Namespace) -> str:
    words = ["groupmixnorm", "bench", args.name]
    if args.quick:
        words.append("--quick")
    else:
        words += ["--seeds", str(args.seeds)]
    if args.methods:
        words += ["--methods", args.methods]
    for name, value in _bench_data_options(args).items():
        words += ["--" + name.replace("_", "-"), value]
    if args.results_dir != Path("docs/results"):
        words += ["--results-dir", str(args.results_dir)]
    return " ".join(words)


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


if __name__ == "__main__":
    raise SystemExit(main())

"""``groupmixnorm train``: its flags (data, method options, loop), the run, and what it prints."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupmixnorm.cli.common import (
    UsageError, _add_executor_options, _add_flag, _add_threads, _executor, _parse_bool, _subcommand,
)


@dataclass(frozen=True)
class DatasetDefaults:
    """What ``train`` assumes for a dataset: its protected attribute, its ``--hidden`` (MLP widths, or the
    CNN's channels for images), and which data flags (loader options) apply to it."""

    sensitive: str
    hidden: str
    options: tuple[str, ...] = ()


DATASET_DEFAULTS = {
    "adult": DatasetDefaults("sex", "200,200"),
    # The bundled benchmark tables (groupmixnorm.data.benchmarks); their split is seeded by --split-seed.
    "german": DatasetDefaults("age", "200,200", ("split_seed",)),
    "compas": DatasetDefaults("race", "200,200", ("split_seed",)),
    "credit": DatasetDefaults("sex", "200,200", ("split_seed",)),
    "law": DatasetDefaults("race", "200,200", ("split_seed",)),
    "colored-digits": DatasetDefaults("color", "16,32", ("bias",)),
    "textured-digits": DatasetDefaults("texture", "16,32,64", ("bias",)),
    "celeba": DatasetDefaults("Male", "32,64,128,128", ("data_dir", "target", "image_size")),
    # Any table: --csv FILE names the dataset; --sensitive is required (no column is a safe guess).
    "csv": DatasetDefaults("", "200,200", ("csv", "label", "positive", "drop", "test_size", "split_seed", "strict")),
}
DATASETS = tuple(DATASET_DEFAULTS)


def _default_budget() -> Any:
    """The loop of a table's run given neither --epochs nor --iterations: the tabular bench's, a fixed number
    of optimizer steps whatever the table's size (imported late: it imports torch)."""
    from groupmixnorm.experiments.tabular_bench import FULL_CONFIG

    return FULL_CONFIG


#: The file in a run's --out directory that holds the loop's state while it trains (see --resume).
STATE_FILE = "train_state.pt"


def _add_train(commands: argparse._SubParsersAction) -> None:
    _subcommand(
        commands,
        "train",
        help="train one model and write DIR/metrics.json",
        description="Train one model, print its test metrics and write OUT/metrics.json.",
        options=_add_train_options,
    )


def _add_train_options(train: argparse.ArgumentParser) -> None:
    from groupmixnorm.methods import METHODS  # imports torch: only when train is parsed

    data = train.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=None,
                      help="adult, german, compas, credit, law (bundled tables), colored-digits and "
                      "textured-digits (built from scikit-learn's digits), celeba (--data-dir), csv (--csv FILE) "
                      "[default: adult, or csv when --csv is given]")
    data.add_argument("--sensitive", default=None,
                      help="protected attribute: sex, race or sex*race (adult; default sex), age (<=25) or sex "
                      "(german; default age), race (African-American vs Caucasian), race6 or sex (compas; default "
                      "race), sex (credit), race (White vs non-White) or sex (law; default race), color "
                      "(colored-digits), texture (textured-digits), an attribute name such as Male (celeba; default "
                      "Male), a column name, or "
                      "several comma-separated such as sex,race, whose combinations of values are the groups "
                      "(\"female & black\"; csv; required)")
    data.add_argument("--data-dir", dest="data_data_dir", type=Path, default=None, metavar="DIR",
                      help="celeba: folder with img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt")
    data.add_argument("--target", dest="data_target", default=None, metavar="ATTRIBUTE",
                      help="celeba: attribute to predict, e.g. Smiling, Attractive, Wavy_Hair [default: Smiling]")
    data.add_argument("--image-size", dest="data_image_size", type=int, default=None, metavar="PIXELS",
                      help="celeba: side of the square images after center crop and resize [default: 64]")
    data.add_argument("--bias", dest="data_bias", type=float, default=None, metavar="PROBABILITY",
                      help="colored-digits, textured-digits: probability that color (texture) agrees with the "
                      "label in train and validation [default: 0.9]")
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
                      help="csv: seed of the test and validation splits; german, compas, credit, law: seed of "
                      "the test split (validation is drawn with seed 0) [default: 0]")
    _add_flag(data, "--strict", dest="data_strict", default=None,
              help="csv: refuse rows with missing values instead of dropping them [default: drop them]")
    data.add_argument(
        "--protocol", choices=("official", "fairmixup"), default="official",
        help="official: UCI train/test files, validation carved from train; "
        "fairmixup: merged files, rows with missing values dropped, seeded 60/20/20 split",
    )
    _add_flag(data, "--quantize", default=False,
              help="fairmixup protocol only: reproduce its 10-bin quantization quirk")

    method = train.add_argument_group("method")
    method.add_argument("--method", choices=sorted(METHODS), default=None, help="training method [default: gmn]")
    _add_method_options(method)

    fair = train.add_argument_group("fair by constraint (the most accurate model that meets every bound)")
    fair.add_argument("--max-gap", action="append", default=None, metavar="METRIC=BOUND",
                      help="bound a validation gap, e.g. dp_gap_hard=0.05 (repeatable); any gap of the package: "
                      "dp_gap, eopp_gap, eodds_gap, dp_gap_hard, eopp_gap_hard, eodds_gap_hard, dp_ks, eodds_ks, "
                      "abcc. Searches each method's fairness knob and the decision threshold on validation and "
                      "keeps the most accurate model whose bootstrap upper end meets every bound; exit 3 if none")
    fair.add_argument("--methods", default=None, metavar="LIST",
                      help="with --max-gap: comma-separated methods to search, or auto (those that need no "
                      "protected attribute at prediction and can be saved) [default: --method if given, else auto]")
    fair.add_argument("--budget", type=int, default=None, metavar="N",
                      help="with --max-gap: trials per method (a method without a knob trains once) [default: 20]")
    fair.add_argument("--cross-fit", default=None, metavar="auto|K",
                      help="with --max-gap: judge each trial on the out-of-fold scores of the training and "
                      "validation rows together, K folds (one model per fold), instead of on the validation "
                      "split alone; the chosen setting then trains on the training split and decides at the "
                      "score that accepts the share of all those rows its out-of-fold decisions accepted. 1: never; auto: 5 folds "
                      "when the validation split has a group under 100 rows [default: auto]")
    _add_executor_options(fair, "trials of a --max-gap search (the methods side by side)")

    loop = train.add_argument_group("training loop")
    _add_config_options(loop)

    train.add_argument("--out", required=True, type=Path, help="directory for metrics.json")
    train.add_argument("--resume", action="store_true",
                       help=f"continue from the state an interrupted run left in --out ({STATE_FILE}), if any")
    train.add_argument("--save", type=Path, default=None, metavar="FILE",
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
        flag, dest = "--" + option_name.replace("_", "-"), f"method_{option_name}"
        text = f"{description} [default: {defaults}]"
        if kind in (bool, _parse_bool):  # bool("false") is True: booleans are flags that parse their value
            _add_flag(group, flag, dest=dest, default=argparse.SUPPRESS, help=text)
            continue
        choices = first.metadata.get("choices")
        group.add_argument(flag, dest=dest, type=kind, choices=choices, default=argparse.SUPPRESS, help=text,
                           metavar=None if choices else option_name.upper())


#: Help for options that several methods share (each method's docstring says what it does with them).
SHARED_OPTION_HELP = {
    "lam": "weight of the method's fairness term in the loss",
    "fairness": "criterion the method targets: dp (demographic parity) or eo (equalized odds)",
}


def _type_from_annotation(annotation: str) -> Any:
    return {"float": float, "int": int, "str": str, "bool": _parse_bool}.get(annotation.split("|")[0].strip(), str)


def _add_config_options(group: argparse._ArgumentGroup) -> None:
    from groupmixnorm.training import TrainConfig
    from groupmixnorm.training.loop import GAP_METRIC_CHOICES, SAMPLING_CHOICES, SELECTION_RULES

    budget = _default_budget()
    steps = budget.epochs * budget.iterations
    group.add_argument("--epochs", type=int, default=None,
                       help=f"training epochs [default: for tables, given neither --epochs nor --iterations, "
                       f"{budget.epochs} epochs of {budget.iterations} batches: {steps:,} optimizer "
                       "steps whatever the table's size (the tabular bench's loop), the epoch kept by --select; "
                       f"images, or --iterations alone: {TrainConfig.epochs}]")
    group.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                       help="batch size (for group-balanced methods: samples per group, or per group and label)")
    group.add_argument("--iterations", type=int, default=None,
                       help=f"batches per epoch [default: {budget.iterations} for tables given neither "
                       "--epochs nor --iterations; otherwise one pass over the training data]")
    group.add_argument("--sampling", choices=SAMPLING_CHOICES, default=TrainConfig.sampling,
                       help="batch drawing: the method's choice, shuffled passes, or balanced per group "
                       "(per group and label)")
    group.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate")
    group.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="Adam weight decay")
    group.add_argument("--hidden", default=None, metavar="WIDTHS",
                       help="hidden layer widths, comma-separated; for images the CNN's channels per block "
                       "[default: tables 200,200, colored-digits 16,32, textured-digits 16,32,64, celeba "
                       "32,64,128,128]")
    group.add_argument("--seed", type=int, default=TrainConfig.seed, help="seed for torch, numpy and batch order")
    group.add_argument("--select", choices=(*SELECTION_RULES, "accuracy"), default=None,
                       help=f"epoch to keep, chosen on validation: best AP (within --gap-target if given), "
                       f"the last one, or the smallest gap [default: {TrainConfig.select}]; with --max-gap: what "
                       "the search maximizes on validation among feasible trials, accuracy (the default: the "
                       "decisions at the chosen threshold) or ap (epochs are then kept by validation AP)")
    group.add_argument("--gap-metric", choices=GAP_METRIC_CHOICES, default=TrainConfig.gap_metric,
                       help="validation gap that --gap-target bounds")
    group.add_argument("--gap-target", type=float, default=None,
                       help="with --select ap: keep the best-AP epoch whose validation gap is at most this")
    group.add_argument("--device", default=TrainConfig.device, help="torch device")


def spec_from_args(args: argparse.Namespace) -> Any:
    """Turn parsed ``train`` arguments into a :class:`~groupmixnorm.experiments.RunSpec`."""
    from groupmixnorm.experiments import RunSpec
    from groupmixnorm.methods import METHODS
    from groupmixnorm.methods.base import method_fields
    from groupmixnorm.training import TrainConfig

    args.method = args.method or "gmn"
    known = {item.name for item in method_fields(METHODS[args.method])}
    given = {key[len("method_"):]: value for key, value in vars(args).items()
             if key.startswith("method_") and value is not None}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise UsageError(f"{flags} does not apply to --method {args.method}")
    args.dataset = _dataset_name(args)
    defaults = DATASET_DEFAULTS[args.dataset]
    if args.select == "accuracy" and not getattr(args, "max_gap", None):
        raise UsageError("--select accuracy is the objective of a --max-gap search; epochs are kept by ap, "
                         "last, dp_gap or eodds_gap")
    config = TrainConfig(
        **_loop_budget(args), batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, hidden=_parse_hidden(args.hidden or defaults.hidden), seed=args.seed,
        select=TrainConfig.select if args.select in (None, "accuracy") else args.select,
        gap_metric=args.gap_metric, gap_target=args.gap_target, sampling=args.sampling, device=args.device,
    )
    return RunSpec(method=args.method, method_options=given, dataset=args.dataset,
                   sensitive=args.sensitive or defaults.sensitive, protocol=args.protocol, quantize=args.quantize,
                   config=config, dataset_options=_dataset_options(args))


def _loop_budget(args: argparse.Namespace) -> dict[str, int | None]:
    """``epochs`` and ``iterations`` of the run: as given; for a table given neither, those of
    :func:`_default_budget` (ten full passes, TrainConfig's default, are some thirty optimizer steps on
    German credit); for images given neither, TrainConfig's (full passes over many batches each)."""
    from groupmixnorm.data import IMAGE_DATASETS

    if args.epochs is None and args.iterations is None and args.dataset not in IMAGE_DATASETS:
        budget = _default_budget()
        return {"epochs": budget.epochs, "iterations": budget.iterations}
    given = {"epochs": args.epochs, "iterations": args.iterations}
    return {name: value for name, value in given.items() if value is not None}


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
                                        ("--sensitive COLUMN[,COLUMN...]", args.sensitive)) if value is None]
    if missing:
        raise UsageError(f"training on a CSV needs {', '.join(missing)}")
    if args.protocol != "official":
        raise UsageError(f"--protocol {args.protocol} does not apply to --csv (its split is set by --test-size and "
                         "--split-seed)")
    given["csv"] = str(Path(given["csv"]).resolve())
    if "drop" in given:  # --drop a b and --drop a,b alike; a spec writes lists back comma-separated
        given["drop"] = [name for word in given["drop"] for name in word.split(",") if name]


def _parse_folds(text: str | None) -> int | str:
    if text is None or text == "auto":
        return "auto"
    try:
        folds = int(text)
    except ValueError:
        folds = 0
    if folds < 1:
        raise UsageError(f"--cross-fit takes auto or a whole number of folds (1: none), got {text!r}")
    return folds


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
    from groupmixnorm.training import TrainingDiverged
    from groupmixnorm.training.distributed import leave_process_group
    from groupmixnorm.files import write_json_atomic

    if args.max_gap is None:
        given = [flag for flag, value in (("--methods", args.methods), ("--budget", args.budget),
                                          ("--cross-fit", args.cross_fit), ("--workers", args.workers),
                                          ("--ray", args.ray)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} applies to a --max-gap search; add --max-gap METRIC=BOUND")
    else:
        return _run_constrained(args)
    spec = spec_from_args(args)
    _check_device(spec.config.device)
    _check_save(args, spec, [spec.method])
    # Under torchrun every process trains; rank 0 alone reports and writes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    progress = None if args.quiet or not main_process else _epoch_progress(spec.config.epochs, spec.method)
    state = args.out / STATE_FILE
    try:
        record = execute(spec, on_epoch=progress.update if progress else None,
                         save_to=args.save if main_process else None, state_path=state, resume=args.resume)
    except TrainingDiverged as error:
        kept = f"the state of the last good epoch is in {state}" if state.exists() else "no epoch had finished"
        raise UsageError(f"{error}; {kept} (lower --lr, or inspect it)") from error
    finally:
        if progress:
            progress.close()
    leave_process_group()
    if not main_process:
        return 0
    record["command"] = spec.command(out=str(args.out))
    path = write_json_atomic(args.out / "metrics.json", record)
    state.unlink(missing_ok=True)  # the run is complete: metrics.json (and --save) are its results
    for line in record["warnings"]:
        print(f"groupmixnorm train: warning: {line}", file=sys.stderr)
    if not args.quiet:
        if spec.dataset == "csv":  # what was read: the positive class, the rows dropped, the split
            print(record["dataset"]["protocol"])
        print(format_summary(record))
        print(f"wrote {path}")
    return 0


#: The exit code of a --max-gap search in which no candidate met every bound.
NO_FEASIBLE_EXIT = 3


def _run_constrained(args: argparse.Namespace) -> int:
    """``train --max-gap``: search, choose on validation, then score the choice once on test and write
    metrics.json, front.csv, front.png (and --save); exit 3 with one line if no trial met every bound."""
    import dataclasses

    from groupmixnorm.experiments import constraint
    from groupmixnorm.experiments.spec import data_fingerprint, load_run_data

    bounds = constraint.parse_bounds(args.max_gap)
    explicit_method = args.method is not None
    methods = _search_methods(args, bounds, explicit_method)
    spec = spec_from_args(args)
    _check_device(spec.config.device)
    _check_search_flags(args)
    _check_save(args, spec, list(methods))
    budget = 20 if args.budget is None else args.budget
    select = args.select or "accuracy"
    source = data_fingerprint(spec.to_dict())
    data = load_run_data(spec.to_dict())
    folds = _search_folds(args, data)
    executor = _executor(args)
    progress = None if args.quiet else _search_progress(methods, budget, select, executor)
    try:
        with executor:
            result = constraint.search(data, methods, bounds, config=spec.config, budget=budget, select=select,
                                       on_trial=progress.update if progress else None, executor=executor,
                                       cross_fit=folds)
    finally:
        if progress:
            progress.close()
    args.out.mkdir(parents=True, exist_ok=True)
    table = constraint.front_table(result.trials, bounds, result.chosen)
    table.to_csv(args.out / "front.csv", index=False)
    constraint.plot_front(table, bounds, select, args.out / "front.png")
    if result.chosen is None:
        message = constraint.closest_message(result.trials, bounds, result.judged_on, result.folds)
        print(f"groupmixnorm train: error: {message}", file=sys.stderr)
        return NO_FEASIBLE_EXIT
    seed = spec.config.seed
    warnings = constraint.weak_model_warnings(result)
    test = constraint.score_test(result, data, bounds, seed=seed)  # the only look at the test split
    record = constraint.summary_record(result, data, bounds, select=select, budget=budget, seed=seed, test=test,
                                       warnings=warnings)
    chosen_spec = dataclasses.replace(spec, method=result.chosen.method, method_options=result.chosen.options)
    record["chosen"]["command"] = chosen_spec.command(out=str(args.out))
    _write_constrained(args, record, result, chosen_spec, data, source)
    for line in warnings:
        print(f"groupmixnorm train: warning: {line}", file=sys.stderr)
    if not args.quiet:
        print(table.drop(columns=["seconds"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(constraint.format_choice(record))
        print(f"wrote {args.out / 'metrics.json'}, front.csv, front.png")
    return 0


def _write_constrained(args: argparse.Namespace, record: dict[str, Any], result: Any, spec: Any, data: Any,
                       source: Any) -> None:
    """metrics.json, and with --save the chosen model's checkpoint with its threshold."""
    from groupmixnorm.files import write_json_atomic
    from groupmixnorm.training.checkpoint import save_checkpoint

    if args.save is not None:
        save_checkpoint(args.save, model=result.model, method=result.method, spec=spec, data=data, source=source,
                        threshold=result.threshold)
        record["checkpoint"] = str(args.save)
    write_json_atomic(args.out / "metrics.json", record)


def _search_methods(args: argparse.Namespace, bounds: dict[str, float], explicit: bool) -> dict[str, dict[str, Any]]:
    """The candidate methods of a --max-gap search with their fixed options (the user's, for a single
    --method; the fairness the bounds ask for where a method has that option)."""
    from groupmixnorm.experiments.constraint import KNOBS, auto_methods, candidate_options
    from groupmixnorm.methods import METHODS, make_method

    if args.methods is not None and explicit:
        raise UsageError("give --method (one method) or --methods (a list, or auto), not both")
    if args.methods is None:
        names = [args.method] if explicit else auto_methods()
    elif args.methods.strip() == "auto":
        names = auto_methods()
    else:
        names = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in names if name not in METHODS]
        if unknown or not names:
            raise UsageError(f"--methods {args.methods!r}: unknown method(s) {', '.join(unknown) or '(none)'}; "
                             f"available: {', '.join(sorted(METHODS))}, or auto")
    given = {key[len("method_"):]: value for key, value in vars(args).items()
             if key.startswith("method_") and value is not None}
    if given and not explicit:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
        raise UsageError(f"{flags}: method options apply to a single --method; --methods searches each method "
                         "with its defaults")
    methods = {}
    for name in dict.fromkeys(names):
        knob = KNOBS.get(name)
        if knob is not None and knob.name in given:
            raise UsageError(f"--{knob.name.replace('_', '-')} is what --max-gap searches for --method {name}; "
                             "leave it out")
        options = candidate_options(name, bounds, given)
        if make_method(name, **options).uses_sensitive_at_prediction():
            raise UsageError(f"method {name} with these options needs the protected attribute at prediction; a "
                             "--max-gap search returns models that do not")
        methods[name] = options
    return methods


def _search_folds(args: argparse.Namespace, data: Any) -> int:
    """The folds of the search (``--cross-fit``), said in one line when it cross-fits."""
    from groupmixnorm.experiments import constraint

    folds = constraint.resolve_folds(data, _parse_folds(args.cross_fit))
    if folds > 1 and not args.quiet:
        why = "" if args.cross_fit is not None else (f" (the validation split's smallest group has "
                                                     f"{constraint.smallest_group_rows(data.val)} rows; "
                                                     "--cross-fit 1 for none)")
        print(f"cross-fitting {folds} folds over the training and validation rows{why}", file=sys.stderr)
    return folds


def _check_search_flags(args: argparse.Namespace) -> None:
    """Flags that do not combine with a --max-gap search."""
    if args.select not in (None, "ap", "accuracy"):
        raise UsageError(f"with --max-gap, --select is what the search maximizes on validation: ap or accuracy, "
                         f"got {args.select}")
    if args.gap_target is not None:
        raise UsageError("--gap-target does not combine with --max-gap, which bounds the gaps itself")
    if args.resume:
        raise UsageError("--resume continues a single run; a --max-gap search starts afresh")
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget must be at least 1, got {args.budget}")


def _check_save(args: argparse.Namespace, spec: Any, methods: list[str]) -> None:
    """Refuse, before anything trains, a ``--save`` that could not be written (the library refuses it only
    once the model is trained)."""
    from groupmixnorm.data import IMAGE_DATASETS
    from groupmixnorm.methods import METHODS

    if args.save is None:
        return
    if spec.dataset in IMAGE_DATASETS:
        raise UsageError("--save writes models that score CSV rows (predict); image models are not saved yet")
    if spec.quantize:
        raise UsageError("--save does not combine with --quantize: the quantization quirk's preprocessing is not "
                         "a fitted transformer")
    outside = [name for name in methods if METHODS[name].fitted_outside_loop]
    if outside:
        hint = " (leave them out of --methods)" if args.methods is not None else ""
        raise UsageError(f"--save supports the torch-trained methods; {', '.join(outside)} models are not saved{hint}")


class _search_progress:
    """One tqdm bar over every trial of a --max-gap search, the best feasible objective so far beside it."""

    def __init__(self, methods: dict[str, dict[str, Any]], budget: int, select: str, executor: Any) -> None:
        from tqdm import tqdm

        from groupmixnorm.experiments.constraint import KNOBS

        total = sum(budget if name in KNOBS else 1 for name in methods)
        self.select = select
        title = "search" if executor.in_process else f"search ({executor.describe()})"
        self.bar = tqdm(total=total, desc=title, unit="trial", file=sys.stderr)

    def update(self, trial: Any, best: Any) -> None:
        shown = "none yet" if best is None else f"{best.choice.objective(self.select):.4f} ({best.method})"
        self.bar.set_postfix_str(f"{trial.method}, best feasible val {self.select} {shown}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _check_device(name: str) -> None:
    """Refuse a ``--device`` that torch does not know or this machine does not have, before any data loads."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (such as cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else ", a build without CUDA"
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}"
                             f"{build}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS (Apple GPUs) is not available on this machine; use --device cpu")


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

    from groupmixnorm.metrics import METRIC_NAMES

    metrics = pd.DataFrame({"test": [record[k] for k in METRIC_NAMES],
                            "validation": [record["val"][k] for k in METRIC_NAMES]}, index=list(METRIC_NAMES))
    rates = pd.DataFrame.from_dict(record["group_rates"], orient="index")
    columns = [c for c in ("count", "base_rate", "mean_score", "selection_rate", "tpr", "fpr") if c in rates]
    timing = record["timings"]
    lines = [
        f"{record['method']} ({record['setting']}), seed {record['seed']}, "
        f"selected epoch {record['selected_epoch'] + 1} of {len(record['history'])}, "
        f"{timing['median_epoch_seconds']:.2f} s/epoch",
        metrics.to_string(float_format=lambda v: f"{v:.4f}"),
        "",
        f"per group ({record['dataset']['sensitive']}, test):",
        rates[columns].to_string(float_format=lambda v: f"{v:.4f}"),
    ]
    return "\n".join(lines)


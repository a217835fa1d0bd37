"""The ``groupmixnorm`` command line.

Every error a user can cause ends with one clear line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATASETS = ("adult",)


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupmixnorm",
        description="Train and measure fair models with the GroupMixNorm layer.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_bench(commands)
    _add_predict(commands)
    _add_debias(commands)
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
    data.add_argument("--dataset", choices=DATASETS, default="adult", help="bundled dataset to train on")
    data.add_argument("--sensitive", default="sex", help="protected attribute: sex or race")
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
    train.add_argument("--save", type=Path, default=None,
                       help="also write the trained model, its preprocessing and config to this file, for predict")
    train.add_argument("--quiet", action="store_true", help="no progress bar and no table")
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
    group.add_argument("--hidden", default="200,200", help="hidden layer widths, comma-separated")
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
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, iterations=args.iterations, lr=args.lr,
        weight_decay=args.weight_decay, hidden=_parse_hidden(args.hidden), seed=args.seed, select=args.select,
        gap_metric=args.gap_metric, gap_target=args.gap_target, sampling=args.sampling,
        device=args.device,
    )
    return RunSpec(method=args.method, method_options=given, dataset=args.dataset, sensitive=args.sensitive,
                   protocol=args.protocol, quantize=args.quantize, config=config)


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
    from groupmixnorm.training import write_json_atomic

    spec = spec_from_args(args)
    progress = None if args.quiet else _epoch_progress(spec.config.epochs, spec.method)
    try:
        record = execute(spec, on_epoch=progress.update if progress else None, save_to=args.save)
    finally:
        if progress:
            progress.close()
    record["command"] = spec.command(out=str(args.out))
    path = write_json_atomic(args.out / "metrics.json", record)
    if not args.quiet:
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
    bench.add_argument("name", choices=sorted([*PLANS, "adult-debias", "adult-unseen"]), help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="one setting per method, one seed, 2 short epochs")
    bench.add_argument("--seeds", type=int, default=5, help="seeds per setting (full bench)")
    bench.add_argument("--results-dir", type=Path, default=Path("docs/results"), help="where result files go")
    bench.add_argument("--records-dir", type=Path, default=None,
                       help="where run records go (default: RESULTS/NAME/records)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated methods to run (default: all); the report covers what was run")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from groupmixnorm.experiments.bench import PLANS, RecordStore, run_plan, write_results

    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    if args.methods and args.name not in PLANS:
        raise UsageError(f"--methods applies to the {', '.join(sorted(PLANS))} bench, not {args.name}")
    if args.name == "adult-debias":
        return _run_debias_bench(args)
    if args.name == "adult-unseen":
        return _run_unseen_bench(args)
    plan = PLANS[args.name](quick=args.quick, seeds=args.seeds)
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

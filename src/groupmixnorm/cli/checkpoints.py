"""Subcommands on saved models and runs: ``predict``, ``analyze``, ``debias``, ``export`` and ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from groupmixnorm.cli.common import UsageError, _add_threads, _subcommand
from groupmixnorm.cli.train import format_summary


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
    predict.add_argument("--threshold", type=float, default=None,
                         help="score at or above which prediction is 1, in [0, 1] [default: the checkpoint's, "
                         "0.5 unless train --max-gap chose one]")
    predict.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import warnings

    import pandas as pd

    from groupmixnorm.files import write_text_atomic
    from groupmixnorm.training.checkpoint import FilledCategoriesWarning, load_checkpoint

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # NaN fails both comparisons
        raise UsageError(f"--threshold must be a number in [0, 1] (scores are probabilities), got {args.threshold}")
    checkpoint = load_checkpoint(args.checkpoint)
    frame = _read_csv(args.csv)
    if args.id_column is not None and args.id_column not in frame.columns:
        raise UsageError(f"--id-column {args.id_column!r} is not a column of {args.csv}")
    _, note = checkpoint.model_inputs(frame)  # refuses the rows it cannot score, before anything is written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilledCategoriesWarning)  # the note is printed below instead
        scores = checkpoint.predict_proba(frame)
    threshold = checkpoint.threshold if args.threshold is None else args.threshold
    output = pd.DataFrame({"score": scores, "prediction": (scores >= threshold).astype(int)})
    if args.id_column is not None:
        output.insert(0, args.id_column, frame[args.id_column].to_numpy())
    write_text_atomic(args.out, output.to_csv(index=False))
    print(f"scored {len(output)} rows; wrote {args.out}" + ("" if note is None else f" ({note})"))
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


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, metavar="FILE",
                        help="for a model trained with train --csv: a copy of its training file, read instead of "
                        "the path it was trained from (it must have the same sha256, which the checkpoint stores)")


# ----------------------------------------------------------------------------------------------- analyze


def _add_analyze(commands: argparse._SubParsersAction) -> None:
    _subcommand(
        commands,
        "analyze",
        help="measure how much each layer of a saved model reveals the protected attribute",
        description="For each hidden layer of a checkpoint's model on its test split: balanced accuracy and AUC "
        "of logistic-regression and MLP probes that predict the protected attribute (trained on half the rows, "
        "scored on the other half), the MMD between groups with a permutation p-value, and a 2-D embedding "
        "plot. Writes OUT/analysis.json and OUT/embedding_<layer>.png.",
        options=_add_analyze_options,
    )


def _add_analyze_options(analyze: argparse.ArgumentParser) -> None:
    from groupmixnorm.experiments.invariance import EMBEDDINGS, AnalysisOptions  # torch: only when parsed

    defaults = AnalysisOptions()
    analyze.add_argument("--checkpoint", type=Path, required=True, help="file written by train --save")
    analyze.add_argument("--out", type=Path, required=True, help="directory for analysis.json and the plots")
    analyze.add_argument("--seed", type=int, default=defaults.seed, help="seed of the subsamples, splits and probes")
    analyze.add_argument("--max-rows", type=int, default=defaults.max_rows, help="test rows used (stratified by group)")
    analyze.add_argument("--mmd-rows-per-group", type=int, default=defaults.mmd_rows_per_group,
                         help="rows per group in the MMD test")
    analyze.add_argument("--permutations", type=int, default=defaults.permutations, help="permutations of the MMD test")
    analyze.add_argument("--embedding", choices=EMBEDDINGS, default=defaults.embedding, help="2-D embedding of the plots")
    _add_data(analyze)
    analyze.add_argument("--quiet", action="store_true", help="print nothing but errors")
    analyze.set_defaults(handler=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.invariance import AnalysisOptions, analyze_checkpoint

    for name in ("max_rows", "mmd_rows_per_group", "permutations"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    options = AnalysisOptions(seed=args.seed, max_rows=args.max_rows, mmd_rows_per_group=args.mmd_rows_per_group,
                              permutations=args.permutations, embedding=args.embedding)
    analysis = analyze_checkpoint(args.checkpoint, args.out, options=options, data_file=args.data)
    if not args.quiet:
        chance = analysis["chance_balanced_accuracy"]
        print(f"{analysis['method']}: can a probe recover {analysis['sensitive']}? (chance: AUC either way round 0.50, "
              f"balanced accuracy {chance:.2f})")
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
    from groupmixnorm.training import TrainConfig
    from groupmixnorm.files import write_json_atomic
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
    from groupmixnorm.export import export_onnx

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
        description="Write one HTML file (plots embedded) with the test metrics beside the majority-class "
        "accuracy, per-group selection, true and false positive rates and their gaps with bootstrap intervals, "
        "each group's selection rate against the highest (four-fifths rule), score histograms by group, "
        "accuracy and gaps against the decision threshold, calibration by group, a warning for each small group "
        "and, for a model chosen by train --max-gap, the validation front. SOURCE is a checkpoint (train "
        "--save), a run folder (train --out; with a checkpoint inside for what needs the test scores), or a "
        "bench results folder (runs.csv): then the report shows the trade-off plots.",
    )
    report.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT", help="what to report on")
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--bench", type=Path, default=None,
                        help="a bench results folder (e.g. docs/results/adult) whose trade-off plots to include")
    report.add_argument("--baseline", type=Path, default=None, metavar="PATH",
                        help="a checkpoint or run folder of a plain model (say erm) of the same data, whose test "
                        "metrics and gaps are shown in a second column")
    report.add_argument("--resamples", type=int, default=None, metavar="N",
                        help="bootstrap resamples of the intervals [default: as many as train --max-gap draws]")
    _add_data(report)
    report.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from groupmixnorm.experiments.constraint import RESAMPLES
    from groupmixnorm.experiments.html_report import write_report

    resamples = RESAMPLES if args.resamples is None else args.resamples
    path = write_report(args.source, args.out, bench=args.bench, data=args.data, baseline=args.baseline,
                        resamples=resamples)
    print(f"wrote {path}")
    return 0



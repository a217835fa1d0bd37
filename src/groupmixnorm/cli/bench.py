"""``groupmixnorm bench``: the benchmark grids and the record benches (debias, unseen, invariance)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from groupmixnorm.cli.common import UsageError, _add_threads, _subcommand


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



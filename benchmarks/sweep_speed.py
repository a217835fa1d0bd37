"""Wall time of one sweep on each executor, and what the full tabular bench would take on a 64-core cluster.

Runs the plan of ``groupmixnorm bench tabular --quick`` (German and COMPAS, 42 runs) into a fresh record store
on each executor in turn: this process, one worker process, N worker processes, and a local Ray head of N
CPUs (``ray.init(num_cpus=N)``; skipped without ray), for ``--rounds`` rounds with the order rotating, so
that every executor sees the same machine load; medians. Each executor is warmed first (its processes
started and the package imported: that start-up is reported apart), so the plan's wall time is the sweep's.
The per-run overhead is ``(wall x slots - the runs' own seconds) / runs``: what each run costs beyond its
training (the task's trip, the record's write, idle slots at the end). Every executor's records are
compared with this process's, timings aside: they must be identical.

The estimate for the full bench (``bench tabular``: five data sets, 1525 runs) on a cluster of ``--cores``
CPUs, one run per CPU: each run's own seconds as the committed records measured them
(``docs/results/tabular/*/records``, ``timings.total_seconds``, one torch thread on this machine) plus the
measured Ray overhead per run, scheduled greedily in plan order, as ``run_plans`` submits them.

    python benchmarks/sweep_speed.py                # 3 rounds; writes docs/results/sweep-speed.md
    python benchmarks/sweep_speed.py --quick        # German, 3 methods, 1 round: prints, writes nothing
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from groupmixnorm.experiments.bench import RecordStore
from groupmixnorm.experiments.executors import Executor, LocalWorkers, RayExecutor, Sequential
from groupmixnorm.experiments.tabular_bench import run_tabular, tabular_plans
from groupmixnorm.files import write_text_atomic

#: Where the full measurement writes its table (``--quick`` never writes).
RESULTS = Path("docs/results/sweep-speed.md")
#: The committed records of the full tabular bench, read for their per-run seconds.
FULL_RECORDS = Path("docs/results/tabular")


def warm(seconds: float) -> int:
    """A task that imports what a run imports, then holds its slot a moment so the next one lands elsewhere."""
    import groupmixnorm.experiments.bench  # noqa: F401 - the import is the point

    time.sleep(seconds)
    return os.getpid()


#: How long each warm-up task holds its slot.
WARM_SECONDS = 0.3


def start(executor: Executor) -> float:
    """Seconds to bring every slot of ``executor`` up: two warm-up tasks per slot, less their own sleep."""
    started = time.perf_counter()
    futures = [executor.submit(functools.partial(warm, WARM_SECONDS)) for _ in range(2 * executor.slots)]
    for future in futures:
        executor.result(future)
    return max(0.0, time.perf_counter() - started - 2 * WARM_SECONDS)


def sweep(executor: Executor, plans: list[Any]) -> tuple[float, list[dict[str, Any]]]:
    """The plans run into a fresh store: wall seconds and the records, in plan order."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        records = run_tabular(plans, Path(folder), executor=executor)
        wall = time.perf_counter() - started
    return wall, [record for dataset in records.values() for record in dataset]


def numbers(records: list[dict[str, Any]]) -> list[Any]:
    return json.loads(json.dumps([{k: v for k, v in r.items() if k != "timings"} for r in records]))


def executors(workers: int, with_ray: bool) -> dict[str, Any]:
    """The contenders, each a factory (a fresh executor per round)."""
    contenders: dict[str, Any] = {
        "this process (sequential)": Sequential,
        "1 worker process": functools.partial(LocalWorkers, 1),
        f"{workers} worker processes": functools.partial(LocalWorkers, workers),
    }
    if with_ray:
        contenders[f"Ray, local head of {workers} CPUs"] = RayExecutor
    return contenders


def measure(plans: list[Any], workers: int, rounds: int, with_ray: bool) -> dict[str, dict[str, Any]]:
    """Per executor: start-up, wall and the runs' own seconds of each round, and whether its records match."""
    contenders = executors(workers, with_ray)
    results: dict[str, dict[str, Any]] = {name: {"start": [], "wall": [], "own": [], "same": True, "slots": 0}
                                          for name in contenders}
    reference = None
    names = list(contenders)
    for round_number in range(rounds):
        order = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in order:
            with contenders[name]() as executor:
                found = results[name]
                found["slots"] = executor.slots
                found["start"].append(start(executor))
                wall, records = sweep(executor, plans)
            found["wall"].append(wall)
            found["own"].append(sum(r["timings"]["total_seconds"] for r in records))
            if reference is None and name == names[0]:
                reference = numbers(records)
            found["records"] = numbers(records)
        print(f"round {round_number + 1} of {rounds} done", file=sys.stderr)
    for found in results.values():
        found["same"] = found.pop("records") == reference
    return results


def full_bench_seconds() -> tuple[list[float], int]:
    """Each run's own seconds, in the full tabular bench's plan order, from the committed records; and how
    many of its runs have no record there."""
    seconds, missing = [], 0
    for plan in tabular_plans():
        store = RecordStore(FULL_RECORDS / plan.dataset_name / "records")
        for spec in plan.specs():
            record = store.load(spec)
            if record is None:
                missing += 1
            else:
                seconds.append(record["timings"]["total_seconds"])
    return seconds, missing


def makespan(seconds: list[float], cores: int, overhead: float) -> float:
    """Wall time of runs started in order, each on the first free core (what a queue of tasks does)."""
    free = [0.0] * cores
    for cost in seconds:
        heapq.heappush(free, heapq.heappop(free) + cost + overhead)
    return max(free)


def report(results: dict[str, dict[str, Any]], runs: int, rounds: int, args: argparse.Namespace,
           command: str, head: float | None) -> str:
    base = statistics.median(results["this process (sequential)"]["wall"])
    lines = [
        "# Sweep speed: one process, worker processes, Ray", "",
        f"Generated by `{command}` on {os.cpu_count()} CPU cores, torch {torch.__version__}, one torch thread per "
        f"run: the plan of `bench tabular --quick`{' (German, 3 methods)' if args.quick else ''}, {runs} runs, "
        f"into a fresh record store on each executor, {rounds} round(s) in rotating order; medians. Start-up (the "
        "processes started and the package imported) is measured apart and not in the wall time. Per-run overhead: "
        "(wall x slots - the runs' own seconds) / runs."
        + (f" Starting the local Ray head (`ray.init`) took {head:.1f} s more." if head is not None else
           " ray is not installed: no Ray row."), "",
        "| executor | slots | start-up s | wall s | speed-up | own s per run | overhead s per run "
        "| records identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, found in results.items():
        wall, own = statistics.median(found["wall"]), statistics.median(found["own"])
        overhead = (wall * found["slots"] - own) / runs
        lines.append(f"| {name} | {found['slots']} | {statistics.median(found['start']):.2f} | {wall:.2f} | "
                     f"{base / wall:.2f}x | {own / runs:.3f} | {overhead:.3f} | {'yes' if found['same'] else 'NO'} |")
    lines += ["", *estimate(results, runs, args.cores)]
    return "\n".join(lines) + "\n"


def estimate(results: dict[str, dict[str, Any]], runs: int, cores: int) -> list[str]:
    seconds, missing = full_bench_seconds()
    if not seconds:
        return [f"No records of the full bench under `{FULL_RECORDS}`: no estimate for {cores} cores."]
    ray = next((found for name, found in results.items() if name.startswith("Ray")), None)
    source = ray or results[list(results)[2]]
    overhead = max(0.0, (statistics.median(source["wall"]) * source["slots"] - statistics.median(source["own"])) / runs)
    total = sum(seconds)
    wall = makespan(seconds, cores, overhead)
    return [
        f"## The full tabular bench on {cores} cores (an estimate)", "",
        f"From the committed records of `bench tabular` ({len(seconds)} runs"
        + (f", {missing} without a record left out" if missing else "") + f"): {total / 3600:.2f} CPU hours of runs "
        f"(median {statistics.median(seconds):.1f} s, longest {max(seconds):.1f} s), measured one thread per run on "
        f"this machine under its load at the time. With the measured overhead of "
        f"{'Ray' if ray else 'worker processes'}, "
        f"{overhead:.3f} s per run, and {cores} runs at a time, started in plan order on the first free "
        f"CPU: about **{wall / 60:.1f} minutes** (one process: {total / 3600:.2f} hours; the bound "
        f"for {cores} cores, max(total / {cores}, longest run): {max(total / cores, max(seconds)) / 60:.1f} "
        "minutes). Add the cluster's start and each node's first import of the package (the start-up column "
        "above), and scale by the speed of a cluster core against this machine's.", "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="German, 3 methods, 1 round; prints, writes nothing")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per executor [default: 3; quick 1]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, and the Ray head's CPUs")
    parser.add_argument("--cores", type=int, default=64, help="cores of the cluster of the estimate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the command line runs tabular work, and as every worker does
    rounds = args.rounds or (1 if args.quick else 3)
    plans = tabular_plans(quick=True, **({"datasets": ["german"], "methods": ["erm", "gapreg", "expgrad"]}
                                         if args.quick else {}))
    runs = sum(len(plan.specs()) for plan in plans)
    try:
        import ray
    except ImportError:
        ray = None
        print('ray is not installed (pip install "groupmixnorm[distributed]"): no Ray row', file=sys.stderr)
    head = None
    if ray is not None:
        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False)
        head = time.perf_counter() - started
    try:
        results = measure(plans, args.workers, rounds, ray is not None)
    finally:
        if ray is not None:
            ray.shutdown()
    command = " ".join(["python", "benchmarks/sweep_speed.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(results, runs, rounds, args, command, head)
    print(text)
    if not args.quick:
        write_text_atomic(RESULTS, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

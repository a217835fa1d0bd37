"""Training time per epoch of each method relative to ERM, measured in one process.

Each method trains with the Adult bench's settings (Fair Mixup protocol, group-balanced batches of 500 per
group, per group and label for equalized-odds settings). The methods take turns, one epoch each, for
``--rounds`` rounds, so that all of them see the same machine load. The script reports the median epoch
time of each and its ratio to ERM's median. Quote these ratios rather than the bench's per-run timings,
which come from runs made at different times on a shared machine.

    python benchmarks/epoch_time.py                 # 7 rounds of 100 iterations
    python benchmarks/epoch_time.py --rounds 3 --iterations 20   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from groupmixnorm.data import load_dataset
from groupmixnorm.methods import make_method
from groupmixnorm.methods.base import ModelSpec
from groupmixnorm.training import TrainConfig
from groupmixnorm.training.loop import _to_tensors, _train_one_epoch

#: (label, method, options, sampling): representative settings of the Adult bench.
CONTENDERS = (
    ("erm", "erm", {}, "group"),
    ("gmn default (logit layer, quantile alignment)", "gmn", {}, "group"),
    ("gmn moment alignment (--align-quantiles 0 --align 10)", "gmn", {"align_quantiles": 0, "align": 10.0}, "group"),
    ("gmn paper layer (--placement all --align 0)", "gmn", {"placement": "all", "align": 0.0}, "group"),
    ("gmn eo (--fairness eo --align-quantiles 0 --align 10)", "gmn",
     {"fairness": "eo", "align_quantiles": 0, "align": 10.0}, "group_label"),
    ("gapreg dp", "gapreg", {"fairness": "dp", "lam": 1.0}, "group"),
    ("gapreg eo", "gapreg", {"fairness": "eo", "lam": 1.0}, "group_label"),
    ("adversarial dp", "adversarial", {"fairness": "dp", "lam": 1.0}, "group"),
    ("fairmixup dp", "fairmixup", {"fairness": "dp", "lam": 0.5}, "group"),
    ("fairmixup eo", "fairmixup", {"fairness": "eo", "lam": 1.0}, "group_label"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="epochs timed per method (median reported)")
    parser.add_argument("--iterations", type=int, default=100, help="batches per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("adult", protocol="fairmixup", seed=0)
    train_split = _to_tensors(data.train, torch.device("cpu"))
    runners = [_runner(method, options, sampling, data, train_split, args.iterations)
               for _, method, options, sampling in CONTENDERS]
    times: list[list[float]] = [[] for _ in CONTENDERS]
    for _ in range(args.rounds):
        for index, run_epoch in enumerate(runners):
            started = time.perf_counter()
            run_epoch()
            times[index].append(time.perf_counter() - started)

    reference = statistics.median(times[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.iterations} batches; median seconds per epoch and ratio to ERM")
    print("| method | s/epoch | x ERM |\n|---|---|---|")
    for (label, *_), samples in zip(CONTENDERS, times):
        median = statistics.median(samples)
        print(f"| {label} | {median:.3f} | {median / reference:.2f} |")


def _runner(method_name, options, sampling, data, train_split, iterations):
    method = make_method(method_name, **options)
    config = TrainConfig(batch_size=500, iterations=iterations, sampling=sampling)
    torch.manual_seed(0)
    model = method.build_model(ModelSpec(data.num_features, data.num_groups, config.hidden))
    method.setup(model, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    return lambda: _train_one_epoch(method, model, optimizer, train_split, config, generator, 0)


if __name__ == "__main__":
    main()

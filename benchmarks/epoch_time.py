"""Training time per epoch of each method relative to ERM, measured in one process.

The settings are those the Adult bench times (``adult_plan().timed``), trained as the bench trains them
(Fair Mixup protocol, batches of 500 per group, per group and label for equalized-odds settings). They
take turns, one epoch each, for ``--rounds`` rounds, so that all of them see the same machine load; the
script prints each median epoch time and its ratio to ERM's. ``groupmixnorm bench adult`` runs the same
measurement and puts it in its report; quote these ratios rather than the per-run timings of runs.csv,
which were made at different times on a shared machine.

    python benchmarks/epoch_time.py                 # 7 rounds of 100 iterations
    python benchmarks/epoch_time.py --rounds 3 --iterations 20   # a quick look
"""

from __future__ import annotations

import argparse

import torch

from groupmixnorm.data import load_dataset
from groupmixnorm.experiments.bench import adult_plan
from groupmixnorm.experiments.spec import setting_label
from groupmixnorm.experiments.timing import time_epochs
from groupmixnorm.training import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="epochs timed per method (median reported)")
    parser.add_argument("--iterations", type=int, default=100, help="batches per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("adult", protocol="fairmixup", seed=0)
    config = TrainConfig(batch_size=500, iterations=args.iterations)
    contenders = [(f"{s.method} {setting_label(s.options)}", s.method, s.options, s.sampling) for s in adult_plan().timed]
    table = time_epochs(contenders, data, config, rounds=args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.iterations} batches; median seconds per epoch and ratio to ERM")
    print("| method | s/epoch | x ERM |\n|---|---|---|")
    for row in table.itertuples(index=False):
        print(f"| {row.setting} | {row.seconds_per_epoch:.3f} | {row.x_reference:.2f} |")


if __name__ == "__main__":
    main()

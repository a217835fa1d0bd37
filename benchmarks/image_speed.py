"""Training images per second of a CNN with GroupMixNorm2d against the same CNN with BatchNorm2d.

Both networks come from :func:`groupmixnorm.methods.build_cnn` with the same channels, initial weights and
batches: ``Conv2d(3x3) -> norm -> ReLU -> MaxPool`` blocks, the normalization layer in every block (the
paper's placement), global average pooling and a linear logit. One training step is forward, binary
cross-entropy, backward and an Adam step; GroupMixNorm reads the group ids through ``use_groups``. The two
networks take turns, ``--steps`` steps each per round, for ``--rounds`` rounds in one process, so both see
the same machine load; the script prints the median images per second of each and their ratio.

    python benchmarks/image_speed.py                       # 3x32x32 images, batches of 128, 1 thread
    python benchmarks/image_speed.py --size 64 --channels 32,64,128,128
    python benchmarks/image_speed.py --quick               # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from groupmixnorm.methods import build_cnn
from groupmixnorm.nn import use_groups


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> Callable[[], None]:
    """A closure that runs one training step of ``model`` on the batch ``(x, y, groups)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        with use_groups(groups):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_second(steps: dict[str, Callable[[], None]], *, rounds: int, per_round: int, batch: int) -> dict[str, list[float]]:
    """Images per second of each step function in every round, the functions taking turns."""
    for step in steps.values():  # warm-up: allocator and kernels
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(per_round):
                step()
            samples[name].append(per_round * batch / (time.perf_counter() - started))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", default="16,32,64", help="channels of the convolution blocks")
    parser.add_argument("--batch", type=int, default=128, help="images per batch")
    parser.add_argument("--groups", type=int, default=2, help="protected groups in a batch")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per network per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps on 16x16 images")
    args = parser.parse_args()
    if args.quick:
        args.size, args.rounds, args.steps = 16, 2, 2
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    y = torch.randint(0, 2, (args.batch,), generator=generator).float()
    groups = torch.randint(0, args.groups, (args.batch,), generator=generator)
    steps = {}
    for norm in ("batchnorm", "groupmixnorm"):
        torch.manual_seed(0)
        model = build_cnn((3, args.size, args.size), channels, norm=norm, num_groups=args.groups)
        steps[norm] = training_step(model, x, y, groups)
    samples = images_per_second(steps, rounds=args.rounds, per_round=args.steps, batch=args.batch)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CNN {list(channels)} on 3x{args.size}x"
          f"{args.size}, batches of {args.batch}, {args.groups} groups; median of {args.rounds} rounds of "
          f"{args.steps} training steps")
    print("| network | training images/s |\n|---|---|")
    for name, value in medians.items():
        print(f"| CNN with {'BatchNorm2d' if name == 'batchnorm' else 'GroupMixNorm2d'} | {value:.0f} |")
    print(f"GroupMixNorm2d / BatchNorm2d throughput: {medians['groupmixnorm'] / medians['batchnorm']:.2f}")


if __name__ == "__main__":
    main()

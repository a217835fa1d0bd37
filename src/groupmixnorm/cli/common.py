"""What every subcommand shares: the one-line error, the parser class, ``--threads`` and the
subcommand helper."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


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


def _subcommand(commands: argparse._SubParsersAction, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser that shows defaults in its help and takes its own ``--debug``."""
    parser = commands.add_parser(name, help=help, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: without the flag here, a --debug given before the subcommand keeps its value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    return parser



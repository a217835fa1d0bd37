"""What every subcommand shares: the one-line error, the parser class, ``--threads``, one-line warnings
and the subcommand helper (help text, and options added only when their subcommand is used)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an exception's text may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), like the other errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(ValueError(message))} (see {self.prog} --help)\n")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: 1 for tabular data (small matrix products run fastest "
                        "on one thread, and far slower with two on a busy machine), torch's own default for images")


def _add_executor_options(parser: Any, what: str) -> None:
    """``--workers [N]`` and ``--ray ADDRESS``: where the ``what`` run (see
    :mod:`groupmixnorm.experiments.executors`)."""
    parser.add_argument("--workers", nargs="?", const="auto", default=None, type=_parse_workers, metavar="N",
                        help=f"train the {what} in N processes of this machine, one torch thread each (or "
                        "--threads); auto: one per core, less one for this process beyond two cores; 1: in this "
                        "process; the same results whatever N [default: auto]")
    parser.add_argument("--ray", default=None, metavar="auto|HOST:PORT",
                        help=f"train the {what} as tasks of a Ray cluster (pip install \"groupmixnorm[distributed]\"): "
                        "auto (RAY_ADDRESS, or the cluster `ray start` started on this machine) or the head's "
                        "HOST:PORT; the same results as one process")


def _parse_workers(text: str) -> int:
    from groupmixnorm.experiments.executors import default_workers

    if text.strip().lower() == "auto":
        return default_workers()
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers of at least 1, or auto, got {text!r}")
    return workers


def _executor(args: argparse.Namespace) -> Any:
    """The executor that ``--workers`` and ``--ray`` ask for (for neither: ``--workers auto``)."""
    from groupmixnorm.experiments.executors import default_workers, executor_for

    workers = default_workers() if args.workers is None and args.ray is None else args.workers
    try:
        return executor_for(workers, args.ray, threads=getattr(args, "threads", None))
    except ValueError as error:
        raise UsageError(str(error)) from None


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (if the subcommand has it), or the default for the workload."""
    if not hasattr(args, "threads"):
        return
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    from groupmixnorm.data import IMAGE_DATASETS
    from groupmixnorm.training.threads import default_threads

    workload = getattr(args, "dataset", None) or getattr(args, "name", None)  # an image bench is named after its data
    threads = args.threads if args.threads is not None else default_threads(images=workload in IMAGE_DATASETS)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class _HelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default once, as ``[default: X]`` like the hand-written texts: added
    only where the help does not mention a default already, and not for an unset (``None``) or off
    (``False``) one, which would contradict a help that explains what an unset option means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        return f"{text} [default: %(default)s]"


class _Subcommands(argparse._SubParsersAction):
    """Subcommands whose options are added when that subcommand is parsed (see :func:`_subcommand`), so
    that ``groupmixnorm --help`` imports none of the libraries that some options are read from."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        chosen = self._name_parser_map.get(values[0])
        fill = getattr(chosen, "_pending_options", None)
        if fill is not None:
            chosen._pending_options = None  # type: ignore[union-attr]
            fill(chosen)
        super().__call__(parser, namespace, values, option_string)


def _subcommand(
    commands: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """A subcommand parser that states defaults in its help and takes its own ``--debug``.

    ``options(parser)`` adds the rest of its options: when the subcommand is parsed, if ``commands`` are
    :class:`_Subcommands` (as :func:`groupmixnorm.cli.build_parser` makes them), else at once. Options that
    need heavy imports (torch, to list the methods' options) go there.
    """
    parser = commands.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
    # SUPPRESS: without the flag here, a --debug given before the subcommand keeps its value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    if options is not None:
        if isinstance(commands, _Subcommands):
            parser._pending_options = options  # type: ignore[attr-defined]
        else:
            options(parser)
    return parser


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_flag(group: Any, *flags: str, help: str, **settings: Any) -> None:
    """A boolean option: the bare flag turns it on; ``FLAG false`` (or ``true``), as the commands stored in
    records write it, is accepted too."""
    group.add_argument(*flags, nargs="?", const=True, type=_parse_bool, metavar="BOOL", help=help, **settings)


@contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """Show each warning about the data (:class:`~groupmixnorm.data.csv.DataWarning`) as one line,
    ``groupmixnorm COMMAND: warning: ...`` on stderr; other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *rest: Any, **keywords: Any) -> None:
            from groupmixnorm.data.csv import DataWarning

            if issubclass(category, DataWarning):
                print(f"groupmixnorm {command}: warning: {_one_line(Exception(message))}", file=sys.stderr)
            else:
                shown(message, category, *rest, **keywords)

        warnings.showwarning = show
        yield



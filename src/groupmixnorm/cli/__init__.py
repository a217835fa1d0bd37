"""The ``groupmixnorm`` command line.

Every error a user can cause ends with one clear line on stderr and exit code 2; ``--debug`` shows the
traceback instead. One module per group of subcommands: :mod:`~groupmixnorm.cli.train`,
:mod:`~groupmixnorm.cli.bench` and :mod:`~groupmixnorm.cli.checkpoints` (predict, analyze, debias, export,
report); :mod:`~groupmixnorm.cli.common` holds what they share. Building the parser imports no heavy
library: a subcommand's options that need one are added when that subcommand is parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from groupmixnorm.cli.bench import _add_bench
from groupmixnorm.cli.checkpoints import _add_analyze, _add_debias, _add_export, _add_predict, _add_report
from groupmixnorm.cli.common import UsageError, _one_line, _Parser, _set_threads, _Subcommands, _warnings_as_lines
from groupmixnorm.cli.train import STATE_FILE, _add_train, format_summary, spec_from_args

__all__ = ["STATE_FILE", "UsageError", "build_parser", "format_summary", "main", "spec_from_args"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        print("groupmixnorm: error: a command is required (see the list above)", file=sys.stderr)
        return 2
    try:
        _set_threads(args)
        with _warnings_as_lines(args.command):
            return args.handler(args)
    except (UsageError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a bug of ours: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, not a traceback
        if args.debug:
            raise
        print(f"groupmixnorm {args.command}: interrupted", file=sys.stderr)
        return 130



def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = _Parser(
        prog="groupmixnorm",
        description="Train and measure fair models with the GroupMixNorm layer.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", action=_Subcommands)
    _add_train(commands)
    _add_bench(commands)
    _add_predict(commands)
    _add_debias(commands)
    _add_analyze(commands)
    _add_export(commands)
    _add_report(commands)
    return parser



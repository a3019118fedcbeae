"""The ``topro`` command: one module per subcommand, each imported here by name.

Every subcommand reads its settings into a typed dataclass through ``topro.config.load_config``
(``--config FILE`` plus ``key=value`` overrides; its flags are shorthands for the same fields, built
from the dataclass by ``topro.cli.flags.add_config_flags``: name, type, choices, default and the field's
docstring as help).
A subcommand module imports what only its command needs (torch, Ray, MLflow, plotting) inside
its functions, so ``topro --help`` is quick and one command's missing optional package is named
when that command runs, not when another does.
"""
from __future__ import annotations

import argparse
import logging
import sys

from topro.cli import compare, eval_llm, evaluate, report, export, serve, sweep, train, verify
from topro.config import ConfigError

SUBCOMMANDS = (train, evaluate, sweep, report, compare, eval_llm, serve, verify, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="topro", description="Prompt-based cross-lingual sequence labeling: "
                                                               "train, evaluate, sweep, report, compare, "
                                                               "eval-llm, serve, verify, export.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from topro.atomic import RunLocked, StateWriteError
    from topro.interrupts import Interrupted

    try:
        return args.func(args)
    except Interrupted as stop:  # SIGTERM / SIGINT: what was kept and how to resume, in one line
        print(f"topro {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except StateWriteError as err:  # disk full, no permission: nothing good was overwritten
        print(f"topro {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError, RunLocked) as err:
        print(f"topro {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] == "topro":
            raise  # our own module is broken or missing: fail loudly
        print(f"topro {args.command}: error: this command needs the Python package {err.name!r}, which is not "
              f"installed ({err})", file=sys.stderr)
        return 2


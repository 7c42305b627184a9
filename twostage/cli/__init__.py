"""The ``twostage`` command line: serve, search, models, index, demo."""

import argparse
import os
import sys

from twostage import __version__
from twostage.cli import bench, config, demo, docs, evaluate, health, index, loadtest, models, search, security, serve
from twostage.errors import TwostageError
from twostage.logs import configure as configure_logging
from twostage.stack import Interrupted

COMMANDS = (serve, search, docs, health, models, index, demo, evaluate, loadtest, config, bench, security)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twostage", description="Two-stage retrieval serving: recall, rerank, gateway.")
    parser.add_argument("--version", action="version", version=f"twostage {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("TWOSTAGE_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.run(args) or 0
    except BrokenPipeError:
        # The reader went away (`twostage ... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (TwostageError, ValueError, OSError) as error:
        print(f"twostage: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Interrupted as stopped:  # its local stack is stopped already
        return 128 + stopped.signum

"""The command line: `bench` (thin: each command parses, validates and calls one function)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """The `bench` command: the signal guard first, then the commands (typer, pydantic and the
    rest are imported under it, so Ctrl-C or SIGTERM at any moment ends in one line with exit
    code 130 or 143, never in a traceback)."""
    from bench.engine.signals import GUARD, exit_code, signal_name

    GUARD.install()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from bench.cli.main import main as run

        run(args)
    except KeyboardInterrupt as exc:  # one that came before or after the command's own handler
        if "--debug" in args or os.environ.get("BENCH_DEBUG") == "1":
            raise
        print(f"bench: interrupted ({signal_name(exc)})", file=sys.stderr)
        sys.exit(exit_code(exc))


__all__ = ["main"]

"""The command line: `bench` (thin: each command parses, validates and calls one function)."""

from bench.cli.main import main

__all__ = ["main"]

"""python -m bench == the bench command (torchrun uses this)."""

from bench.cli import main

main()

"""python -m bench == the bench command (torchrun uses this)."""

from bench.cli.main import main

main()

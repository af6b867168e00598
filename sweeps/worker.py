"""One sweep worker process: `python -m sweeps.worker` reads its WorkerPlan as JSON on stdin."""

from __future__ import annotations

import json
import sys

from sweeps.driver import WorkerPlan, run_worker


def main() -> None:
    """Run the worker loop; one-line errors on stderr, exit 1 (130 / 143 when interrupted by
    SIGINT / SIGTERM)."""
    from bench.core.errors import BenchError
    from bench.core.memory import configure_malloc
    from bench.engine.signals import GUARD

    configure_malloc()  # as the bench command does, before torch starts its threads
    GUARD.install()  # SIGTERM from the sweep (or a scheduler) fails the trial, KILLs its run
    plan = WorkerPlan(**json.loads(sys.stdin.read()))

    def report(message: str) -> None:
        print(f"[worker {plan.worker}] {message}", file=sys.stderr, flush=True)

    try:
        run_worker(plan, report)
    except KeyboardInterrupt as exc:
        from bench.engine.signals import exit_code

        sys.exit(exit_code(exc))
    except BenchError as exc:
        report(f"error: {exc}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

"""One sweep worker process: `python -m sweeps.worker` reads its WorkerPlan as JSON on stdin."""

from __future__ import annotations

import json
import sys

from sweeps.driver import WorkerPlan, run_worker


def main() -> None:
    """Run the worker loop; one-line errors on stderr, exit 1 (130 when interrupted)."""
    from bench.core.errors import BenchError

    plan = WorkerPlan(**json.loads(sys.stdin.read()))

    def report(message: str) -> None:
        print(f"[worker {plan.worker}] {message}", file=sys.stderr, flush=True)

    try:
        run_worker(plan, report)
    except KeyboardInterrupt:
        sys.exit(130)
    except BenchError as exc:
        report(f"error: {exc}")
        sys.exit(130 if type(exc).__name__ == "RunInterrupted" else exc.exit_code)


if __name__ == "__main__":
    main()

"""Run, resume, dry-run or report a sweep: a base recipe + axes + seeds, one training run per point.

    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --dry_run   # every point and its command
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml             # run (or resume) what is not finished
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --report    # re-render tables and figures

See `hbt_accel/sweeps/run.py` for the recipe format and `docs/scaling.md` for the sweeps run so far.
Exit code: 0, 1 when a point failed (the others still ran), 2 for a bad sweep recipe.
"""

from __future__ import annotations

import argparse
import sys

from hbt_accel.errors import ConfigError, DataError
from hbt_accel.sweeps.report import write_report
from hbt_accel.sweeps.run import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run, resume or report a sweep of training runs.")
    parser.add_argument("--config", required=True, help="a sweep recipe, e.g. recipes/sweeps/data_ratio.yaml")
    parser.add_argument("--dry_run", action="store_true", help="list every point and its command, run nothing")
    parser.add_argument("--report", action="store_true", help="only re-render the report from the summaries")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    spec = load_sweep(args.config)
    failed = {}
    if not args.report:
        status = run_sweep(spec, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        failed = status.failed
        if failed:
            print(f"sweep {spec.name}: {len(failed)} point(s) failed: {', '.join(failed)}")
    print("wrote " + ", ".join(str(path) for path in write_report(spec)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

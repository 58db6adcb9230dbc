"""Arguments and entry points of ``lancet experiment run`` and ``lancet experiment report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_parser(sub) -> None:
    """Add ``experiment`` with its ``run`` and ``report`` subcommands to the lancet command line."""
    from lancet.app.experiment.budget import DEFAULT_ESTIMATE_S
    from lancet.app.experiment.outputs import TRACE_POLICIES

    experiment = sub.add_parser("experiment", help="run an experiment file (profile, optimize, bench per line); report")
    esub = experiment.add_subparsers(dest="experiment_command", required=True)

    run = esub.add_parser("run", help="run every line of an experiment file; resumes where an earlier run stopped",
                          description="Exit codes: 0 all lines done, 1 a step failed, 2 a bad experiment file, "
                                      "75 the budget ran out (run the same command again to go on).")
    run.add_argument("file", type=Path, help="experiment file: one JSON object per line")
    run.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<file name>)")
    run.add_argument("--budget-s", type=float, default=None, help="stop before a step that cannot finish in this time")
    run.add_argument("--step-timeout-s", type=float, default=None, help="a step running longer has failed")
    run.add_argument("--estimate", action="append", default=[], metavar="KIND=S",
                     help="seconds a step of KIND takes when no earlier run tells "
                          f"(defaults: {', '.join(f'{k}={v:g}' for k, v in DEFAULT_ESTIMATE_S.items())})")
    run.add_argument("--only", default=None, help="comma list of line ids to run")
    run.add_argument("--traces", default="all", choices=TRACE_POLICIES,
                     help="profiler traces to keep (gzipped): every rank's, rank 0's, or none")
    run.add_argument("--archive", type=Path, default=None, help="pack the output folder into this .tar.gz at the end")
    run.add_argument("--resume-from", type=Path, default=None, help="unpack an archive of an earlier run first")
    run.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing")
    run.set_defaults(func=cmd_run)

    report = esub.add_parser("report", help="markdown tables and charts from an experiment's output folder")
    report.add_argument("out", type=Path, help="output folder of `lancet experiment run` (or its .tar.gz archive)")
    report.add_argument("--to", type=Path, default=None, help="report folder (default: OUT/report)")
    report.add_argument("--baseline", default="captured", help="variant the exposed all-to-all change is measured from")
    report.set_defaults(func=cmd_report)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lancet.app.experiment.driver import RunOptions, run_experiments
    from lancet.app.experiment.spec import ExperimentError

    try:
        opts = RunOptions(
            file=args.file, out=args.out or Path("runs") / args.file.stem, budget_s=args.budget_s,
            step_timeout_s=args.step_timeout_s, estimates=_estimates(args.estimate),
            only=[i.strip() for i in args.only.split(",")] if args.only else None, traces=args.traces,
            archive=args.archive, resume_from=args.resume_from, dry_run=args.dry_run, argv=["lancet", *sys.argv[1:]],
        )
        return run_experiments(opts, Console(soft_wrap=True))
    except ExperimentError as err:
        print(f"lancet experiment run: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _estimates(items: list[str]) -> dict[str, float]:
    from lancet.app.experiment.budget import DEFAULT_ESTIMATE_S
    from lancet.app.experiment.spec import ExperimentError

    estimates = {}
    for item in items:
        kind, _, seconds = item.partition("=")
        try:
            estimates[kind] = float(seconds)
        except ValueError:
            kind = ""
        if kind not in DEFAULT_ESTIMATE_S:
            raise ExperimentError("--estimate", None, None, f"{item!r}: expected KIND=SECONDS with KIND one of "
                                                            f"{', '.join(DEFAULT_ESTIMATE_S)}")
    return estimates


def cmd_report(args: argparse.Namespace) -> int:
    from lancet.app.experiment.report import ReportError, write_report

    try:
        path = write_report(args.out, args.to, baseline=args.baseline)
    except ReportError as err:
        print(f"lancet experiment report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report -> {path}")
    return 0

"""``lancet experiment run``: every line of an experiment file through its steps, resumably.

Contract:
- Every line is checked (fields, then each step's command line through lancet's own parser)
  before anything runs; a bad line raises ExperimentError naming the line and the field.
- Steps run in file order, each as a child ``lancet`` process with its output in the step's
  ``log.txt``. A step already done (``store.done_marker``) is skipped; a shared step runs once.
- Before a step starts, its estimated time must fit in the budget; otherwise the run stops with
  EXIT_BUDGET, as it does when a step is cut off at the budget's end (that step is redone by
  the next run). A failed step stops the run with EXIT_FAILED, naming the line and the error.
- ``status.json`` says how the run ended; with ``archive``, the whole output folder is packed
  into one file at the end, whatever the ending (for machines that return single files).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lancet.app.experiment import store
from lancet.plan.artifact import MANIFEST_ENV
from lancet.app.experiment.budget import Budget, Record
from lancet.app.experiment.manifest import build_manifest, new_run_id
from lancet.app.experiment.outputs import keep_traces, pack, restore
from lancet.app.experiment.preflight import check_step
from lancet.app.experiment.process import run_lancet
from lancet.app.experiment.spec import ExperimentError, load_experiments
from lancet.app.experiment.steps import LineSteps, Step, StepArgError, build_steps

EXIT_OK, EXIT_FAILED, EXIT_BUDGET = 0, 1, 75
"""75 (EX_TEMPFAIL): the budget ran out; running the same command again goes on where this run stopped."""


class Interrupted(Exception):
    """The driver received SIGTERM."""


@dataclass(kw_only=True, slots=True)
class RunOptions:
    file: Path
    out: Path
    budget_s: float | None = None
    step_timeout_s: float | None = None
    estimates: dict[str, float] = field(default_factory=dict)
    """Per-kind estimates (seconds) for steps with no earlier run to learn from."""
    only: list[str] | None = None
    traces: str = "all"
    """Profiler traces kept: every rank's (gzipped), rank 0's, or none (bench.json holds their metrics)."""
    archive: Path | None = None
    resume_from: Path | None = None
    dry_run: bool = False
    argv: list[str] = field(default_factory=list)


class Stop(Exception):
    """Ends the run early: the exit code, the state for status.json and the message."""

    def __init__(self, code: int, state: str, message: str):
        super().__init__(message)
        self.code, self.state = code, state


def prepare(opts: RunOptions) -> list[LineSteps]:
    """Load, build and check every line; raise ExperimentError on the first bad one."""
    source = str(opts.file)
    lines = load_experiments(opts.file)
    if opts.only:
        unknown = sorted(set(opts.only) - {line.id for line in lines})
        if unknown:
            raise ExperimentError(source, None, None, f"--only names no line with id {', '.join(unknown)}; ids: "
                                                      f"{', '.join(line.id for line in lines)}")
        lines = [line for line in lines if line.id in opts.only]
    plan = build_steps(lines, source)
    checked: set[str] = set()
    for line_steps in plan:
        for step in line_steps.chain():
            if step.folder in checked:
                continue
            try:
                check_step(step)
            except StepArgError as err:
                raise ExperimentError(source, step.lines[0], err.field, str(err)) from None
            checked.add(step.folder)
    return plan


def run_experiments(opts: RunOptions, console: Console) -> int:
    """Run (or, with ``dry_run``, list) every step; return the exit code."""
    plan = prepare(opts)
    out = opts.out.resolve()
    if opts.archive and opts.archive.resolve().is_relative_to(out):
        raise ExperimentError(str(opts.archive), None, None, "--archive must lie outside the output folder")
    if opts.resume_from:
        restore(opts.resume_from, out)
    if opts.dry_run:
        describe(plan, out, console)
        return EXIT_OK
    out.mkdir(parents=True, exist_ok=True)
    driver = Driver(opts, out, console, plan)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return driver.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if opts.archive:
            pack(out, opts.archive, console)


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


class Driver:
    """One run over the steps of the plan, with its manifest, budget and progress display."""

    def __init__(self, opts: RunOptions, out: Path, console: Console, plan: list[LineSteps]):
        self.opts, self.out, self.console, self.plan = opts, out, console, plan
        self.run_id = new_run_id()
        self.manifest = f"manifests/{self.run_id}.json"
        self.env = {**_multicast_off_env(), **os.environ}
        self.budget = Budget(opts.budget_s, opts.step_timeout_s, history=store.history(out))
        self.budget.defaults.update(opts.estimates)
        self.ran: list[str] = []

    def run(self) -> int:
        store.write_json(self.out / self.manifest, build_manifest(
            self.run_id, self.opts.file, self.opts.argv, self.env, self.opts.budget_s))
        steps = _unique_steps(self.plan)
        todo = [s for s in steps if store.done_marker(self.out, s) is None]
        self.console.print(f"{len(self.plan)} line(s), {len(steps)} step(s), {len(todo)} to run "
                           f"-> {self.out} (manifest {self.manifest})")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, disable=not self.console.is_terminal)
        try:
            with progress:
                task = progress.add_task("steps", total=len(todo))
                for step in steps:
                    if store.done_marker(self.out, step) is None:
                        progress.update(task, description=f"{step.kind} {step.folder}")
                        self._run_step(step)
                        progress.advance(task)
        except Stop as stop:
            return self._finish(stop.code, stop.state, str(stop))
        except (Interrupted, KeyboardInterrupt) as err:
            return self._finish(130 if isinstance(err, KeyboardInterrupt) else 143, "interrupted",
                                f"interrupted ({err or 'Ctrl-C'}); the step under way is redone by the next run")
        return self._finish(EXIT_OK, "complete", f"all {len(self.plan)} line(s) done")

    def _run_step(self, step: Step) -> None:
        who = self._who(step)
        estimate, source = self.budget.estimate(step.kind, step.model, step.variants)
        if not self.budget.fits(estimate):
            raise Stop(EXIT_BUDGET, "budget",
                       f"budget: {self.budget.left():.0f} s left ({self.budget.reserve_s:.0f} s of it kept for the end), "
                       f"{step.kind} of {who} needs about {estimate:.0f} s "
                       f"({source}); stopping here. Run the same command again to go on.")
        folder = store.clear(self.out, step)
        (folder / store.LOG).write_text(f"# run {self.run_id}, manifest {self.manifest}\n")
        if step.kind == "bench":
            self._write_line(step, folder)
        argv = step.argv(self.out)
        self.console.print(f"[bold]{step.kind}[/] {escape(who)}: {escape(step.display())}", highlight=False)
        done = run_lancet(argv, log=folder / store.LOG, env={**self.env, **step.env, MANIFEST_ENV: self.manifest},
                          timeout_s=self.budget.timeout())
        if done.timed_out:
            self._timed_out(step, who, done.seconds)
        if done.returncode != 0:
            error = _error_of(folder / store.LOG)
            store.mark_failed(self.out, step, returncode=done.returncode, error=error, manifest=self.manifest)
            self._show_tail(folder / store.LOG)
            raise Stop(EXIT_FAILED, "failed",
                       f"{who}: `lancet {step.kind}` failed (exit code {done.returncode}) after {done.seconds:.0f} s: "
                       f"{error}\n  log: {folder / store.LOG}")
        keep_traces(folder, self.opts.traces)
        store.stamp_outputs(self.out, step, self.manifest)
        store.mark_done(self.out, step, argv=argv, seconds=done.seconds, manifest=self.manifest)
        self.budget.record(Record(step.kind, step.model, done.seconds, step.variants))
        self.ran.append(step.folder)
        self.console.print(f"  done in {done.seconds:.0f} s -> {step.output}", highlight=False)

    def _timed_out(self, step: Step, who: str, seconds: float) -> None:
        left = self.budget.left()
        log = self.out / step.folder / store.LOG
        if left is None or left > self.budget.reserve_s + 1:
            store.mark_failed(self.out, step, returncode=None, error=f"no end after {seconds:.0f} s",
                              manifest=self.manifest)
            raise Stop(EXIT_FAILED, "failed", f"{who}: `lancet {step.kind}` did not finish within the step timeout "
                                              f"({seconds:.0f} s)\n  log: {log}")
        cutoffs = store.record_cutoff(self.out, step, seconds=seconds, manifest=self.manifest)
        if len(cutoffs) > 1:  # it had more time the second time (the estimate saw the first): it does not fit
            raise Stop(EXIT_FAILED, "failed",
                       f"{who}: `lancet {step.kind}` was cut off at the budget's end {len(cutoffs)} times (after "
                       f"{', '.join(f'{c:.0f}' for c in cutoffs)} s): it needs more than a run of --budget-s gives; "
                       f"give a larger budget or split the line (fewer variants or steps)\n  log: {log}")
        raise Stop(EXIT_BUDGET, "budget", f"budget: {step.kind} of {who} was cut off after {seconds:.0f} s at the "
                                          "budget's end; the next run redoes it. Run the same command again.")

    def _who(self, step: Step) -> str:
        names = [f"line {ls.line.number} ({ls.line.id})" for ls in self.plan if ls.line.number in step.lines]
        return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")

    def _write_line(self, step: Step, folder: Path) -> None:
        from lancet.runtime.dist import NETWORK_ENV

        line_steps = next(ls for ls in self.plan if ls.bench is step)
        line = line_steps.line
        store.write_json(folder / "line.json", {
            "line": line.to_json(), "regime": line.regime, "experiment_file": str(self.opts.file),
            "regime_env": NETWORK_ENV.get(line.network or "", {}) if not line.emulate else {},
            "steps": {s.kind: {"folder": s.folder, "command": s.display()} for s in line_steps.chain()},
            "manifest": self.manifest,
        })

    def _show_tail(self, log: Path, lines: int = 12) -> None:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        self.console.print("\n".join("  | " + t for t in tail), style="dim", highlight=False, markup=False)

    def _finish(self, code: int, state: str, message: str) -> int:
        lines = [{"number": ls.line.number, "id": ls.line.id,
                  "state": "done" if store.done_marker(self.out, ls.bench) else "pending"} for ls in self.plan]
        store.write_json(self.out / "status.json", {
            "run_id": self.run_id, "manifest": self.manifest, "state": state, "exit_code": code, "message": message,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps_run": self.ran, "lines": lines,
        })
        done = sum(1 for line in lines if line["state"] == "done")
        style = {"complete": "green", "budget": "yellow"}.get(state, "red")
        self.console.print(f"[{style}]{escape(message)}[/] ({done} of {len(lines)} line(s) done; ran {len(self.ran)} step(s))",
                           highlight=False)
        return code


def _multicast_off_env() -> dict[str, str]:
    """NVLink multicast off in every step (lancet never needs it); the caller's environment wins."""
    from lancet.runtime.dist import SAFE_NCCL_ENV

    return dict(SAFE_NCCL_ENV)


def _unique_steps(plan: list[LineSteps]) -> list[Step]:
    steps: list[Step] = []
    for line_steps in plan:
        steps += [s for s in line_steps.chain() if s not in steps]
    return steps


def _error_of(log: Path) -> str:
    """The line of a failed command's log that says what went wrong (its last 'error' line)."""
    text = [t.strip() for t in log.read_text(errors="replace").splitlines() if t.strip()]
    errors = [t for t in text if "error" in t.lower()]
    return (errors or text or ["(no output)"])[-1]


def describe(plan: list[LineSteps], out: Path, console: Console) -> None:
    """What a run would do: every step, whether it is done, and its command."""
    for step in _unique_steps(plan):
        state = "done" if store.done_marker(out, step) else "to run"
        console.print(f"{state:7s} {step.kind:12s} lines {','.join(map(str, step.lines))}: {step.display()}",
                      highlight=False, markup=False)

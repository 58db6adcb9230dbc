"""``lancet`` command line: train, inspect, bench, profile, profile-comm, optimize, experiment.

Commands that run ranks work under ``torchrun`` and with ``--nproc P`` (P local
ranks launched here). Input is checked before any rank starts.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from lancet.app.config import DTYPES, OPTIMIZERS, ModelSpec, RunConfig
from lancet.app.experiment.commands import add_parser as add_experiment_parser
from lancet.app.guard import NONFINITE_POLICIES
from lancet.runtime.dist import DEFAULT_COLLECTIVE_TIMEOUT_S, NETWORK_ENV, Interrupted, RankFailed, launch, planned_world_size, under_torchrun
from lancet.moe import DISPATCH_KINDS, GATE_KINDS
from lancet.moe.priority_positions import priority_positions_from_environment
from lancet.runtime.hardware_queues import default_hardware_queues

INTERRUPTED_STATUS = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells use."""


class UsageError(Exception):
    """Bad command-line input, reported without a traceback."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="cpu_small",
                       help="gpt2_moe_nl<L>_m<M>_nh<H>_sl<S>_b<B>, a named config, or package.module:factory (a "
                            "function (group, device) -> lancet.ModelBundle: your own model, batches and loss)")
    group.add_argument("--gate", default="switch", choices=GATE_KINDS, help="routing of tokens to experts")
    group.add_argument("--topk", type=int, default=2, help="experts per token for --gate topk")
    group.add_argument("--capacity-factor", type=float, default=1.0, help="expert capacity per token share (switch, batch_prioritized)")
    group.add_argument("--dispatch", default=None, choices=DISPATCH_KINDS,
                       help="padded: fixed [E, C, M] buffers, no host sync (default for switch, batch_prioritized); "
                            "ragged: only kept rows, split sizes read by the host (default and only choice for topk)")
    group.add_argument("--aux-loss-coef", type=float, default=0.0, help="load-balancing loss weight (0: off)")
    group.add_argument("--num-experts", type=int, default=None, help="total experts (default: 2 per rank)")
    group.add_argument("--vocab-size", type=int, default=None, help="override the 50257-token vocabulary")
    add_hf_args(parser)


def add_hf_args(parser: argparse.ArgumentParser) -> None:
    """A transformers MoE model instead of --model (``lancet.integrations.hf``)."""
    from lancet.integrations.hf_models import known_hf_names

    group = parser.add_argument_group("HuggingFace model")
    group.add_argument("--hf-config", default=None, metavar="NAME_OR_PATH",
                       help=f"a transformers MoE causal LM, made expert-parallel: {', '.join(known_hf_names())}, or a "
                            "local directory (config.json; its weights too when saved with save_pretrained). Routing "
                            "is the model class's; --gate, --topk and --capacity-factor do not apply")
    group.add_argument("--hf-capacity-factor", type=float, default=None,
                       help="HF models: cap each expert at int(CF * ceil(tokens * k / experts)) (default: dropless)")
    group.add_argument("--batch-size", type=int, default=None, help="HF models: sequences per rank")
    group.add_argument("--seq-len", type=int, default=None, help="HF models: tokens per sequence")


def hf_spec(args: argparse.Namespace) -> dict:
    return dict(hf_config=args.hf_config, hf_capacity_factor=args.hf_capacity_factor, batch_size=args.batch_size,
                seq_len=args.seq_len)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=20, help="training steps (bench: timed steps per variant and round)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer applied after every step")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adamw), 0.1 (sgd)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="bf16: autocast with fp32 master weights")
    parser.add_argument("--data", default="synthetic", help="synthetic, stdlib (Python's own sources), or a path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and of the batches")
    parser.add_argument("--network", default=None, choices=list(NETWORK_ENV), help="emulated interconnect (NCCL env)")
    parser.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: all GPUs, or 2 CPU ranks)")
    parser.add_argument("--gc-every", type=int, default=10,
                        help="Python garbage collection every N steps, between timed steps (automatic collection is off)")
    parser.add_argument("--collective-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S, metavar="SECONDS",
                        help="a rank waiting longer than this in one collective gives up (the job then ends)")
    parser.add_argument("--emulate", default=None, metavar="W:REGIME",
                        help="run rank 0 of a W-rank job on this one device, every collective a stand-in timed by "
                             "REGIME (nvlink, ib400, ib100, eth, or a `lancet profile-comm` JSON)")
    parser.add_argument("--emulate-sms", type=int, default=None,
                        help="SMs a GPU stand-in collective keeps busy for its whole transfer (default: the regime's "
                             "NCCL channels where known, 1 for ib100 and 2 for ib400; else 4)")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        model=args.model,
        gate=args.gate,
        topk=args.topk,
        capacity_factor=args.capacity_factor,
        aux_loss_coef=args.aux_loss_coef,
        num_experts=args.num_experts,
        vocab_size=args.vocab_size,
        dispatch=args.dispatch,
        **hf_spec(args),
    )


def run_config(args: argparse.Namespace, **extra) -> RunConfig:
    fields = dict(
        spec=model_spec(args),
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        dtype=args.dtype,
        data=args.data,
        seed=args.seed,
        network=args.network,
        nproc=args.nproc if args.emulate is None or args.nproc is not None else 1,
        gc_every=args.gc_every,
        collective_timeout=args.collective_timeout,
        emulate=args.emulate,
        emulate_sms=args.emulate_sms,
    )
    fields.update(extra)
    return RunConfig(**fields)


def run_world_size(run: RunConfig) -> int:
    """Ranks of the job the command runs: the emulated job's W, else what the launcher will start."""
    emulation = run.emulation()
    return emulation.world_size if emulation is not None else planned_world_size(run.nproc)


def checked(run: RunConfig, *files: tuple[str | None, str], folders: tuple[tuple[str | None, str], ...] = (),
            devices: bool = True) -> RunConfig:
    """Validate the run against the world size the command will have (``lancet.app.preflight``) and the output
    ``files`` / ``folders`` (path, flag) it will write; raise UsageError on bad input."""
    from lancet.app.preflight import check_run

    try:
        emulation = run.emulation()
        if emulation is not None and under_torchrun():
            raise ValueError("--emulate runs one process by itself; start it without torchrun")
        check_run(run, run_world_size(run), devices=devices)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    checked_outputs(*files, folders=folders)
    return run


def checked_outputs(*files: tuple[str | None, str], folders: tuple[tuple[str | None, str], ...] = ()) -> None:
    """Raise UsageError unless every output file and folder (path, flag) can be written."""
    from lancet.app.preflight import check_output_dir, check_output_file

    try:
        for path, flag in files:
            check_output_file(path, flag)
        for path, flag in folders:
            check_output_dir(path, flag)
    except ValueError as err:
        raise UsageError(str(err)) from None


def starting(command: str, run: RunConfig) -> None:
    """Say what happens before the ranks print anything (importing torch and starting them takes a while)."""
    from lancet.runtime.dist import under_torchrun

    if under_torchrun():
        return
    import torch

    world = planned_world_size(run.nproc)
    where = "GPUs with NCCL" if torch.cuda.is_available() else "CPU ranks with gloo"
    print(f"lancet {command}: starting {world} {where}...", file=sys.stderr, flush=True)


def add_executor_arg(parser: argparse.ArgumentParser, what: str) -> None:
    from lancet.runtime.executor import EXECUTORS

    parser.add_argument(
        "--executor", default=None, choices=EXECUTORS,
        help=f"executor of {what}: interpret (generated code, op by op), compiled (Inductor over the compute regions "
             "between communication points), cudagraph (the compiled step replayed as CUDA graphs); default: "
             "cudagraph on CUDA when nothing in the step waits for the host, else compiled",
    )


def executor_usable(executor: str | None) -> None:
    """Refuse an executor this machine cannot run (cudagraph without CUDA) before any rank starts."""
    import torch

    from lancet.runtime.executor import ExecutorError, check_executor_device

    try:
        check_executor_device(executor, "cuda" if torch.cuda.is_available() else "cpu")
    except ExecutorError as err:
        raise UsageError(str(err)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from lancet.app.train import train_worker

    mode = args.mode or ("captured" if args.executor else "eager")
    run = checked(
        run_config(args, mode=mode, plan=args.plan, plan_variant=args.plan_variant, metrics_jsonl=args.metrics_jsonl,
                   checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                   nonfinite=args.nonfinite, executor=args.executor)
    )
    starting("train", run)
    launch(train_worker, (run,), run.nproc)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lancet.app.inspect_job import inspect_worker

    run = checked(run_config(args, steps=1), (args.json, "--json"))
    launch(inspect_worker, (run, args.json), run.nproc)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from lancet.app.profile_job import profile_worker

    run = checked(run_config(args, steps=1), (args.out, "--out"))
    if args.passes < 1 or args.reps < 1:
        raise UsageError("--passes and --reps must be >= 1")
    if args.tutel < 1:
        raise UsageError("--tutel must be >= 1")
    executor_usable(args.executor)
    launch(profile_worker, (run, args.out, args.passes, args.reps, args.tutel, args.executor), run.nproc)
    return 0


def cmd_profile_comm(args: argparse.Namespace) -> int:
    from lancet.app.profile_job import DEFAULT_SIZES, profile_comm_worker

    run = checked(run_config(args, steps=1), (args.out, "--out"))
    sizes = DEFAULT_SIZES
    if args.max_bytes is not None:
        sizes = [s for s in DEFAULT_SIZES if s <= args.max_bytes]
        if not sizes:
            raise UsageError(f"--max-bytes {args.max_bytes} is below the smallest size ({DEFAULT_SIZES[0]})")
    launch(profile_comm_worker, (run, args.out, sizes, args.reps), run.nproc)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lancet.app.profile_job import step_for_profile
    from lancet.plan.optimize import PlanOptions, optimize, print_prediction

    checked_outputs((args.out, "--out"), folders=((args.trace_dir, "--trace-dir"),))
    if args.log_passes:
        _log_passes_to_stderr()
    try:
        if args.max_partitions < 2:
            raise UsageError("--max-partitions must be >= 2")
        options = PlanOptions(schedule_dw=not args.no_dw, partition=not args.no_partition,
                              max_partitions=args.max_partitions, memory_cap_bytes=args.memory_cap,
                              trace_dir=args.trace_dir)
        result = optimize(args.profile, args.comm, options, build_step=step_for_profile)
    except (ValueError, FileNotFoundError) as err:  # ArtifactError is a ValueError
        raise UsageError(str(err)) from None
    result.plan.write(args.out)
    print_prediction(result, Console())
    print(f"plan -> {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lancet.app.bench import BenchOptions, bench_worker

    run = checked(run_config(args), (args.json, "--json"), folders=((args.trace_dir, "--trace-dir"),))
    opts = BenchOptions(
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        steps=args.steps,
        warmup=args.warmup,
        profile_steps=args.profile_steps,
        plan=args.plan,
        json_path=args.json,
        trace_dir=args.trace_dir,
        rounds=args.rounds,
        executor=args.executor,
        measured=args.measured,
    )
    try:
        opts.validate()
        if opts.plan is not None:
            from lancet.app.preflight import launcher_device
            from lancet.plan.plan import load_plan

            load_plan(opts.plan, run.identity(run_world_size(run), launcher_device()))
        if opts.measured is not None:
            from lancet.app.emulation_report import load_measured

            load_measured(opts.measured, run)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    launch(bench_worker, (run, opts), run.nproc)
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    from lancet.measure.timeline import TraceError, render, render_phase

    checked_outputs((args.out, "--out"))
    if len(args.trace) > 1 and not args.phase:
        raise UsageError("several --trace draw one phase of each side by side: add --phase forward (or backward)")
    if args.label and len(args.label) != len(args.trace):
        raise UsageError(f"{len(args.label)} --label for {len(args.trace)} --trace: give one per trace, or none")
    try:
        if args.phase:
            render_phase(args.trace, args.out, args.phase, args.label)
        else:
            render(args.trace[0], args.out, args.step)
    except (FileNotFoundError, IndexError, TraceError) as err:
        raise UsageError(str(err)) from None
    print(f"timeline -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lancet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    train = sub.add_parser("train", help="train a model (eager or captured step)")
    add_run_args(train)
    train.add_argument("--mode", default=None, choices=("eager", "captured"),
                       help="eager: the step function op by op; captured: its traced graph (default: eager, or "
                            "captured with --executor)")
    add_executor_arg(train, "the captured graph")
    train.add_argument("--plan", default=None, help="plan from `lancet optimize` (captured mode)")
    train.add_argument("--plan-variant", default="lancet", choices=("lancet", "lancet-dw", "lancet-part"),
                       help="which schedule of the plan to run")
    train.add_argument("--metrics-jsonl", default=None, help="write per-step metrics here (rank 0)")
    train.add_argument("--checkpoint-dir", default=None, help="save checkpoints into this folder (off when not given)")
    train.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                       help="save after every N steps (also after the last step, and on Ctrl-C)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest complete checkpoint in --checkpoint-dir (step 0 if none)")
    train.add_argument("--nonfinite", default="stop", choices=NONFINITE_POLICIES,
                       help="on a non-finite loss or gradient: stop naming the step and tensor, or skip the update")
    train.set_defaults(func=cmd_train)

    inspect = sub.add_parser("inspect", help="summarise the captured step graph")
    add_run_args(inspect)
    inspect.add_argument("--json", default=None, help="also write the summary as JSON")
    inspect.set_defaults(func=cmd_inspect)

    profile = sub.add_parser("profile", help="measure the cost of every compute node of the captured step")
    add_run_args(profile)
    profile.add_argument("--out", required=True, help="profile JSON to write")
    profile.add_argument("--passes", type=int, default=3, help="graph executions (batches) to take the median over")
    profile.add_argument("--reps", type=int, default=5, help="timed repetitions of each node per pass")
    profile.add_argument("--tutel", type=int, default=1, metavar="N",
                         help="profile the tutel-dN step (MoE dispatch stages in N parts) instead of the captured one; "
                              "for checking the cost estimate of partitioned steps (optimize takes only N=1)")
    add_executor_arg(profile, "the profiled step")
    profile.set_defaults(func=cmd_profile)

    comm = sub.add_parser("profile-comm", help="measure all-to-all / all-reduce cost curves and contention")
    add_run_args(comm)
    comm.add_argument("--out", required=True, help="comm profile JSON to write")
    comm.add_argument("--reps", type=int, default=5, help="timed repetitions per size")
    comm.add_argument("--max-bytes", type=int, default=None, help="largest message size to sweep")
    comm.set_defaults(func=cmd_profile_comm)

    opt = sub.add_parser("optimize", help="choose a schedule from a profile and a comm profile")
    opt.add_argument("--profile", required=True, help="profile JSON from `lancet profile`")
    opt.add_argument("--comm", required=True, help="comm profile JSON from `lancet profile-comm`")
    opt.add_argument("--out", required=True, help="plan JSON to write")
    opt.add_argument("--no-dw", action="store_true", help="skip dW scheduling (all-reduce placement only)")
    opt.add_argument("--no-partition", action="store_true", help="skip the forward partition search")
    opt.add_argument("--max-partitions", type=int, default=8, help="largest number of parts to try")
    opt.add_argument("--memory-cap", type=int, default=None, help="max extra bytes held alive by dW deferral")
    opt.add_argument("--trace-dir", default=None, help="write predicted Chrome traces here")
    opt.add_argument("--log-passes", action="store_true", help="print what every pass run changed (nodes, order)")
    opt.set_defaults(func=cmd_optimize)

    bench = sub.add_parser("bench", help="run step variants side by side and compare step time and overlap")
    add_run_args(bench)
    bench.add_argument(
        "--variants",
        default="eager,captured",
        help="comma list of eager, eager-compiled (torch.compile of the step function), captured, lancet-dw, "
             "lancet-part, lancet, tutel-dN (MoE dispatch in N parts), part-dN (every MoE block's forward from its "
             "attention to its end in N parts); a captured variant may name its executor: captured:interpret, "
             "captured:compiled, captured:cudagraph (also tutel-dN:..., lancet:...), and end in +inline to run "
             "its collectives that nothing overlaps on the compute stream (captured:cudagraph+inline)",
    )
    add_executor_arg(bench, "captured variants that name no executor")
    bench.add_argument("--plan", default=None, help="plan for the lancet-* variants")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps per variant and round")
    bench.add_argument("--rounds", type=int, default=1,
                       help="go over the variant list this many times (A B C A B C), --steps timed steps each time")
    bench.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (0: no trace)")
    bench.add_argument("--json", default=None, help="write results as JSON")
    bench.add_argument("--trace-dir", default="lancet_traces", help="profiler traces, one folder per variant")
    bench.add_argument("--measured", default=None,
                       help="with --emulate: bench JSON of a real run of the same configuration, printed alongside")
    bench.set_defaults(func=cmd_bench)

    timeline = sub.add_parser("timeline", help="PNG of one step of a profiler trace or a predicted trace, "
                                                 "or of one phase of several traces")
    timeline.add_argument("--trace", required=True, action="append",
                          help="Chrome trace (.json or .json.gz); repeat it with --phase to set traces side by side")
    timeline.add_argument("--phase", choices=("forward", "backward"),
                          help="draw only this phase of the last profiled step of each trace, on one time axis")
    timeline.add_argument("--label", action="append",
                          help="row name of each --trace with --phase, in order (default: a bench trace's variant)")
    timeline.add_argument("--out", required=True, help="PNG to write")
    timeline.add_argument("--step", type=int, default=0, help="profiled step to draw (measured traces)")
    timeline.set_defaults(func=cmd_timeline)
    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input, a failed rank and Ctrl-C each end in one line on stderr, never a traceback.

    Exit status: 0 done, 1 a rank failed, 2 bad input, 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        default_hardware_queues()
        priority_positions_from_environment()
    except ValueError as err:
        return _error(args.command, str(err), 2)
    try:
        return args.func(args)
    except UsageError as err:
        return _error(args.command, str(err), 2)
    except RankFailed as err:
        status = _error(args.command, str(err), 1)
        if err.traceback_path:
            print(f"  (the rank's traceback: {err.traceback_path})", file=sys.stderr)
        return status
    except Interrupted as err:
        return _error(args.command, f"interrupted: {err}", INTERRUPTED_STATUS)
    except KeyboardInterrupt as err:  # under torchrun: this rank's own stop (StoppedOnRequest) or Ctrl-C
        return _error(args.command, f"interrupted: {err}" if str(err) else "interrupted", INTERRUPTED_STATUS)
    except BrokenPipeError:
        _silence_stdout()
        return _error(args.command, "standard output was closed", 1)


def _log_passes_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pass %(message)s"))
    logger = logging.getLogger("lancet.passes")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def _error(command: str, message: str, status: int) -> int:
    print(f"lancet {command}: error: {message}", file=sys.stderr)
    return status


def _silence_stdout() -> None:
    """After a closed pipe on stdout, point it at /dev/null so the exit's flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

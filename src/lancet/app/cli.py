"""``lancet`` command line: train, inspect, bench, profile, profile-comm, optimize, experiment.

Commands that run ranks work under ``torchrun`` and with ``--nproc P`` (P local
ranks launched here). Input is checked before any rank starts.
"""

from __future__ import annotations

import argparse
import sys

from lancet.app.config import DTYPES, OPTIMIZERS, ModelSpec, RunConfig
from lancet.app.experiment.commands import add_parser as add_experiment_parser
from lancet.runtime.dist import NETWORK_ENV, RankFailed, launch, planned_world_size
from lancet.moe import GATE_KINDS


class UsageError(Exception):
    """Bad command-line input, reported without a traceback."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="cpu_small", help="gpt2_moe_nl<L>_m<M>_nh<H>_sl<S>_b<B> or a named config")
    group.add_argument("--gate", default="switch", choices=GATE_KINDS)
    group.add_argument("--topk", type=int, default=2, help="experts per token for --gate topk")
    group.add_argument("--capacity-factor", type=float, default=1.0)
    group.add_argument("--aux-loss-coef", type=float, default=0.0, help="load-balancing loss weight (0: off)")
    group.add_argument("--num-experts", type=int, default=None, help="total experts (default: 2 per rank)")
    group.add_argument("--vocab-size", type=int, default=None, help="override the 50257-token vocabulary")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adamw), 0.1 (sgd)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="bf16: autocast with fp32 master weights")
    parser.add_argument("--data", default="synthetic", help="synthetic, stdlib (Python's own sources), or a path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network", default=None, choices=list(NETWORK_ENV), help="emulated interconnect (NCCL env)")
    parser.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: all GPUs, or 2 CPU ranks)")
    parser.add_argument("--gc-every", type=int, default=10,
                        help="Python garbage collection every N steps, between timed steps (automatic collection is off)")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        model=args.model,
        gate=args.gate,
        topk=args.topk,
        capacity_factor=args.capacity_factor,
        aux_loss_coef=args.aux_loss_coef,
        num_experts=args.num_experts,
        vocab_size=args.vocab_size,
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
        nproc=args.nproc,
        gc_every=args.gc_every,
    )
    fields.update(extra)
    return RunConfig(**fields)


def checked(run: RunConfig) -> RunConfig:
    """Validate against the world size the command will have; raise UsageError on bad input."""
    try:
        run.validate(planned_world_size(run.nproc))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    return run


def cmd_train(args: argparse.Namespace) -> int:
    from lancet.app.train import train_worker

    run = checked(
        run_config(args, mode=args.mode, plan=args.plan, plan_variant=args.plan_variant, metrics_jsonl=args.metrics_jsonl)
    )
    launch(train_worker, (run,), run.nproc)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lancet.app.inspect_job import inspect_worker

    run = checked(run_config(args, steps=1))
    launch(inspect_worker, (run, args.json), run.nproc)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from lancet.app.profile_job import profile_worker

    run = checked(run_config(args, steps=1))
    if args.passes < 1 or args.reps < 1:
        raise UsageError("--passes and --reps must be >= 1")
    if args.tutel < 1:
        raise UsageError("--tutel must be >= 1")
    launch(profile_worker, (run, args.out, args.passes, args.reps, args.tutel), run.nproc)
    return 0


def cmd_profile_comm(args: argparse.Namespace) -> int:
    from lancet.app.profile_job import DEFAULT_SIZES, profile_comm_worker

    run = checked(run_config(args, steps=1))
    sizes = DEFAULT_SIZES
    if args.max_bytes is not None:
        sizes = [s for s in DEFAULT_SIZES if s <= args.max_bytes]
        if not sizes:
            raise UsageError(f"--max-bytes {args.max_bytes} is below the smallest size ({DEFAULT_SIZES[0]})")
    launch(profile_comm_worker, (run, args.out, sizes, args.reps), run.nproc)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lancet.plan.artifact import ArtifactMismatch
    from lancet.app.profile_job import step_for_profile
    from lancet.plan.optimize import optimize, print_prediction

    try:
        if args.max_partitions < 2:
            raise UsageError("--max-partitions must be >= 2")
        result = optimize(
            args.profile,
            args.comm,
            schedule_dw=not args.no_dw,
            partition=not args.no_partition,
            max_partitions=args.max_partitions,
            memory_cap_bytes=args.memory_cap,
            trace_dir=args.trace_dir,
            build_step=step_for_profile,
        )
    except (ArtifactMismatch, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    result.plan.write(args.out)
    print_prediction(result, Console())
    print(f"plan -> {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lancet.app.bench import BenchOptions, bench_worker

    run = checked(run_config(args))
    opts = BenchOptions(
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        steps=args.steps,
        warmup=args.warmup,
        profile_steps=args.profile_steps,
        plan=args.plan,
        json_path=args.json,
        trace_dir=args.trace_dir,
        rounds=args.rounds,
    )
    try:
        opts.validate()
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    launch(bench_worker, (run, opts), run.nproc)
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    from lancet.measure.timeline import render

    try:
        render(args.trace, args.out, args.step)
    except (FileNotFoundError, IndexError) as err:
        raise UsageError(str(err)) from None
    print(f"timeline -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lancet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (eager or captured step)")
    add_run_args(train)
    train.add_argument("--mode", default="eager", choices=("eager", "captured"))
    train.add_argument("--plan", default=None, help="plan from `lancet optimize` (captured mode)")
    train.add_argument("--plan-variant", default="lancet", choices=("lancet", "lancet-dw", "lancet-part"))
    train.add_argument("--metrics-jsonl", default=None, help="write per-step metrics here (rank 0)")
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
    profile.set_defaults(func=cmd_profile)

    comm = sub.add_parser("profile-comm", help="measure all-to-all / all-reduce cost curves and contention")
    add_run_args(comm)
    comm.add_argument("--out", required=True, help="comm profile JSON to write")
    comm.add_argument("--reps", type=int, default=5)
    comm.add_argument("--max-bytes", type=int, default=None, help="largest message size to sweep")
    comm.set_defaults(func=cmd_profile_comm)

    opt = sub.add_parser("optimize", help="choose a schedule from a profile and a comm profile")
    opt.add_argument("--profile", required=True)
    opt.add_argument("--comm", required=True)
    opt.add_argument("--out", required=True, help="plan JSON to write")
    opt.add_argument("--no-dw", action="store_true", help="skip dW scheduling (all-reduce placement only)")
    opt.add_argument("--no-partition", action="store_true", help="skip the forward partition search")
    opt.add_argument("--max-partitions", type=int, default=8, help="largest number of parts to try")
    opt.add_argument("--memory-cap", type=int, default=None, help="max extra bytes held alive by dW deferral")
    opt.add_argument("--trace-dir", default=None, help="write predicted Chrome traces here")
    opt.set_defaults(func=cmd_optimize)

    bench = sub.add_parser("bench", help="run step variants side by side and compare step time and overlap")
    add_run_args(bench)
    bench.add_argument(
        "--variants",
        default="eager,captured",
        help="comma list of eager, captured, lancet-dw, lancet-part, lancet, tutel-dN (N parts)",
    )
    bench.add_argument("--plan", default=None, help="plan for the lancet-* variants")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps per variant and round")
    bench.add_argument("--rounds", type=int, default=1,
                       help="go over the variant list this many times (A B C A B C), --steps timed steps each time")
    bench.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (0: no trace)")
    bench.add_argument("--json", default=None, help="write results as JSON")
    bench.add_argument("--trace-dir", default="lancet_traces", help="profiler traces, one folder per variant")
    bench.set_defaults(func=cmd_bench)

    timeline = sub.add_parser("timeline", help="PNG of one step of a profiler trace or a predicted trace")
    timeline.add_argument("--trace", required=True, help="Chrome trace (.json or .json.gz)")
    timeline.add_argument("--out", required=True, help="PNG to write")
    timeline.add_argument("--step", type=int, default=0, help="profiled step to draw (measured traces)")
    timeline.set_defaults(func=cmd_timeline)
    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"lancet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RankFailed as err:
        print(f"lancet {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

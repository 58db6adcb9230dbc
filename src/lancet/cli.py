"""``lancet`` command line: train, inspect, bench, profile, profile-comm, optimize.

Commands that run ranks work under ``torchrun`` and with ``--nproc P`` (P local
ranks launched here). Input is checked before any rank starts.
"""

from __future__ import annotations

import argparse
import sys

from lancet.config import DTYPES, OPTIMIZERS, ModelSpec, RunConfig
from lancet.dist import NETWORK_ENV, launch, planned_world_size
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
    from lancet.train import train_worker

    run = checked(run_config(args, mode=args.mode, plan=args.plan, metrics_jsonl=args.metrics_jsonl))
    launch(train_worker, (run,), run.nproc)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lancet.inspect_worker import inspect_worker

    run = checked(run_config(args, steps=1))
    launch(inspect_worker, (run, args.json), run.nproc)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lancet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (eager or captured step)")
    add_run_args(train)
    train.add_argument("--mode", default="eager", choices=("eager", "captured"))
    train.add_argument("--plan", default=None, help="plan from `lancet optimize` (captured mode)")
    train.add_argument("--metrics-jsonl", default=None, help="write per-step metrics here (rank 0)")
    train.set_defaults(func=cmd_train)

    inspect = sub.add_parser("inspect", help="summarise the captured step graph")
    add_run_args(inspect)
    inspect.add_argument("--json", default=None, help="also write the summary as JSON")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"lancet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""A Mixtral-style MoE language model, trained expert-parallel with a lancet plan through the public API only.

    torchrun --nproc-per-node 2 examples/mixtral_style.py      (NCCL on GPUs, else gloo on the CPU)
    lancet train --model examples.mixtral_style:factory ...    (the same model from the command line)

The model is plain PyTorch: RMSNorm, causal attention, and in every block a MoE
layer of SwiGLU experts held as plain parameters, top-2 routing with the two
weights renormalised, and a shared SwiGLU expert every token passes through.
Tokens reach their experts' ranks through the layer's own functional
all-to-all over the expert-parallel group it is given.

Routing is dropless, as Mixtral's: every token reaches both its experts and the
all-to-all ships exactly the routed rows, its split sizes read to the host once
per layer. Dropless keeps the model's meaning whatever lancet rewrites: a
partitioned range routes each part's tokens as the whole batch would, with no
capacity to re-derive per part and no tokens dropped differently. The price is
that host read (no single CUDA graph of the step); capacity-padded static shapes
avoid it, but drop tokens, and other tokens once the batch is split in parts.

Each rank's local experts run on every row it receives and a mask keeps each
expert's own rows: simple and traceable; a grouped GEMM would skip masked rows.

Shape legend: B batch, S sequence, D model dim, H hidden dim, V vocabulary,
T = B*S tokens, K = 2 choices, A = T*K assignments, E experts, W ranks,
L = E/W local experts, R rows received.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

import lancet


@dataclass(frozen=True)
class Config:
    vocab: int = 96
    dim: int = 32
    heads: int = 2
    hidden: int = 48
    layers: int = 2
    experts_per_rank: int = 2
    batch: int = 4
    seq: int = 8


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def init(*shape: int, generator: torch.Generator | None = None) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator) * shape[-2] ** -0.5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        batch, seq, dim = x_BSD.shape
        split = lambda t: t.view(batch, seq, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(t) for t in self.qkv(x_BSD).split(dim, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, dim))


class MoE(nn.Module):
    """Top-2 routed SwiGLU experts (this rank holds ``experts_per_rank`` of them) plus a shared expert."""

    def __init__(self, cfg: Config, group: dist.ProcessGroup, seed: int) -> None:
        super().__init__()
        self.group, self.world = group, dist.get_world_size(group)
        self.local, self.experts = cfg.experts_per_rank, cfg.experts_per_rank * self.world
        self.router = nn.Linear(cfg.dim, self.experts, bias=False)
        mine = torch.Generator().manual_seed(seed + dist.get_rank(group))  # each rank its own experts
        self.w_gate = init(self.local, cfg.dim, cfg.hidden, generator=mine)
        self.w_up = init(self.local, cfg.dim, cfg.hidden, generator=mine)
        self.w_down = init(self.local, cfg.hidden, cfg.dim, generator=mine)
        self.shared = nn.ParameterList([init(cfg.dim, cfg.hidden), init(cfg.dim, cfg.hidden),
                                        init(cfg.hidden, cfg.dim)])

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        weight_TK, expert_TK = self.router(x_TD).softmax(dim=-1).topk(2, dim=-1)
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        with lancet.dispatch_region():  # row-local: a token's output depends on its own row and routing only
            routed_TD = self.routed(x_TD, expert_TK.reshape(-1), weight_TK.reshape(-1))
        return (routed_TD + swiglu(x_TD, *self.shared)).view_as(x_BSD)

    def routed(self, x_TD: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        order_A = expert_A.argsort(stable=True)  # rows by expert, hence by the rank that holds it
        token_A = order_A // 2
        counts_E = F.one_hot(expert_A, self.experts).sum(dim=0)
        received_WL = funcol.all_to_all_single(counts_E, None, None, self.group).view(self.world, self.local)
        splits = torch.cat([counts_E.view(self.world, self.local).sum(dim=1), received_WL.sum(dim=1)]).tolist()
        send, receive = splits[: self.world], splits[self.world :]
        for size in splits:
            torch._check(size >= 0)
        torch._check(sum(send) == token_A.shape[0])  # dropless: every assignment is sent
        rows_RD = funcol.all_to_all_single_autograd(x_TD[token_A], receive, send, self.group)
        # Received rows come grouped by (source rank, local expert).
        expert_R = torch.arange(self.local).repeat(self.world).repeat_interleave(
            received_WL.reshape(-1), output_size=rows_RD.shape[0])
        out_RD = sum(swiglu(rows_RD, self.w_gate[e], self.w_up[e], self.w_down[e]) * (expert_R == e)[:, None]
                     for e in range(self.local))
        back_AD = funcol.all_to_all_single_autograd(out_RD, send, receive, self.group)
        return torch.zeros_like(x_TD).index_add(0, token_A, back_AD * weight_A[order_A, None])


class Block(nn.Module):
    def __init__(self, cfg: Config, group: dist.ProcessGroup, seed: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), Attention(cfg)
        self.moe_norm, self.moe = RMSNorm(cfg.dim), MoE(cfg, group, seed)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class MixtralStyle(nn.Module):
    def __init__(self, cfg: Config, group: dist.ProcessGroup, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # dense weights equal on every rank
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, group, seed + 100 * (i + 1)) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, idx_BS: Tensor) -> Tensor:
        x = self.embed(idx_BS)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    return F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten())


def factory(group: dist.ProcessGroup, device: torch.device, cfg: Config = Config()) -> lancet.ModelBundle:
    """The model, a synthetic next-token batch per (step, rank) and the loss, as ``lancet --model`` takes them."""

    def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    return lancet.ModelBundle(model=MixtralStyle(cfg, group).to(device), batch=batch, loss_fn=loss_fn)


def main(steps: int = 5) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    group, rank = dist.group.WORLD, dist.get_rank()
    bundle = factory(group, device)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    step = lancet.Step(bundle.model, bundle.loss_fn, optimizer, group=group)  # expert params found in the graph
    batches = [bundle.batch(i, rank) for i in range(steps)]
    profile = lancet.profile(step, batches[:2], reps=2)
    comm = lancet.profile_comm(group, device, sizes=[2**k for k in range(12, 21, 2)], reps=2)
    plan = lancet.optimize(step, batches[0], profile, comm)
    if rank == 0:
        print(f"expert parameters: {len(step.expert_params)}; plan: "
              + ", ".join(f"{name}={v.chosen}" for name, v in plan.variants.items()))
    # The with-block destroys any CUDA graphs the runner replays before the process group goes.
    with lancet.Runner(step, plan, executor=None if cuda else "interpret") as runner:
        for i, batch in enumerate(batches):
            loss = runner.step(batch)
            if rank == 0:
                print(f"step {i}: loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A step program frees the forward's activations during the backward, as the graph it came from does.

One gloo rank on the CPU; the program's regions run traced (nothing is compiled).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.program import ListArgsCodeGen, build_program, forward_outputs_kept
from lancet.step.train_step import TrainStep


def _step_graph(group):
    cfg = model_config("gpt2_moe_nl2_m32_nh2_sl8_b2", vocab_size=97, gate=GateConfig(kind="switch"))
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg, group), group)
    tokens, targets = BatchSource(batch_size=2, seq_len=8, vocab_size=97, seed=1).batch(0, 0)
    return step, capture_step(step, tokens, targets), tokens, targets


def test_forward_outputs_die_at_their_last_use_in_the_backward(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        step, train_graph, tokens, targets = _step_graph(dist.group.WORLD)
        program = build_program(train_graph)
        forward, backward = program.phases
        refs: list[weakref.ref] = []
        alive: list[int] = []  # forward outputs still alive when each backward region is called
        run_forward = forward.impl

        def recording_forward(args):
            outputs = run_forward(args)
            refs.extend(weakref.ref(t) for t in outputs if isinstance(t, torch.Tensor))
            return outputs

        forward.impl = recording_forward
        for call in (c for c in program.calls.values() if c.region.phase == "backward"):
            def counting(*args, run=call.impl):
                alive.append(sum(ref() is not None for ref in refs))
                return run(*args)
            call.impl = counting

        params = step.parameters()
        with torch.no_grad():
            want = train_graph.gm(*params, tokens, targets)
            got = program(*params, tokens, targets)
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        kept = forward_outputs_kept(program.top, forward)
        assert kept is not None and len(kept) < len(refs)  # most forward outputs only feed the backward
        assert len(alive) >= 2 and alive[0] > alive[-1], alive
        assert alive == sorted(alive, reverse=True)  # once freed, never back
    finally:
        dist.destroy_process_group()


@dataclass
class _Output:
    logits_BSV: torch.Tensor
    keep: tuple = ()


class _ScaledModel(nn.Module):
    """Multiplies by a tensor made in forward: the trace lifts it as a constant that both phases read."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens_BS):
        return _Output(self.head(self.embed(tokens_BS) * torch.tensor(0.5)))

    @staticmethod
    def loss(out: _Output, targets_BS):
        return F.cross_entropy(out.logits_BSV.flatten(0, 1), targets_BS.flatten())


def test_a_constant_lifted_into_the_top_module_reaches_both_phases(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        step = TrainStep(_ScaledModel(), dist.group.WORLD)
        tokens, targets = BatchSource(batch_size=2, seq_len=4, vocab_size=11, seed=1).batch(0, 0)
        train_graph = capture_step(step, tokens, targets)
        program = build_program(train_graph)
        assert any(n.op == "get_attr" for n in program.top.graph.nodes)
        with torch.no_grad():
            want = train_graph.gm(*step.parameters(), tokens, targets)
            got = program(*step.parameters(), tokens, targets)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    finally:
        dist.destroy_process_group()


def test_a_phase_takes_its_arguments_in_a_list_and_empties_it():
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output(graph.call_function(torch.add, (a, b)))
    graph.set_codegen(ListArgsCodeGen())
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    args = [torch.ones(2), torch.full((2,), 2.0)]
    assert module(args).tolist() == [3.0, 3.0]
    assert args == []

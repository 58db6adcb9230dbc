"""Device check of the padded dispatch and the fused loss (one GPU, no process group).

1. One padded MoE layer, forward and backward, captured as a CUDA graph and replayed: the replay
   equals eager (nothing in the padded path reads back to the host).
2. Device time of one MoE layer's forward + backward, padded against ragged (the ragged one also
   waits for its split sizes on the host), under bf16 autocast.
3. Device time and peak memory of the LM loss: the fused chunked loss against ``F.cross_entropy`` of
   float32 logits.

Usage: python scripts/gpu/padded_check.py [--tokens 24576] [--d-model 768] [--experts 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lancet.losses import linear_cross_entropy
from lancet.moe import GateConfig, MoELayer


def _layer(dispatch: str, args, device) -> MoELayer:
    torch.manual_seed(0)
    gate = GateConfig(kind="switch", dispatch=dispatch)
    layer = MoELayer(args.d_model, 4 * args.d_model, args.experts, gate, None).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer


def _fwd_bwd(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x).out
    grads = torch.autograd.grad(out.float().square().mean(), [x, *layer.parameters()])
    return torch.cat([out.detach().float().reshape(-1), *(g.float().reshape(-1) for g in grads)])


def _device_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check_cuda_graph(args, device) -> None:
    layer = _layer("padded", args, device)
    x = torch.randn(1, args.tokens, args.d_model, device=device, requires_grad=True)
    want = _fwd_bwd(layer, x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _fwd_bwd(layer, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _fwd_bwd(layer, x)
    graph.replay()
    torch.cuda.synchronize()
    print(f"CUDA graph replay of the padded layer: max abs difference to eager {(got - want).abs().max().item():.3e}")


def compare_dispatch(args, device) -> None:
    x = torch.randn(1, args.tokens, args.d_model, device=device, requires_grad=True)
    for dispatch in ("padded", "ragged"):
        layer = _layer(dispatch, args, device)
        print(f"{dispatch}: MoE layer forward + backward {_device_ms(lambda: _fwd_bwd(layer, x)):.2f} ms")


def compare_loss(args, device) -> None:
    vocab, padded = 50257, 50304
    hidden = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(padded, args.d_model, device=device)).requires_grad_()
    targets = torch.randint(0, vocab, (args.tokens,), device=device)

    def plain():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = F.linear(hidden, weight)[:, :vocab]
        return torch.autograd.grad(F.cross_entropy(logits.float(), targets), [hidden, weight])

    def fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, vocab)
        return torch.autograd.grad(loss, [hidden, weight])

    for name, fn in (("plain fp32 cross entropy", plain), ("fused chunked", fused)):
        torch.cuda.reset_peak_memory_stats()
        ms = _device_ms(fn)
        print(f"{name}: {ms:.2f} ms, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(fused(), plain())]
    print(f"fused vs plain gradients, relative: {', '.join(f'{e:.1e}' for e in errors)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48 * 512)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    check_cuda_graph(args, device)
    compare_dispatch(args, device)
    compare_loss(args, device)


if __name__ == "__main__":
    main()

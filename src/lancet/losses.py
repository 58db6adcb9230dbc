"""Cross entropy of a linear head without the full logits: chunked, fused forward and backward.

Shape legend: N tokens, M hidden dim, V vocabulary, P rows of the head weight
(V rounded up for aligned GEMMs; the extra rows are masked, never sliced off).

``linear_cross_entropy(hidden_NM, weight_PM, targets_N, vocab_size)`` equals
``F.cross_entropy((hidden_NM @ weight_PM.T)[:, :V].float(), targets_N)`` (the
mean over tokens) but never holds the ``[N, V]`` logits, nor their gradient, in
float32. Per chunk of tokens it computes the logits in the compute dtype (the
autocast dtype, e.g. bf16, or the inputs' own), the log-softmax of that chunk
in float32, and right away the chunk's gradients with respect to the hidden
states and the weight. Each chunk is traced as its own unit
(``lancet.graph.meta.separate_region``), so the compiled executor compiles it
apart from the others and its logits die before the next chunk's are made.
Backward only scales those saved gradients by the incoming gradient: the same
three GEMMs as the plain loss, no recompute. It is
an ``autograd.Function`` of plain tensor ops, so ``make_fx`` traces it (the
gradient GEMMs appear in the forward graph) and the step that differentiates
it with ``torch.autograd.grad`` captures as one graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lancet.graph import meta

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
"""Chunks hold at most this many bytes of float32 logits by default."""


def default_chunk_tokens(num_tokens: int, padded_vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one float32 chunk of logits stays under ``chunk_bytes`` (chunks equal in size)."""
    chunks = max(1, math.ceil(num_tokens * padded_vocab * 4 / chunk_bytes))
    return math.ceil(num_tokens / chunks)


def _chunk_loss_and_grads(
    hidden_CM: Tensor, weight_PM: Tensor, targets_C: Tensor, real_P: Tensor, scale: float, want_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed loss of one chunk, and (scaled by ``scale``) its gradients w.r.t. hidden and weight.

    ``hidden_CM`` and ``weight_PM`` are in the compute dtype; the softmax runs in float32.
    """
    logits_CP = torch.mm(hidden_CM, weight_PM.t()).float()
    logits_CP = logits_CP.masked_fill(~real_P, float("-inf"))
    lse_C = torch.logsumexp(logits_CP, dim=1)
    target_logit_C = logits_CP.gather(1, targets_C[:, None])[:, 0]
    loss = (lse_C - target_logit_C).sum()
    if not want_grads:
        return loss, None, None
    # d loss / d logits = softmax - one_hot(target), times the mean's 1/N; zero in the masked columns.
    probs_CP = torch.exp(logits_CP - lse_C[:, None])
    minus_one_C1 = torch.full_like(target_logit_C[:, None], -1.0)
    grad_logits_CP = (probs_CP.scatter_add(1, targets_C[:, None], minus_one_C1) * scale).to(hidden_CM.dtype)
    grad_hidden_CM = torch.mm(grad_logits_CP, weight_PM)
    grad_weight_PM = torch.mm(grad_logits_CP.t(), hidden_CM)
    return loss, grad_hidden_CM, grad_weight_PM


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NM, weight_PM, targets_N, vocab_size, chunk_tokens, dtype):
        num_tokens = hidden_NM.shape[0]
        want_grads = any(ctx.needs_input_grad[:2])
        real_P = torch.arange(weight_PM.shape[0], device=weight_PM.device) < vocab_size
        weight_c = weight_PM.to(dtype)
        losses, grad_hidden, grad_weight = [], [], None
        with torch.autocast(hidden_NM.device.type, enabled=False):
            chunks = zip(hidden_NM.split(chunk_tokens), targets_N.split(chunk_tokens))
            for i, (hidden_CM, targets_C) in enumerate(chunks):
                # Each chunk its own compiled region: a compiler that fused across chunks (the final sum
                # of the losses into the first chunk's gradient kernel) kept every chunk's logits alive.
                with meta.separate_region(f"loss_chunk_{i}"):
                    loss, g_hidden, g_weight = _chunk_loss_and_grads(
                        hidden_CM.to(dtype), weight_c, targets_C, real_P, 1.0 / num_tokens, want_grads
                    )
                    losses.append(loss)
                    if want_grads:
                        grad_hidden.append(g_hidden)
                        g_weight = g_weight.float()
                        grad_weight = g_weight if grad_weight is None else grad_weight + g_weight
            loss = torch.stack(losses).sum() / num_tokens
        if want_grads:
            ctx.save_for_backward(
                torch.cat(grad_hidden).to(hidden_NM.dtype), grad_weight.to(weight_PM.dtype)
            )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_NM, grad_weight_PM = ctx.saved_tensors
        grad_hidden = grad_hidden_NM * grad_loss if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight_PM * grad_loss if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(
    hidden_NM: Tensor, weight_PM: Tensor, targets_N: Tensor, vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean cross entropy of ``hidden_NM @ weight_PM.T`` over the first ``vocab_size`` columns (see module doc).

    ``weight_PM`` may have more rows than the vocabulary (an aligned, padded table); those columns are
    masked. Under autocast the GEMMs run in the autocast dtype; the loss is float32.
    """
    if hidden_NM.dim() != 2 or weight_PM.dim() != 2 or hidden_NM.shape[1] != weight_PM.shape[1]:
        raise ValueError(
            f"hidden [N, M] and weight [P, M] expected, got {tuple(hidden_NM.shape)} and {tuple(weight_PM.shape)}"
        )
    if targets_N.shape != hidden_NM.shape[:1]:
        raise ValueError(f"targets of shape {tuple(targets_N.shape)} for {hidden_NM.shape[0]} tokens")
    vocab_size = weight_PM.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight_PM.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{weight_PM.shape[0]} (rows of the weight)")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(hidden_NM.shape[0], weight_PM.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = hidden_NM.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_NM.dtype
    return _LinearCrossEntropy.apply(hidden_NM, weight_PM, targets_N, vocab_size, chunk_tokens, dtype)

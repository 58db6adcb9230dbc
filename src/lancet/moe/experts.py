"""Expert FFNs as grouped GEMMs over rows already grouped by local expert.

Shape legend: N rows (received tokens), K input features, O output features,
G groups (local experts).

The GEMM is a custom op (``lancet::grouped_mm``) so that it traces in any dtype
(``torch._grouped_mm``'s fake kernel accepts bf16 only) and so that its backward
is two separate graph nodes: ``lancet::grouped_mm`` on the transposed weight
(the input gradient, dX) and ``lancet::grouped_mm_dw`` (the weight gradient,
dW). The dW pass can then move the weight-gradient half on its own. Expert
biases are gathered per row by ``lancet::group_bias``, whose gradient is a
segment sum over the grouped rows (``lancet::segment_sum``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}
"""Activations of gated (SwiGLU-style) experts, by the names model configs use."""


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def native_grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands (CUDA sm90+, bf16, aligned)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    # 16-byte alignment of the inner dims (8 bf16 elements).
    return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0


def _group_bounds(offsets: Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


@torch.library.custom_op("lancet::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """out[rows of group g] = x[rows of group g] @ w[g]; offsets are int32 cumulative row ends."""
    if native_grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    out = x.new_zeros(x.shape[0], w.shape[2])
    for g, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
    return out


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("lancet::grouped_mm_dw", mutates_args=())
def grouped_mm_dw(x: Tensor, dy: Tensor, offsets: Tensor) -> Tensor:
    """Weight gradient of grouped_mm: dw[g] = x[rows of g]^T @ dy[rows of g]."""
    num_groups = offsets.shape[0]
    if native_grouped_mm_supported(x, dy):
        return torch._grouped_mm(x.t(), dy, offs=offsets)
    out = x.new_zeros(num_groups, x.shape[1], dy.shape[1])
    for g, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            torch.mm(x[start:end].t(), dy[start:end], out=out[g])
    return out


@grouped_mm_dw.register_fake
def _grouped_mm_dw_fake(x: Tensor, dy: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, grad_out: Tensor):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm(grad_out, w.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_dw(x, grad_out, offsets)
    return grad_x, grad_w, None


torch.library.register_autograd("lancet::grouped_mm", _backward, setup_context=_setup_context)


@torch.library.custom_op("lancet::segment_sum", mutates_args=())
def segment_sum(rows: Tensor, offsets: Tensor) -> Tensor:
    """Sum of the rows of each group: out[g] = rows[rows of group g].sum(0) (zeros for empty groups)."""
    if native_grouped_mm_supported(rows, rows):
        # A grouped GEMM of a ones block against the rows sums each group in fp32 without atomics.
        ones = rows.new_ones(rows.shape[0], 8).t()
        return torch._grouped_mm(ones, rows, offs=offsets)[:, 0].contiguous()
    out = rows.new_zeros(offsets.shape[0], rows.shape[1])
    for g, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            torch.sum(rows[start:end], dim=0, out=out[g])
    return out


@segment_sum.register_fake
def _segment_sum_fake(rows: Tensor, offsets: Tensor) -> Tensor:
    return rows.new_empty(offsets.shape[0], rows.shape[1])


@torch.library.custom_op("lancet::group_bias", mutates_args=())
def group_bias(bias: Tensor, group_of_row: Tensor, offsets: Tensor) -> Tensor:
    """bias[group_of_row]: each row's group bias. Rows must be grouped (``offsets`` are their ends)."""
    return bias[group_of_row]


@group_bias.register_fake
def _group_bias_fake(bias: Tensor, group_of_row: Tensor, offsets: Tensor) -> Tensor:
    return bias.new_empty(group_of_row.shape[0], bias.shape[1])


def _bias_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])


def _bias_backward(ctx, grad_out: Tensor):
    (offsets,) = ctx.saved_tensors
    # The gather's own backward (index_put with accumulate) piles every row of a group onto one
    # address with atomics; grouped rows allow a segment sum instead.
    return segment_sum(grad_out, offsets), None, None


torch.library.register_autograd("lancet::group_bias", _bias_backward, setup_context=_bias_setup_context)


class GroupedExperts(nn.Module):
    """``num_experts`` independent ``Linear(M, H) -> ReLU -> Linear(H, M)`` FFNs.

    Parameters are stacked along a leading expert dim so that one grouped GEMM
    serves all local experts. ``lancet.models.init`` initialises them.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, first_expert: int = 0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = first_expert
        """Global index of local expert 0 (seeds its initialisation)."""
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, rows_NM: Tensor, expert_of_row_N: Tensor, offsets_G: Tensor) -> Tensor:
        """Rows must be grouped by expert; ``offsets_G`` are cumulative int32 ends."""
        dtype = compute_dtype(rows_NM)
        rows_NM = rows_NM.to(dtype)
        hidden_NH = grouped_mm(rows_NM, self.w1.to(dtype), offsets_G)
        hidden_NH = torch.relu(hidden_NH + group_bias(self.b1.to(dtype), expert_of_row_N, offsets_G))
        out_NM = grouped_mm(hidden_NH, self.w2.to(dtype), offsets_G)
        return out_NM + group_bias(self.b2.to(dtype), expert_of_row_N, offsets_G)

    def forward_padded(self, rows_GNM: Tensor) -> Tensor:
        """Every expert on its own equally long block of rows: ``[G, N, M] -> [G, N, M]`` as batched GEMMs.

        The backward of each ``bmm`` is two ``bmm`` nodes (dX and dW), so the dW pass can move the
        weight-gradient half; biases broadcast over the rows (their gradients are sums).
        """
        dtype = compute_dtype(rows_GNM)
        hidden_GNH = torch.bmm(rows_GNM.to(dtype), self.w1.to(dtype)) + self.b1.to(dtype)[:, None, :]
        hidden_GNH = torch.relu(hidden_GNH)
        return torch.bmm(hidden_GNH, self.w2.to(dtype)) + self.b2.to(dtype)[:, None, :]


class GroupedGatedExperts(GroupedExperts):
    """``num_experts`` gated FFNs without biases: ``down(act(x @ W_gate) * (x @ W_up))`` (SwiGLU for silu).

    ``w_gate_up`` holds ``[W_gate | W_up]`` side by side (``[L, M, 2H]``), ``w_down`` is ``[L, H, M]``:
    two grouped GEMMs per expert FFN. A ``GroupedExperts`` so that the step treats its parameters as
    expert-sharded (never all-reduced); it has none of the ReLU FFN's parameters.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_hidden: int, activation_name: str = "silu", first_expert: int = 0
    ) -> None:
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))

    def _gated(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, rows_NM: Tensor, expert_of_row_N: Tensor, offsets_G: Tensor) -> Tensor:
        dtype = compute_dtype(rows_NM)
        hidden_NH = self._gated(grouped_mm(rows_NM.to(dtype), self.w_gate_up.to(dtype), offsets_G))
        return grouped_mm(hidden_NH, self.w_down.to(dtype), offsets_G)

    def forward_padded(self, rows_GNM: Tensor) -> Tensor:
        dtype = compute_dtype(rows_GNM)
        hidden_GNH = self._gated(torch.bmm(rows_GNM.to(dtype), self.w_gate_up.to(dtype)))
        return torch.bmm(hidden_GNH, self.w_down.to(dtype))


class SharedExpert(nn.Module):
    """A dense gated FFN every token goes through, optionally scaled by ``sigmoid(x @ w_gate)`` (Qwen2-MoE).

    Replicated on every rank (its gradients are all-reduced like any dense parameter).
    """

    def __init__(self, d_model: int, d_hidden: int, activation_name: str = "silu", sigmoid_gate: bool = False) -> None:
        super().__init__()
        self.act = activation(activation_name)
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if sigmoid_gate else None

    def forward(self, tokens_TM: Tensor) -> Tensor:
        out_TM = self.down_proj(self.act(self.gate_proj(tokens_TM)) * self.up_proj(tokens_TM))
        if self.gate is None:
            return out_TM
        return torch.sigmoid(self.gate(tokens_TM)) * out_TM


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype of ``x``'s device when autocast is on, else ``x``'s own dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

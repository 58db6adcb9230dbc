"""Position of each token within its expert by descending priority, without a device-wide sort.

The batch-prioritized gate serves each expert's tokens highest top-1 probability first, ties to the
earlier token. The obvious way, a stable ``argsort`` of all T priorities, is a device-wide radix sort: on
a GPU about twenty dependent kernels per MoE layer (four radix passes over 32-bit keys), each a gap in a
replayed graph. Here every token gets one int64 key that orders it exactly as that rule does, and unique::

    key = expert * 2**(32 + B) + descending_priority_bits * 2**B + token index     (B: bits of T - 1)

so a token's position within its expert is the number of keys below its own minus the number below its
expert's first possible key. The keys are cut into runs of ``RUN_LENGTH``, each run sorted on its own (one
kernel: a run fits one thread block's sort), and "keys below x" is one batched ``searchsorted`` over the
runs, summed. Same positions as the sort, bit for bit (``tests/unit/test_priority_positions.py``, and on a
GPU ``tests/gpu/test_priority_positions_cuda.py``); when the key does not fit 63 bits (more than
``2**(31 - B)`` experts) the stable argsort is used.

The padded dispatch uses the runs unless ``LANCET_PRIORITY_POSITIONS=sort`` (the stable argsort, the same
values by more kernels).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lancet.moe.gates import positions_by_argsort

ENV = "LANCET_PRIORITY_POSITIONS"
METHODS = ("runs", "sort")

RUN_LENGTH = 2048
"""Keys per independently sorted run; at most 4096 (the largest row torch sorts within one thread block)."""


def _descending_bits(priority_T: Tensor) -> Tensor:
    """int64 in [0, 2**32) that is smaller for a larger priority, equal for equal priorities.

    Order-preserving map of float32 bits (negative floats reversed), with -0.0 taken as +0.0 and every NaN as
    one NaN above +inf, as torch's sort orders them.
    """
    value_T = priority_T.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    value_T = torch.where(torch.isnan(value_T), torch.full_like(value_T, float("nan")), value_T)
    signed_T = value_T.view(torch.int32).to(torch.int64)
    ascending_T = torch.where(signed_T >= 0, signed_T + 2**31, -1 - signed_T)
    return (2**32 - 1) - ascending_T


def _index_bits(num_tokens: int) -> int:
    return max(1, (num_tokens - 1).bit_length())


def fits_one_key(num_tokens: int, num_experts: int) -> bool:
    """Whether expert, priority bits and token index fit one non-negative int64 key."""
    return (num_experts - 1).bit_length() + 32 + _index_bits(num_tokens) <= 63


def positions_by_priority(expert_T: Tensor, priority_T: Tensor, num_experts: int,
                          run_length: int = RUN_LENGTH) -> Tensor:
    """0-based position of each token among its expert's tokens, highest priority first, ties to the earlier token.

    ``expert_T`` int64 in [0, E); ``priority_T`` floating, any values. Static shapes, no host sync.
    """
    num_tokens = expert_T.shape[0]
    if not 1 <= run_length <= 4096:
        raise ValueError(f"run_length {run_length} is outside [1, 4096]")
    if num_tokens == 0 or not fits_one_key(num_tokens, num_experts):
        return positions_by_argsort(expert_T, priority_T, num_experts)
    index_bits = _index_bits(num_tokens)
    expert_base_T = expert_T.to(torch.int64) * 2 ** (32 + index_bits)
    index_T = torch.arange(num_tokens, device=expert_T.device, dtype=torch.int64)
    key_T = expert_base_T + _descending_bits(priority_T) * 2**index_bits + index_T
    runs = -(-num_tokens // run_length)
    # Padding sorts last in its run and is below no real key, so it is never counted.
    padding = key_T.new_full((runs * run_length - num_tokens,), torch.iinfo(torch.int64).max)
    key_RL = torch.cat([key_T, padding]).view(runs, run_length)
    query_RQ = torch.cat([key_T, expert_base_T]).expand(runs, -1).contiguous()
    below_Q = runs_below(key_RL, query_RQ).sum(dim=0)
    return below_Q[:num_tokens] - below_Q[num_tokens:]


def _runs_below_impl(key_RL: Tensor, query_RQ: Tensor) -> Tensor:
    """Per run r and query q, the number of keys of run r strictly below ``query_RQ[r, q]``: each run sorted
    (a row of at most 4096 keys is one thread block's sort on a GPU), then one batched search."""
    return torch.searchsorted(key_RL.sort(dim=1).values, query_RQ)


# An op of its own, so that a compiled region runs torch's sort and searchsorted (what the eager step runs)
# rather than Inductor's lowering of them: on torch 2.11 on an H200 that lowering failed to compile a fused
# search-and-sum for runs of 512 keys and, written as one search per run, returned wrong counts. The padding,
# the queries and the sum stay outside, for Inductor: on an H200 the keys, padding and queries took three of
# its kernels and the sum one, the same 11 kernels a call as with them inside the op (docs/results.md run 19).
runs_below = torch.library.custom_op("lancet::runs_below", _runs_below_impl, mutates_args=())


@runs_below.register_fake
def _runs_below_fake(key_RL, query_RQ):
    return query_RQ.new_empty(query_RQ.shape)


def priority_positions_from_environment() -> str:
    """``LANCET_PRIORITY_POSITIONS``: ``runs`` (unset: the default) or ``sort``; ranks inherit it."""
    value = os.environ.get(ENV, "").strip() or "runs"
    if value not in METHODS:
        raise ValueError(f"{ENV} must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def positions(expert_T: Tensor, priority_T: Tensor, num_experts: int) -> Tensor:
    """Positions by priority, by the method ``LANCET_PRIORITY_POSITIONS`` names (the same values either way)."""
    if priority_positions_from_environment() == "runs":
        return positions_by_priority(expert_T, priority_T, num_experts)
    return positions_by_argsort(expert_T, priority_T, num_experts)

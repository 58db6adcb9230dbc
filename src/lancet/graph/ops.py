"""Families of ops that several layers recognise, as OpOverloads (never matched by name)."""

from __future__ import annotations

import torch

import lancet.moe.experts  # noqa: F401  (registers lancet::grouped_mm, lancet::grouped_mm_dw)
import lancet.moe.padded  # noqa: F401  (registers lancet::capacity_slots, slot_scatter, slot_gather)

aten = torch.ops.aten
lancet_ops = torch.ops.lancet

ATTENTION_FORWARD = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
})
ATTENTION_BACKWARD = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention_backward.default,
})
MM = frozenset({aten.mm.default, aten.addmm.default})
BMM = aten.bmm.default
GROUPED_MM = lancet_ops.grouped_mm.default
GROUPED_MM_DW = lancet_ops.grouped_mm_dw.default
MATMUL = MM | {BMM, GROUPED_MM, GROUPED_MM_DW}
CAPACITY_SLOTS = lancet_ops.capacity_slots.default
"""The padded dispatch's slot assignment: a layer holding it drops per part when partitioned."""
ASSERT_PACKETS = frozenset({
    aten._assert_async, aten._assert_scalar, aten._assert_tensor_metadata,
    aten.sym_constrain_range, aten.sym_constrain_range_for_size,
})
"""Runtime checks: they launch no work worth timing."""


def is_assert(node) -> bool:
    overload_packet = getattr(node.target, "overloadpacket", None)
    return overload_packet in ASSERT_PACKETS

"""Token-axis inference: for each value in a region, which dim holds the batch/token axis.

An axis is a dim index, ``REPLICATED`` (the value is the same for every part:
parameters, constants, scalars) or the region cannot be partitioned there.

Rules are per aten op. Each takes the node, the axes of its tensor inputs
(by position in ``node.all_input_nodes`` order is *not* used: rules read
their arguments directly) and returns the axis of the output, or raises
``NoRule`` when the op has no rule or mixes tokens in a way no rule covers.
Ops that mix tokens but have an exact partitioned form (cumsum along tokens,
sums and means over tokens) are reported as ``Mixing`` so the partition pass
can apply that form.

Token axis sizes must be multiples of ``batch_size`` (one block of rows per
sample, sample-major), so splitting that dim into parts splits samples.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
REPLICATED = None


class NoRule(Exception):
    """The op has no partition rule, or its inputs' axes conflict."""


@dataclass(frozen=True, slots=True)
class Mixing:
    """The op combines values across tokens; ``kind`` names its exact partitioned form."""

    kind: str
    axis: int | None
    """Axis of the output (None: the output is token-free, e.g. a full reduction)."""


Axis = int | None | Mixing


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _ndim(arg) -> int:
    v = _val(arg)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _shape(arg) -> tuple:
    v = _val(arg)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@dataclass
class Context:
    axes: dict[fx.Node, Axis]
    batch_size: int

    def axis(self, arg) -> int | None:
        if not isinstance(arg, fx.Node):
            return REPLICATED
        axis = self.axes.get(arg, REPLICATED)
        return axis.axis if isinstance(axis, Mixing) else axis


Rule = Callable[[fx.Node, Context], Axis]


def _pointwise(node: fx.Node, ctx: Context) -> Axis:
    out_ndim = _ndim(node)
    found = REPLICATED
    for arg in node.args:
        args = arg if isinstance(arg, (list, tuple)) else [arg]
        for a in args:
            axis = ctx.axis(a)
            if axis is REPLICATED:
                continue
            if _shape(a)[axis] == 1:
                raise NoRule(f"{node.name}: token dim broadcast from size 1")
            mapped = axis + out_ndim - _ndim(a)
            if found is not REPLICATED and found != mapped:
                raise NoRule(f"{node.name}: inputs split on different dims")
            found = mapped
    return found


def _first_input(node: fx.Node, ctx: Context) -> Axis:
    return ctx.axis(node.args[0])


def _reduce_dims(node: fx.Node, ctx: Context, dims, keepdim: bool, mixing_kind: str) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    ndim = _ndim(node.args[0])
    dims = list(range(ndim)) if dims is None or dims == [] else [_norm_dim(d, ndim) for d in dims]
    if axis in dims:
        if len(dims) < ndim and keepdim:
            return Mixing(mixing_kind, axis=None)
        return Mixing(mixing_kind, axis=None)
    return axis if keepdim else axis - sum(1 for d in dims if d < axis)


def _sum(node: fx.Node, ctx: Context) -> Axis:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    kind = "mean" if node.target in (aten.mean.dim, aten.mean.default) else "sum"
    if isinstance(dims, int):
        dims = [dims]
    return _reduce_dims(node, ctx, dims, keepdim, kind)


def _along_dim(kind: str) -> Rule:
    """Ops with a ``dim`` argument that keep the rank (softmax, cumsum, sort, topk, max.dim, ...)."""

    def rule(node: fx.Node, ctx: Context) -> Axis:
        axis = ctx.axis(node.args[0])
        if axis is REPLICATED:
            return REPLICATED
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        if kind == "topk":
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        if _norm_dim(dim, _ndim(node.args[0])) == axis:
            if kind == "cumsum":
                return Mixing("cumsum", axis=axis)
            raise NoRule(f"{node.name}: {kind} along the token dim")
        if kind == "max_dim":
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            return axis if keepdim or _norm_dim(dim, _ndim(node.args[0])) > axis else axis - 1
        return axis

    return rule


def _mm(node: fx.Node, ctx: Context) -> Axis:
    a, b = node.args[-2], node.args[-1]
    axis_a, axis_b = ctx.axis(a), ctx.axis(b)
    if node.target == aten.addmm.default and ctx.axis(node.args[0]) not in (REPLICATED, 0):
        raise NoRule(f"{node.name}: bias split")
    if axis_b is REPLICATED:
        return REPLICATED if axis_a is REPLICATED else (0 if axis_a == 0 else _no(node, "mm contracts the token dim"))
    if axis_a is REPLICATED and axis_b == 1:
        return 1
    raise NoRule(f"{node.name}: mm contracts the token dim")


def _no(node: fx.Node, why: str):
    raise NoRule(f"{node.name}: {why}")


def _bmm(node: fx.Node, ctx: Context) -> Axis:
    a, b = ctx.axis(node.args[0]), ctx.axis(node.args[1])
    if a == b == 0 or (a == 0 and b is REPLICATED):
        return 0
    if a is REPLICATED and b is REPLICATED:
        return REPLICATED
    raise NoRule(f"{node.name}: bmm on non-batch dims")


def _reshape(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    lead_in = 1
    for d in in_shape[:axis]:
        lead_in *= d
    if lead_in != 1:
        raise NoRule(f"{node.name}: token dim is not leading")
    # Find the first non-unit output dim; it must carry whole samples.
    for d, size in enumerate(out_shape):
        if size != 1:
            if size % ctx.batch_size == 0:
                return d
            break
    raise NoRule(f"{node.name}: reshape breaks the token dim")


def _transpose(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    ndim = _ndim(node.args[0])
    if node.target == aten.t.default:
        return 1 - axis if ndim == 2 else axis
    d0, d1 = (_norm_dim(d, ndim) for d in node.args[1:3])
    return d1 if axis == d0 else d0 if axis == d1 else axis


def _permute(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    ndim = _ndim(node.args[0])
    return [_norm_dim(d, ndim) for d in node.args[1]].index(axis)


def _unsqueeze(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    dim = _norm_dim(node.args[1], _ndim(node))
    return axis + 1 if dim <= axis else axis


def _squeeze(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    in_shape = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(in_shape) if s == 1]
    dims = [dims] if isinstance(dims, int) else dims
    dims = [_norm_dim(d, len(in_shape)) for d in dims if in_shape[_norm_dim(d, len(in_shape))] == 1]
    return axis - sum(1 for d in dims if d < axis)


def _expand(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    if _shape(node.args[0])[axis] == 1:
        raise NoRule(f"{node.name}: expands the token dim")
    return axis + _ndim(node) - _ndim(node.args[0])


def _slice_like(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, _ndim(node.args[0]))
    if dim == axis:
        raise NoRule(f"{node.name}: slices the token dim")
    if node.target == aten.select.int:
        return axis - 1 if dim < axis else axis
    return axis


def _split(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), _ndim(node.args[0]))
    if dim == axis:
        raise NoRule(f"{node.name}: splits the token dim")
    return axis


def _unbind(node: fx.Node, ctx: Context) -> Axis:
    axis = ctx.axis(node.args[0])
    if axis is REPLICATED:
        return REPLICATED
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, _ndim(node.args[0]))
    if dim == axis:
        raise NoRule(f"{node.name}: unbinds the token dim")
    return axis - 1 if dim < axis else axis


def _cat(node: fx.Node, ctx: Context) -> Axis:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    axes = {ctx.axis(t) for t in tensors}
    if axes == {REPLICATED}:
        return REPLICATED
    if len(axes) != 1:
        raise NoRule(f"{node.name}: cat of split and whole values")
    axis = axes.pop()
    if _norm_dim(dim, _ndim(node)) == axis:
        raise NoRule(f"{node.name}: cat along the token dim")
    return axis


def _getitem(node: fx.Node, ctx: Context) -> Axis:
    source = node.args[0]
    axis = ctx.axes.get(source, REPLICATED)
    if isinstance(axis, tuple):
        return axis[node.args[1]]
    return axis.axis if isinstance(axis, Mixing) else axis


def _multi_output_first(n_outputs_follow: int) -> Rule:
    """Ops whose first ``n`` outputs follow input 0's axis (layer norm, SDPA, max.dim)."""

    def rule(node: fx.Node, ctx: Context) -> Axis:
        axis = ctx.axis(node.args[0])
        for arg in node.args[1:3]:
            other = ctx.axis(arg)
            if other not in (REPLICATED, axis) and isinstance(_val(arg), torch.Tensor):
                raise NoRule(f"{node.name}: inputs split on different dims")
        val = node.meta.get("val")
        count = len(val) if isinstance(val, (tuple, list)) else 1
        outs = []
        for i in range(count):
            out = val[i] if isinstance(val, (tuple, list)) else val
            outs.append(axis if (i < n_outputs_follow and isinstance(out, torch.Tensor) and out.dim() > 0) else REPLICATED)
        return tuple(outs) if isinstance(val, (tuple, list)) else outs[0]

    return rule


def _sdpa(node: fx.Node, ctx: Context) -> Axis:
    axes = {ctx.axis(a) for a in node.args[:3]}
    if axes == {REPLICATED}:
        return REPLICATED
    if axes != {0}:
        raise NoRule(f"{node.name}: attention split on a non-batch dim")
    val = node.meta.get("val")
    return tuple(0 if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == _shape(node.args[0])[0] else REPLICATED for v in val)


def _embedding(node: fx.Node, ctx: Context) -> Axis:
    if ctx.axis(node.args[0]) is not REPLICATED:
        raise NoRule(f"{node.name}: split embedding table")
    return ctx.axis(node.args[1])


def _index(node: fx.Node, ctx: Context) -> Axis:
    source, indices = node.args[0], node.args[1]
    if ctx.axis(source) is not REPLICATED:
        raise NoRule(f"{node.name}: gathers rows of a split tensor")
    axes = {ctx.axis(i) for i in indices if i is not None}
    if axes == {REPLICATED}:
        return REPLICATED
    if len(axes) == 1 and len(indices) == 1:
        return axes.pop()
    raise NoRule(f"{node.name}: advanced indexing with split indices")


def _index_select(node: fx.Node, ctx: Context) -> Axis:
    if ctx.axis(node.args[0]) is not REPLICATED:
        raise NoRule(f"{node.name}: gathers rows of a split tensor")
    return ctx.axis(node.args[2])


def _constant(node: fx.Node, ctx: Context) -> Axis:
    return REPLICATED


def _like(node: fx.Node, ctx: Context) -> Axis:
    return ctx.axis(node.args[0])


def _one_hot(node: fx.Node, ctx: Context) -> Axis:
    return ctx.axis(node.args[0])


def _cross_entropy(node: fx.Node, ctx: Context) -> Axis:
    if ctx.axis(node.args[0]) is REPLICATED:
        return REPLICATED
    return (Mixing("sum", axis=None), REPLICATED)


POINTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.neg.default, aten.exp.default,
    aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.relu.default, aten.gelu.default, aten.sigmoid.default, aten.where.self, aten.ge.Scalar, aten.gt.Scalar,
    aten.lt.Scalar, aten.le.Scalar, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ge.Tensor,
    aten.lt.Tensor, aten.logical_and.default, aten.logical_not.default, aten.bitwise_and.Tensor,
    aten.clamp.default, aten.clamp_min.default, aten.masked_fill.Scalar, aten.native_dropout.default,
    aten.threshold_backward.default, aten.gelu_backward.default, aten.floor_divide.default,
    aten.remainder.Scalar, aten.fill.Scalar,
]
LIKE = [
    aten.clone.default, aten._to_copy.default, aten.detach.default, aten.alias.default,
    aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default,
    aten.contiguous.default, aten.lift_fresh_copy.default,
]
CONSTANT = [
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
    aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.sym_size.int,
    aten._local_scalar_dense.default,
]

RULES: dict[object, Rule] = {op: _pointwise for op in POINTWISE}
RULES.update({op: _like for op in LIKE})
RULES.update({op: _constant for op in CONSTANT})
RULES.update(
    {
        aten.mm.default: _mm,
        aten.addmm.default: _mm,
        aten.bmm.default: _bmm,
        aten.view.default: _reshape,
        aten._unsafe_view.default: _reshape,
        aten.reshape.default: _reshape,
        aten.t.default: _transpose,
        aten.transpose.int: _transpose,
        aten.permute.default: _permute,
        aten.unsqueeze.default: _unsqueeze,
        aten.squeeze.dim: _squeeze,
        aten.squeeze.dims: _squeeze,
        aten.squeeze.default: _squeeze,
        aten.expand.default: _expand,
        aten.slice.Tensor: _slice_like,
        aten.select.int: _slice_like,
        aten.split.Tensor: _split,
        aten.split_with_sizes.default: _split,
        aten.unbind.int: _unbind,
        aten.cat.default: _cat,
        operator.getitem: _getitem,
        aten.sum.dim_IntList: _sum,
        aten.sum.default: _sum,
        aten.mean.dim: _sum,
        aten.mean.default: _sum,
        aten._softmax.default: _along_dim("softmax"),
        aten._log_softmax.default: _along_dim("log_softmax"),
        aten.cumsum.default: _along_dim("cumsum"),
        aten.sort.stable: _along_dim("sort"),
        aten.sort.default: _along_dim("sort"),
        aten.argsort.stable: _along_dim("sort"),
        aten.topk.default: _along_dim("topk"),
        aten.max.dim: _along_dim("max_dim"),
        aten.argmax.default: _along_dim("max_dim"),
        aten.native_layer_norm.default: _multi_output_first(3),
        aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
        aten._scaled_dot_product_flash_attention.default: _sdpa,
        aten._scaled_dot_product_efficient_attention.default: _sdpa,
        aten._scaled_dot_product_cudnn_attention.default: _sdpa,
        aten.embedding.default: _embedding,
        aten.index.Tensor: _index,
        aten.index_select.default: _index_select,
        aten.one_hot.default: _one_hot,
        aten.nll_loss_forward.default: _cross_entropy,
    }
)


def has_rule(node: fx.Node) -> bool:
    return node.op != "call_function" or node.target in RULES


def infer_axes(nodes: list[fx.Node], input_axes: dict[fx.Node, Axis], batch_size: int) -> dict[fx.Node, Axis]:
    """Propagate axes through ``nodes`` (in graph order) from ``input_axes``; raises NoRule at the first failure."""
    ctx = Context(axes=dict(input_axes), batch_size=batch_size)
    for node in nodes:
        if node in ctx.axes or node.op != "call_function":
            continue
        rule = RULES.get(node.target)
        if rule is None:
            raise NoRule(f"{node.name}: no partition rule for {node.target}")
        ctx.axes[node] = rule(node, ctx)
    return ctx.axes


def unsupported_ops(graph: fx.Graph) -> list[str]:
    """Forward-phase ops of ``graph`` that have no partition rule (sorted, unique)."""
    missing = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target in RULES:
            continue
        if node.meta.get("custom", {}).get("phase") != "forward":
            continue
        missing.add(str(node.target))
    return sorted(missing)

"""Token-axis inference over a forward graph.

For every value: which dim is the token (batch) axis, whether it is the same
for all tokens (``REPLICATED``: parameters, constants), or a permutation of
the tokens (``PERMUTED``: the output of a sort along the token axis). Rules
are per aten op; each reads its node's arguments and the axes of its inputs.

A rule also says whether the op is *part-exact*: run on a contiguous slice of
the tokens, it yields the matching slice of its whole output. Pointwise ops,
matmuls, views, layer norm, attention over the batch dim, embedding lookups
are part-exact. A cumsum along the token axis is exact with a carry from the
earlier parts (``carry``). Sorts, reductions over the token axis, and anything
touching a ``PERMUTED`` value are not part-exact: a partition runs them once,
on the whole tensor. An op with no rule at all raises ``NoRule``.

Rules live in a registry users extend (``register_axis_rule``). The Rule
contract: ``rule(node, ctx) -> Inferred`` for a ``call_function`` node whose
target the rule is registered for (an ``OpOverload``; registering an
``OpOverloadPacket`` covers all its overloads). ``ctx.axis(arg)`` gives an
input's axis (``REPLICATED`` for constants and non-nodes); ``ctx.batch_size`` the
samples per batch. Return the output's ``Axis`` (a tuple for ops with several
outputs) and whether the op is part-exact; raise ``NoRule`` with a reason when
the op cannot follow the token axis (e.g. it mixes tokens). A rule must not
change the graph.

Token dims must hold whole samples (sample-major, sizes multiple of the batch
size), so splitting a token dim into parts splits samples.

The padded dispatch's custom ops are part-local by the micro-batch contract:
``lancet::capacity_slots`` on a slice of the tokens computes that slice's own
capacity and slots (token axis, part-exact by that contract);
``lancet::slot_scatter`` makes a capacity-sized buffer of the part's rows
(``rows``: part-local, no token axis); ``lancet::slot_gather`` brings a part's
rows back into token order (token axis of its slots).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

import lancet.moe.padded  # noqa: F401  (registers the lancet:: ops the rules name)
from lancet.graph import meta

aten = torch.ops.aten
lancet_ops = torch.ops.lancet


@dataclass(frozen=True, slots=True)
class Axis:
    kind: str
    """token | permuted | replicated"""
    dim: int | None = None


REPLICATED = Axis("replicated")


def TOKEN(dim: int) -> Axis:  # noqa: N802 (reads like a constant)
    return Axis("token", dim)


def PERMUTED(dim: int) -> Axis:  # noqa: N802
    return Axis("permuted", dim)


@dataclass(frozen=True, slots=True)
class Inferred:
    """What inference found for one node."""

    axis: Axis | tuple[Axis, ...]
    exact: bool = True
    """Part-exact: the op on a token slice gives the slice of its output."""
    carry: bool = False
    """A cumsum along the token axis: exact given the sum of the earlier parts."""


class NoRule(Exception):
    """The op has no token-axis rule, or its inputs' axes cannot be reconciled."""


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _shape(arg) -> tuple:
    v = _val(arg)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _ndim(arg) -> int:
    return len(_shape(arg))


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class Context:
    def __init__(self, axes: dict[fx.Node, Inferred], batch_size: int) -> None:
        self.axes = axes
        self.batch_size = batch_size

    def axis(self, arg) -> Axis:
        if not isinstance(arg, fx.Node):
            return REPLICATED
        found = self.axes.get(arg)
        if found is None:
            return REPLICATED
        if isinstance(found.axis, tuple):
            raise NoRule(f"{arg.name}: multi-output value used directly")
        return found.axis


Rule = Callable[[fx.Node, Context], Inferred]


def _tensor_args(node: fx.Node) -> list:
    out = []
    for arg in node.args:
        out.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return [a for a in out if isinstance(a, fx.Node)]


def _inexact_if_permuted(axis: Axis, exact: bool = True) -> Inferred:
    return Inferred(axis, exact=exact and axis.kind != "permuted")


def _pointwise(node: fx.Node, ctx: Context) -> Inferred:
    out_ndim = _ndim(node)
    found: Axis = REPLICATED
    for arg in _tensor_args(node):
        axis = ctx.axis(arg)
        if axis.kind == "replicated":
            continue
        mapped = Axis(axis.kind, axis.dim + out_ndim - _ndim(arg))
        if found.kind != "replicated" and found != mapped:
            raise NoRule(f"{node.name}: inputs disagree on the token axis")
        found = mapped
    if found.kind != "replicated":
        token_size = _shape(node)[found.dim]
        for arg in _tensor_args(node):
            if ctx.axis(arg).kind == "replicated" and _ndim(arg):
                dim = found.dim - (out_ndim - _ndim(arg))
                if dim >= 0 and _shape(arg)[dim] == token_size and token_size != 1:
                    raise NoRule(f"{node.name}: a token-sized operand has no token axis")
    return _inexact_if_permuted(found)


def _like(node: fx.Node, ctx: Context) -> Inferred:
    return _inexact_if_permuted(ctx.axis(node.args[0]))


def _constant(node: fx.Node, ctx: Context) -> Inferred:
    return Inferred(REPLICATED)


def _reduce(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    ndim = _ndim(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    dims = list(range(ndim)) if not dims else [_norm(d, ndim) for d in dims]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if axis.dim in dims:
        return Inferred(REPLICATED, exact=False)
    new_dim = axis.dim if keepdim else axis.dim - sum(1 for d in dims if d < axis.dim)
    return _inexact_if_permuted(Axis(axis.kind, new_dim))


def _along(kind: str) -> Rule:
    """Ops with a ``dim`` that keep the rank or drop it (softmax, cumsum, sort, topk, max.dim)."""

    def rule(node: fx.Node, ctx: Context) -> Inferred:
        axis = ctx.axis(node.args[0])
        ndim = _ndim(node.args[0])
        default = -1 if kind != "cumsum" else 0
        if kind == "topk":
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        else:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", default)
        dim = _norm(dim, ndim)
        outputs = 2 if kind in ("sort", "topk", "max_dim") else 1
        if axis.kind == "replicated":
            return Inferred(REPLICATED if outputs == 1 else (REPLICATED,) * outputs)
        along_token = dim == axis.dim
        if along_token and axis.kind == "permuted" and kind in ("cumsum", "sort"):
            return Inferred(axis if kind == "cumsum" else (axis, axis), exact=False)  # whole only
        if along_token and kind == "cumsum" and axis.kind == "token":
            return Inferred(axis, carry=True)
        if along_token and kind == "sort" and axis.kind == "token":
            return Inferred((PERMUTED(dim), PERMUTED(dim)), exact=False)
        if along_token:
            raise NoRule(f"{node.name}: {kind} along the token axis")
        if kind == "max_dim":
            keepdim = node.args[2] if len(node.args) > 2 else False
            out = Axis(axis.kind, axis.dim if keepdim or dim > axis.dim else axis.dim - 1)
            return Inferred((out, out), exact=axis.kind == "token")
        if outputs == 2:
            return Inferred((axis, axis), exact=axis.kind == "token")
        return _inexact_if_permuted(axis)

    return rule


def _mm(node: fx.Node, ctx: Context) -> Inferred:
    a, b = ctx.axis(node.args[-2]), ctx.axis(node.args[-1])
    if node.target == aten.addmm.default and ctx.axis(node.args[0]).kind != "replicated":
        raise NoRule(f"{node.name}: split bias")
    if b.kind == "replicated":
        if a.kind == "replicated":
            return Inferred(REPLICATED)
        if a.dim == 0:
            return _inexact_if_permuted(a)
    raise NoRule(f"{node.name}: matmul contracts or splits a weight along the token axis")


def _bmm(node: fx.Node, ctx: Context) -> Inferred:
    a, b = ctx.axis(node.args[0]), ctx.axis(node.args[1])
    if a.kind == "replicated" and b.kind == "replicated":
        return Inferred(REPLICATED)
    if a.dim == 0 and (b.kind == "replicated" or b == a):
        return _inexact_if_permuted(a)
    raise NoRule(f"{node.name}: bmm over a non-batch token dim")


def _reshape(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if any(d != 1 for d in in_shape[: axis.dim]):
        raise NoRule(f"{node.name}: reshape of a non-leading token dim")
    for d, size in enumerate(out_shape):
        if size != 1:
            if size % ctx.batch_size == 0:
                return _inexact_if_permuted(Axis(axis.kind, d))
            break
    raise NoRule(f"{node.name}: reshape splits samples")


def _transpose(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    ndim = _ndim(node.args[0])
    if node.target == aten.t.default:
        return _inexact_if_permuted(Axis(axis.kind, 1 - axis.dim if ndim == 2 else axis.dim))
    d0, d1 = (_norm(d, ndim) for d in node.args[1:3])
    dim = d1 if axis.dim == d0 else d0 if axis.dim == d1 else axis.dim
    return _inexact_if_permuted(Axis(axis.kind, dim))


def _permute(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    order = [_norm(d, _ndim(node.args[0])) for d in node.args[1]]
    return _inexact_if_permuted(Axis(axis.kind, order.index(axis.dim)))


def _unsqueeze(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    dim = _norm(node.args[1], _ndim(node))
    return _inexact_if_permuted(Axis(axis.kind, axis.dim + 1 if dim <= axis.dim else axis.dim))


def _squeeze(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    shape = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(shape) if s == 1]
    dims = [dims] if isinstance(dims, int) else dims
    removed = [_norm(d, len(shape)) for d in dims if shape[_norm(d, len(shape))] == 1]
    if axis.dim in removed:
        raise NoRule(f"{node.name}: squeezes the token dim")
    return _inexact_if_permuted(Axis(axis.kind, axis.dim - sum(1 for d in removed if d < axis.dim)))


def _expand(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    if _shape(node.args[0])[axis.dim] == 1:
        raise NoRule(f"{node.name}: expands the token dim")
    return _inexact_if_permuted(Axis(axis.kind, axis.dim + _ndim(node) - _ndim(node.args[0])))


def _dim_arg(node: fx.Node, position: int, default: int) -> int:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    return _norm(dim, _ndim(node.args[0]))


def _slice(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    dim = _dim_arg(node, 1, 0)
    if dim == axis.dim:
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        size = _shape(node.args[0])[dim]
        if start in (0, None) and (end is None or (isinstance(end, int) and end >= size)):
            return _inexact_if_permuted(axis)
        raise NoRule(f"{node.name}: slices the token dim")
    if node.target == aten.select.int:
        return _inexact_if_permuted(Axis(axis.kind, axis.dim - 1 if dim < axis.dim else axis.dim))
    return _inexact_if_permuted(axis)


def _split(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    count = len(node.meta.get("val", ()))
    if axis.kind == "replicated":
        return Inferred((REPLICATED,) * count)
    if _dim_arg(node, 2, 0) == axis.dim:
        raise NoRule(f"{node.name}: splits the token dim")
    return Inferred((axis,) * count, exact=axis.kind == "token")


def _unbind(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    count = len(node.meta.get("val", ()))
    if axis.kind == "replicated":
        return Inferred((REPLICATED,) * count)
    dim = _dim_arg(node, 1, 0)
    if dim == axis.dim:
        raise NoRule(f"{node.name}: unbinds the token dim")
    out = Axis(axis.kind, axis.dim - 1 if dim < axis.dim else axis.dim)
    return Inferred((out,) * count, exact=axis.kind == "token")


def _cat(node: fx.Node, ctx: Context) -> Inferred:
    axes = {ctx.axis(t) for t in node.args[0]}
    if axes == {REPLICATED}:
        return Inferred(REPLICATED)
    if len(axes) != 1:
        raise NoRule(f"{node.name}: cat of split and whole values")
    axis = axes.pop()
    if _norm(node.args[1] if len(node.args) > 1 else 0, _ndim(node)) == axis.dim:
        raise NoRule(f"{node.name}: cat along the token dim")
    return _inexact_if_permuted(axis)


def _stack(node: fx.Node, ctx: Context) -> Inferred:
    axes = {ctx.axis(t) for t in node.args[0]}
    if axes == {REPLICATED}:
        return Inferred(REPLICATED)
    if len(axes) != 1:
        raise NoRule(f"{node.name}: stack of split and whole values")
    axis = axes.pop()
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, _ndim(node))
    return _inexact_if_permuted(Axis(axis.kind, axis.dim + 1 if dim <= axis.dim else axis.dim))


def _gather(node: fx.Node, ctx: Context) -> Inferred:
    """gather(source, dim, index) along a non-token dim: the output follows the index's token axis."""
    source, index = ctx.axis(node.args[0]), ctx.axis(node.args[2])
    dim = _norm(node.args[1], _ndim(node.args[0]))
    if source.kind != "replicated" and (source != index or dim == source.dim):
        raise NoRule(f"{node.name}: gather along or across the token axis")
    return _inexact_if_permuted(index)


def _scatter_add(node: fx.Node, ctx: Context) -> Inferred:
    """scatter_add(buffer, dim, index, src) along a non-token dim: token-wise."""
    axes = {ctx.axis(node.args[i]) for i in (0, 2, 3)} - {REPLICATED}
    if not axes:
        return Inferred(REPLICATED)
    if len(axes) != 1:
        raise NoRule(f"{node.name}: scatter_add operands disagree on the token axis")
    axis = axes.pop()
    if _norm(node.args[1], _ndim(node)) == axis.dim:
        raise NoRule(f"{node.name}: scatter_add along the token axis")
    return _inexact_if_permuted(axis)


def _getitem(node: fx.Node, ctx: Context) -> Inferred:
    source = ctx.axes.get(node.args[0])
    if source is None:
        return Inferred(REPLICATED)
    axis = source.axis[node.args[1]] if isinstance(source.axis, tuple) else source.axis
    return Inferred(axis, exact=source.exact)


def _first_follows(outputs_following: int) -> Rule:
    """Ops whose first outputs follow input 0's axis (layer norm: output, mean, rstd)."""

    def rule(node: fx.Node, ctx: Context) -> Inferred:
        axis = ctx.axis(node.args[0])
        for arg in _tensor_args(node)[1:]:
            if ctx.axis(arg).kind != "replicated":
                raise NoRule(f"{node.name}: split weight")
        val = node.meta.get("val")
        outs = tuple(axis if i < outputs_following else REPLICATED for i in range(len(val)))
        return Inferred(outs, exact=axis.kind != "permuted")

    return rule


def _sdpa(node: fx.Node, ctx: Context) -> Inferred:
    axes = {ctx.axis(a) for a in node.args[:3]}
    val = node.meta.get("val")
    if axes == {REPLICATED}:
        return Inferred(tuple(REPLICATED for _ in val))
    if axes != {TOKEN(0)}:
        raise NoRule(f"{node.name}: attention split on a non-batch dim")
    batch = _shape(node.args[0])[0]
    outs = tuple(
        TOKEN(0) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch else REPLICATED for v in val
    )
    return Inferred(outs)


def _embedding(node: fx.Node, ctx: Context) -> Inferred:
    if ctx.axis(node.args[0]).kind != "replicated":
        raise NoRule(f"{node.name}: split embedding table")
    return _inexact_if_permuted(ctx.axis(node.args[1]))


def _index(node: fx.Node, ctx: Context) -> Inferred:
    source, indices = ctx.axis(node.args[0]), [i for i in node.args[1] if i is not None]
    index_axes = {ctx.axis(i) for i in indices}
    if len(indices) != 1:
        raise NoRule(f"{node.name}: multi-dim advanced indexing")
    (index_axis,) = index_axes
    if source.kind == "replicated":
        return _inexact_if_permuted(index_axis)
    if source.kind == "token" and source.dim == 0 and index_axis.kind == "permuted":
        return Inferred(PERMUTED(0), exact=False)  # tokens gathered in a permuted order
    raise NoRule(f"{node.name}: gathers tokens by token-dependent indices")


def _index_select(node: fx.Node, ctx: Context) -> Inferred:
    if ctx.axis(node.args[0]).kind != "replicated":
        raise NoRule(f"{node.name}: gathers rows of a split tensor")
    return _inexact_if_permuted(ctx.axis(node.args[2]))


def _scatter(node: fx.Node, ctx: Context) -> Inferred:
    """scatter(buffer, dim, permutation, values): values in permuted order put back in token order."""
    dim = _norm(node.args[1], _ndim(node))
    index, values = ctx.axis(node.args[2]), ctx.axis(node.args[3])
    if index == PERMUTED(dim) and values == PERMUTED(dim):
        return Inferred(TOKEN(dim), exact=False)
    raise NoRule(f"{node.name}: scatter that is not an inverse permutation")


def _one_hot(node: fx.Node, ctx: Context) -> Inferred:
    return _inexact_if_permuted(ctx.axis(node.args[0]))


def _nll_loss(node: fx.Node, ctx: Context) -> Inferred:
    if ctx.axis(node.args[0]).kind == "replicated":
        return Inferred((REPLICATED, REPLICATED))
    return Inferred((REPLICATED, REPLICATED), exact=False)


def _assert(node: fx.Node, ctx: Context) -> Inferred:
    return Inferred(REPLICATED)


ROWS = Axis("rows")
"""Part-local rows with no token axis (a capacity-sized buffer of one part's tokens)."""


def _capacity_slots(node: fx.Node, ctx: Context) -> Inferred:
    axis = ctx.axis(node.args[0])
    if axis != TOKEN(0):
        raise NoRule(f"{node.name}: capacity slots of a value without tokens on dim 0")
    return Inferred(axis)


def _slot_scatter(node: fx.Node, ctx: Context) -> Inferred:
    if ctx.axis(node.args[0]) != TOKEN(0) or ctx.axis(node.args[1]) != TOKEN(0):
        raise NoRule(f"{node.name}: slot scatter of rows and slots that are not token-major")
    return Inferred(ROWS)


def _slot_gather(node: fx.Node, ctx: Context) -> Inferred:
    if ctx.axis(node.args[1]) != TOKEN(0):
        raise NoRule(f"{node.name}: slot gather by slots that are not token-major")
    return Inferred(TOKEN(0))


def _pointwise_inplace(node: fx.Node, ctx: Context) -> Inferred:
    """An in-place pointwise op (``add_`` in a traced ``F.rms_norm``): as its out-of-place form when only this
    node reads the tensor it mutates (a temporary), so the mutation is seen by nobody else."""
    target = node.args[0]
    if not isinstance(target, fx.Node) or target.op != "call_function" or len(target.users) != 1:
        raise NoRule(f"{node.name}: in-place op on a value other nodes read")
    return _pointwise(node, ctx)


def _normalize(node: fx.Node, ctx: Context) -> Inferred:
    """rms_norm(x, shape, weight, eps) as one op: the output follows x; the weight must be whole."""
    for arg in _tensor_args(node)[1:]:
        if ctx.axis(arg).kind != "replicated":
            raise NoRule(f"{node.name}: split weight")
    axis = ctx.axis(node.args[0])
    if axis.kind != "replicated" and axis.dim >= _ndim(node.args[0]) - len(node.args[1]):
        raise NoRule(f"{node.name}: normalizes over the token dim")
    return _inexact_if_permuted(axis)


def _repeat(node: fx.Node, ctx: Context) -> Inferred:
    """repeat(x, sizes): the token dim must be repeated once; leading new dims shift it."""
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated":
        return Inferred(REPLICATED)
    sizes = list(node.args[1])
    dim = axis.dim + len(sizes) - _ndim(node.args[0])
    if sizes[dim] != 1:
        raise NoRule(f"{node.name}: repeats the token dim")
    return _inexact_if_permuted(Axis(axis.kind, dim))


def _repeat_interleave(node: fx.Node, ctx: Context) -> Inferred:
    """repeat_interleave(x, repeats, dim) along a non-token dim."""
    axis = ctx.axis(node.args[0])
    if axis.kind == "replicated" and ctx.axis(node.args[1] if len(node.args) > 1 else None).kind == "replicated":
        return Inferred(REPLICATED)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if axis.kind == "replicated" or dim is None or _norm(dim, _ndim(node.args[0])) == axis.dim:
        raise NoRule(f"{node.name}: repeat_interleave along or across the token dim")
    return _inexact_if_permuted(axis)


def _triangle(node: fx.Node, ctx: Context) -> Inferred:
    """tril/triu act on the last two dims: part-exact when the token dim is not one of them."""
    axis = ctx.axis(node.args[0])
    if axis.kind != "replicated" and axis.dim >= _ndim(node.args[0]) - 2:
        raise NoRule(f"{node.name}: triangle over the token dim")
    return _inexact_if_permuted(axis)


POINTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.neg.default, aten.exp.default,
    aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.relu.default, aten.gelu.default, aten.sigmoid.default, aten.where.self, aten.ge.Scalar, aten.gt.Scalar,
    aten.lt.Scalar, aten.le.Scalar, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ge.Tensor,
    aten.gt.Tensor, aten.lt.Tensor, aten.logical_and.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_not.default, aten.clamp.default, aten.clamp_min.default, aten.masked_fill.Scalar,
    aten.floor_divide.default, aten.remainder.Scalar,
    aten.silu.default, aten.cos.default, aten.sin.default, aten.reciprocal.default, aten.abs.default,
    aten.erf.default, aten.log1p.default, aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor,
    aten.pow.Scalar, aten.masked_fill.Tensor, aten.logical_or.default, aten.bitwise_or.Tensor, aten.ne.Tensor,
    aten.le.Tensor, aten.sign.default, aten.clamp.Tensor,
]
POINTWISE_INPLACE = [
    aten.add_.Scalar, aten.add_.Tensor, aten.sub_.Scalar, aten.sub_.Tensor, aten.mul_.Scalar, aten.mul_.Tensor,
    aten.div_.Scalar, aten.div_.Tensor,
]
LIKE = [
    aten.clone.default, aten._to_copy.default, aten.detach.default, aten.alias.default,
    aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default,
    aten.lift_fresh_copy.default,
]
CONSTANT = [
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
    aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.new_zeros.default,
    aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
]

RULES: dict[object, Rule] = {op: _pointwise for op in POINTWISE}
RULES.update({op: _pointwise_inplace for op in POINTWISE_INPLACE})
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
        aten.slice.Tensor: _slice,
        aten.select.int: _slice,
        aten.split.Tensor: _split,
        aten.split_with_sizes.default: _split,
        aten.unbind.int: _unbind,
        aten.cat.default: _cat,
        operator.getitem: _getitem,
        aten.sum.dim_IntList: _reduce,
        aten.sum.default: _reduce,
        aten.mean.dim: _reduce,
        aten.mean.default: _reduce,
        aten.all.default: _reduce,
        aten.any.default: _reduce,
        aten.amax.default: _reduce,
        aten.amin.default: _reduce,
        aten.argmax.default: _reduce,
        aten.argmin.default: _reduce,
        aten.any.dim: _reduce,
        aten.prod.dim_int: _reduce,
        aten.rms_norm.default: _normalize,
        aten._fused_rms_norm.default: _first_follows(2),
        aten.repeat.default: _repeat,
        aten.repeat_interleave.self_int: _repeat_interleave,
        aten.repeat_interleave.self_Tensor: _repeat_interleave,
        aten.tril.default: _triangle,
        aten.triu.default: _triangle,
        aten.logsumexp.default: _reduce,
        aten.stack.default: _stack,
        aten.gather.default: _gather,
        aten.scatter_add.default: _scatter_add,
        aten._softmax.default: _along("softmax"),
        aten._log_softmax.default: _along("log_softmax"),
        aten.cumsum.default: _along("cumsum"),
        aten.sort.stable: _along("sort"),
        aten.sort.default: _along("sort"),
        aten.topk.default: _along("topk"),
        aten.max.dim: _along("max_dim"),
        aten.native_layer_norm.default: _first_follows(3),
        aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
        aten._scaled_dot_product_flash_attention.default: _sdpa,
        aten._scaled_dot_product_efficient_attention.default: _sdpa,
        aten._scaled_dot_product_cudnn_attention.default: _sdpa,
        aten.embedding.default: _embedding,
        aten.index.Tensor: _index,
        aten.index_select.default: _index_select,
        aten.scatter.src: _scatter,
        aten.scatter_.src: _scatter,
        aten.one_hot.default: _one_hot,
        aten.nll_loss_forward.default: _nll_loss,
        aten._assert_async.msg: _assert,
        aten._assert_async.default: _assert,
        lancet_ops.capacity_slots.default: _capacity_slots,
        lancet_ops.slot_scatter.default: _slot_scatter,
        lancet_ops.slot_gather.default: _slot_gather,
    }
)


def register_axis_rule(op, rule: Rule | None = None):
    """Register ``rule`` for ``op`` (an OpOverload, or an OpOverloadPacket for all its overloads); as a
    decorator when ``rule`` is left out. A later registration replaces an earlier one."""

    def register(fn: Rule) -> Rule:
        overloads = [getattr(op, name) for name in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
        for overload in overloads:
            RULES[overload] = fn
        return fn

    return register if rule is None else register(rule)


def axis_rule(op) -> Rule | None:
    """The rule registered for ``op`` (None without one)."""
    return RULES.get(op)


def infer(node: fx.Node, ctx: Context) -> Inferred:
    """Apply ``node``'s rule; raises NoRule."""
    rule = RULES.get(node.target)
    if rule is None:
        raise NoRule(f"{node.name}: no rule for {node.target}")
    return rule(node, ctx)


def unsupported_ops(graph: fx.Graph) -> list[str]:
    """Forward-phase ops outside the MoE dispatch stage that have no token-axis rule (sorted, unique)."""
    missing = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target in RULES:
            continue
        if meta.phase(node) != meta.FORWARD or meta.is_dispatch(node):
            continue
        if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            continue  # Python scalar arithmetic on sizes
        missing.add(str(node.target))
    return sorted(missing)

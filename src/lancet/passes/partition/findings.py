"""What the range search could not do, as data: reports name the op, the node and the module.

A ``Finding`` is one reason a partition found less than it might have:

- ``no_moe_layer``: the forward graph has no MoE layer (no pair of token
  all-to-alls, no marked dispatch stage), so there is nothing to pipeline;
- ``no_range``: a MoE layer has no candidate range (no point around it where
  only one token value is live);
- ``no_rule``: a node inside a candidate range has no token-axis rule (or its
  inputs' axes disagree): it runs whole, on the gathered tokens, and so cuts the
  per-part pipeline short there;
- ``not_partitionable``: the rewrite refused a candidate range (its message);
- ``no_gain``: candidates exist but none shortens the simulated forward.

``lancet optimize`` prints them and ``lancet inspect`` lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import fx

from lancet.graph import meta

NO_MOE_LAYER, NO_RANGE, NO_RULE, NOT_PARTITIONABLE, NO_GAIN = (
    "no_moe_layer", "no_range", "no_rule", "not_partitionable", "no_gain",
)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    message: str
    node: str = ""
    op: str = ""
    module: str = ""
    source: str = ""
    """The user's source line that made the node (from its stack trace), when known."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Finding:
        return cls(**data)

    def line(self) -> str:
        where = ", ".join(x for x in (self.op and f"op {self.op}", self.node and f"node {self.node}",
                                      self.module and f"module {self.module}", self.source) if x)
        return f"{self.kind}: {self.message}" + (f" ({where})" if where else "")


def node_module(node: fx.Node) -> str:
    """The module that made ``node``: lancet's capture annotation, else fx's ``nn_module_stack``."""
    name = meta.module(node)
    if name:
        return name
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed([path for path, _ in stack.values()]), "") if stack else ""


def node_source(node: fx.Node) -> str:
    """``file:line: code`` of the innermost frame of the node's stack trace ("" without one)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if not frames:
        return ""
    i = frames[-1]
    where = lines[i].removeprefix("File ").replace('"', "").split(", in ")[0].replace(", line ", ":")
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return f"{where}: {code}" if code else where


def about(node: fx.Node, kind: str, message: str) -> Finding:
    return Finding(kind=kind, message=message, node=node.name, op=str(node.target), module=node_module(node),
                   source=node_source(node))


def unique_by_op(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, op, module): a rule missing for one op is reported once per module."""
    seen, out = set(), []
    for finding in findings:
        key = (finding.kind, finding.op, finding.module, "" if finding.op else finding.message)
        if key not in seen:
            seen.add(key)
            out.append(finding)
    return out

"""Every rank runs the same thing: run settings, plan and step graph agree with rank 0's before training.

Ranks started by torchrun on several nodes each parse their own command line
and read their own plan file; a node with another plan (or a plan that applies
differently to its capture) would issue collectives in another order and hang
the job, or train a different model. So each rank hashes three things, the run
settings that decide the numbers, the plan file's bytes and variant, and the
fingerprint of the step graph it will run (node order included), and one
all-gather of three integers compares them with rank 0's. Any difference stops
every rank with a message naming the ranks and what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankDisagreement(RuntimeError):
    """Ranks hold different run settings, plans or step graphs."""


@dataclass(frozen=True, slots=True)
class RankFacts:
    """What must agree across ranks, as short digests."""

    settings: str
    plan: str
    graph: str

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([int(v[:15], 16) for v in (self.settings, self.plan, self.graph)], dtype=torch.int64)


def digest(value) -> str:
    """Hex digest of a JSON-serialisable value or of bytes."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def check_agreement(facts: RankFacts, group: dist.ProcessGroup, device: torch.device) -> None:
    """Collective: raise RankDisagreement on every rank unless every rank's facts equal rank 0's."""
    mine = facts.as_tensor().to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    reference = gathered[0].tolist()
    labels = ("run settings", "plan", "step graph")
    problems = []
    for rank, values in enumerate(gathered[1:], 1):
        differing = [label for label, a, b in zip(labels, values.tolist(), reference) if a != b]
        if differing:
            problems.append(f"rank {rank} ({', '.join(differing)})")
    if problems:
        raise RankDisagreement(
            f"ranks disagree with rank 0: {'; '.join(problems)}; every rank must be started with the same "
            "arguments and the same plan file"
        )

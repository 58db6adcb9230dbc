"""Batches: seeded synthetic tokens, or byte-level tokens from local text files.

A batch is ``(tokens_BS, targets_BS)`` with targets the next token. Every
batch is a pure function of (seed, step, rank), so runs are reproducible and
ranks see different data without coordination.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SYNTHETIC = "synthetic"
STDLIB = "stdlib"
"""The default real corpus: this Python's standard library sources (nothing to download)."""
MAX_CORPUS_BYTES = 32 * 1024 * 1024


def resolve_corpus_path(spec: str) -> Path:
    """The file or folder a ``--data`` value names; raises FileNotFoundError if it does not exist."""
    path = Path(sysconfig.get_paths()["stdlib"]) if spec == STDLIB else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    return path


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    pattern = "*.py" if (path / "os.py").exists() else "*"
    return sorted(p for p in path.rglob(pattern) if p.is_file() and "site-packages" not in p.parts)


def read_byte_corpus(path: Path, max_bytes: int = MAX_CORPUS_BYTES) -> Tensor:
    """Concatenated bytes of the files under ``path`` (sorted, capped) as an int64 tensor."""
    chunks: list[bytes] = []
    total = 0
    for file in _corpus_files(path):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    if not blob:
        raise ValueError(f"corpus {str(path)!r} holds no readable bytes")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)


@dataclass(kw_only=True, slots=True)
class BatchSource:
    """Yields per-rank batches of shape (batch_size, seq_len)."""

    batch_size: int
    seq_len: int
    vocab_size: int
    seed: int = 0
    corpus: Tensor | None = None
    """Byte tokens to sample windows from; None gives uniform synthetic tokens."""

    def __post_init__(self) -> None:
        if self.corpus is not None and self.vocab_size < 256:
            raise ValueError(f"byte-level tokens need a vocabulary of at least 256, got {self.vocab_size}")
        if self.corpus is not None and self.corpus.numel() <= self.seq_len + 1:
            raise ValueError(f"corpus of {self.corpus.numel()} bytes is shorter than one sequence ({self.seq_len + 1})")

    def batch(self, step: int, rank: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 65_537 + rank)
        if self.corpus is None:
            window = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=gen)
        else:
            starts = torch.randint(0, self.corpus.numel() - self.seq_len - 1, (self.batch_size,), generator=gen)
            window = torch.stack([self.corpus[s : s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def make_batch_source(spec: str, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> BatchSource:
    """``spec`` is ``synthetic``, ``stdlib`` or a path to a text file or folder."""
    corpus = None if spec == SYNTHETIC else read_byte_corpus(resolve_corpus_path(spec))
    return BatchSource(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, seed=seed, corpus=corpus)

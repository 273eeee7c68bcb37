"""Deterministic synthetic data whose position is part of the training state.

Every batch is a pure function of ``(seed, step, rank)``: a restarted rank
that restores step ``s`` regenerates exactly the batches it would have seen.
The "position" saved in a checkpoint is therefore just the number of batches
consumed, and the data needs no files, no workers and no shuffling state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemini.config import ModelConfig


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (splitmix64-style), not Python's salted hash."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        h ^= h >> 31
    return h & (2**63 - 1)


@dataclass
class SyntheticData:
    """Seeded token streams (gpt) or seeded regression (mlp)."""

    model: ModelConfig
    seed: int
    micro_batch: int
    seq_len: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        # The hidden "teacher" is shared by all ranks: a fixed random linear map
        # (mlp) or a fixed next-token table (gpt), so the loss really falls.
        g = torch.Generator().manual_seed(_mix(self.seed, 0xDA7A))
        if self.model.kind == "mlp":
            self._teacher = (
                torch.randn(self.model.input_dim, self.model.output_dim, generator=g)
                / self.model.input_dim**0.5
            )
        else:
            self._table = torch.randint(
                0, self.model.vocab_size, (self.model.vocab_size,), generator=g
            )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this rank trains on at (1-based) ``step``."""
        g = torch.Generator().manual_seed(_mix(self.seed, step, self.rank, self.world_size))
        if self.model.kind == "mlp":
            x = torch.randn(self.micro_batch, self.model.input_dim, generator=g)
            y = x @ self._teacher + 0.01 * torch.randn(
                self.micro_batch, self.model.output_dim, generator=g
            )
            return x, y
        v = self.model.vocab_size
        n = self.seq_len + 1
        # Mostly follow the teacher table, sometimes jump: a learnable but not
        # trivial stream.
        first = torch.randint(0, v, (self.micro_batch,), generator=g)
        jumps = torch.rand(self.micro_batch, n, generator=g) < 0.1
        noise = torch.randint(0, v, (self.micro_batch, n), generator=g)
        seq = torch.empty(self.micro_batch, n, dtype=torch.long)
        seq[:, 0] = first
        for t in range(1, n):
            seq[:, t] = torch.where(jumps[:, t], noise[:, t], self._table[seq[:, t - 1]])
        return seq[:, :-1], seq[:, 1:]

"""Per-request sampling over a batch of logits: temperature, top-p and a seeded generator per request."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. `max_tokens=None` means: as many as the context allows (capped)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: str) -> torch.Generator:
    """A generator private to one request, so its tokens depend only on its seed, not on its batch-mates."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab])."""
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        temperatures = torch.tensor(
            [params[i].temperature for i in sampled_rows], device=logits.device
        ).unsqueeze(1)
        probs = torch.softmax(logits.index_select(0, index) / temperatures, dim=-1)
        top_ps = [params[i].top_p for i in sampled_rows]
        if any(p < 1.0 for p in top_ps):
            probs = _top_p_filter(probs, torch.tensor(top_ps, device=logits.device).unsqueeze(1))
        for row, i in enumerate(sampled_rows):
            chosen[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return chosen.tolist()


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail outside each row's nucleus; the most likely token always survives."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)

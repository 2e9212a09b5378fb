"""Which variant serves a request: pure logic, no Ray, unit-tested in milliseconds.

Precedence, highest first:

1. ``model`` names a variant (``amalia-dpo``): that variant, whatever its weight (``pinned``).
2. The ``x-amalia-variant`` header names a variant: that variant (``header``); an unknown name is an
   error rather than a silent fallback, so a typo in a test harness is visible.
3. A sticky key (the OpenAI ``user`` field or the ``x-session-id`` header): hashed onto the weights
   (``sticky``), so one conversation keeps talking to one model version.
4. Otherwise a weighted random draw (``weighted``).

Sticky keys use weighted rendezvous hashing: every (key, variant) pair hashes to ``u`` in (0, 1)
and the variant with the smallest ``-ln(u) / weight`` wins. That is an exponential race, so a
variant wins with probability ``weight / sum(weights)``. When the weights change, a key can only
move to a variant whose weight grew relative to the weight of the variant it was on; so it moves
only when it must if one variant's share changes and the others keep their mutual ratios (every
two-variant change, adding a canary, removing a variant). docs/routing.md says what holds in
general.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

_HASH_BYTES = 8
# A double holds 53 bits exactly; more bits would round u up to 1.0 near the top of the range.
_HASH_SHIFT = 8 * _HASH_BYTES - 53
_HASH_SPAN = float(1 << 53)


class RouteReason(str, Enum):
    """Why a variant was chosen; recorded on traces and as the ``route_reason`` metric label."""

    PINNED = "pinned"
    HEADER = "header"
    STICKY = "sticky"
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class RouteDecision:
    variant: str
    reason: RouteReason


class UnknownVariantError(ValueError):
    """A request header names a variant that this application does not serve."""

    def __init__(self, variant: str, variants: Sequence[str]) -> None:
        super().__init__(f"unknown variant {variant!r}; variants are {list(variants)}")
        self.variant = variant


def validate_weights(variants: Sequence[str], weights: Mapping[str, int]) -> dict[str, int]:
    """Checks ``weights`` against ``variants`` and returns every variant's weight, in variant order.

    Variants missing from ``weights`` get 0; empty ``weights`` send all traffic to the first
    variant.
    """
    if not variants:
        raise ValueError("at least one variant is required")
    duplicates = sorted(name for name, count in Counter(variants).items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate variant names: {duplicates}")
    unknown = sorted(set(weights) - set(variants))
    if unknown:
        raise ValueError(f"weights name unknown variants {unknown}; variants are {list(variants)}")
    for name, weight in weights.items():
        # bool is an int subclass; `true` in YAML is a mistake, not a weight of 1.
        if isinstance(weight, bool) or not isinstance(weight, int):
            # ValueError like every other bad weight: callers map one exception to "bad config".
            message = f"weight of {name!r} must be an integer, got {weight!r}"
            raise ValueError(message)  # noqa: TRY004
        if weight < 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {weight}")
    if not weights:
        return {name: int(index == 0) for index, name in enumerate(variants)}
    if sum(weights.values()) == 0:
        raise ValueError(f"at least one weight must be > 0, got {dict(weights)}")
    return {name: weights.get(name, 0) for name in variants}


class TrafficSplit:
    """An immutable split of the model alias over the variants; build another to change weights."""

    __slots__ = ("_cumulative", "_key_hashers", "_live", "_total", "_variants", "_weights")

    def __init__(self, variants: Sequence[str], weights: Mapping[str, int]) -> None:
        self._weights = validate_weights(variants, weights)
        self._variants = frozenset(self._weights)
        # Only variants with weight > 0 take unpinned traffic.
        self._live = tuple((name, w) for name, w in self._weights.items() if w > 0)
        self._cumulative = tuple(itertools.accumulate(w for _, w in self._live))
        self._total = self._cumulative[-1]
        # The variant name is hashed once here; per request only the key bytes are added.
        self._key_hashers = tuple(
            (name, weight, hashlib.blake2b(name.encode() + b"\0", digest_size=_HASH_BYTES))
            for name, weight in self._live
        )

    @property
    def weights(self) -> dict[str, int]:
        """Every variant's effective weight, in variant order (a copy)."""
        return dict(self._weights)

    @property
    def shares(self) -> dict[str, float]:
        """Every variant's fraction of unpinned traffic, in variant order; they sum to 1."""
        return {name: w / self._total for name, w in self._weights.items()}

    def choose(
        self,
        *,
        model: str,
        header_variant: str | None,
        sticky_key: str | None,
        rng: random.Random,
    ) -> RouteDecision:
        """Picks the variant for one request; a ``model`` that names no variant means "route me"."""
        if model in self._variants:
            return RouteDecision(model, RouteReason.PINNED)
        if header_variant:
            if header_variant not in self._variants:
                raise UnknownVariantError(header_variant, tuple(self._weights))
            return RouteDecision(header_variant, RouteReason.HEADER)
        if sticky_key:
            return RouteDecision(self.sticky_variant(sticky_key), RouteReason.STICKY)
        index = bisect.bisect_right(self._cumulative, rng.random() * self._total)
        return RouteDecision(self._live[index][0], RouteReason.WEIGHTED)

    def sticky_variant(self, key: str) -> str:
        """The variant a sticky key lands on: weighted rendezvous hashing over the live variants."""
        data = key.encode()
        best_name, best_score = "", math.inf
        for name, weight, base in self._key_hashers:
            hasher = base.copy()
            hasher.update(data)
            # +0.5 keeps u strictly inside (0, 1), so the logarithm is finite and negative.
            u = ((int.from_bytes(hasher.digest(), "big") >> _HASH_SHIFT) + 0.5) / _HASH_SPAN
            score = -math.log(u) / weight
            if score < best_score:
                best_name, best_score = name, score
        return best_name

    def __repr__(self) -> str:
        return f"TrafficSplit({self._weights})"

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

Shadow traffic (`ShadowPolicy`) is decided here too, after the route and without changing it: a
request routed by sticky key or weighted draw to another variant is copied to the shadow variant
with probability ``percent / 100``. The draw is a hash of the sticky key when there is one (salted
apart from the routing hash, so whether a key is copied says nothing about where it is routed), so
a conversation is either always or never copied, and raising the percent only adds keys.
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
# Prefix of the shadow draw's hash input. A routing hash starts with a variant's name, and no variant name
# has a "/" (config.VARIANT_NAME_PATTERN), so the two never hash the same bytes.
_SHADOW_HASHER = hashlib.blake2b(b"shadow/\0", digest_size=_HASH_BYTES)


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


# Requests that the split routed, as opposed to ones the caller sent to a variant by name.
_ROUTED = frozenset({RouteReason.STICKY, RouteReason.WEIGHTED})


def _unit_draw(hasher: hashlib.blake2b) -> float:
    """The digest's top 53 bits as u in (0, 1); +0.5 keeps u off both ends (a finite logarithm)."""
    return ((int.from_bytes(hasher.digest(), "big") >> _HASH_SHIFT) + 0.5) / _HASH_SPAN


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
            score = -math.log(_unit_draw(hasher)) / weight
            if score < best_score:
                best_name, best_score = name, score
        return best_name

    def __repr__(self) -> str:
        return f"TrafficSplit({self._weights})"


class ShadowPolicy:
    """Which routed requests are also copied to a shadow variant; built with the split and replaced with it."""

    __slots__ = ("_threshold", "percent", "variant")

    def __init__(self, split: TrafficSplit, variant: str, percent: float) -> None:
        if variant not in split.weights:
            raise ValueError(f"shadow variant {variant!r} is not a variant; variants are {list(split.weights)}")
        if not 0 <= percent <= 100:
            raise ValueError(f"shadow percent must lie in [0, 100], got {percent}")
        self.variant = variant
        self.percent = percent
        self._threshold = percent / 100

    def shadows(self, decision: RouteDecision, sticky_key: str | None, rng: random.Random) -> bool:
        """Whether this request, routed by `decision`, is copied to the shadow variant after it is answered.

        Only routed requests are (a request pinned by model name or header asked for its variant), and never
        those the shadow variant answers itself. `sticky_key` is the one the route used: a sticky request's
        draw hashes it, a weighted one draws from `rng`.
        """
        if decision.reason not in _ROUTED or decision.variant == self.variant or self._threshold <= 0:
            return False
        if decision.reason is RouteReason.STICKY and sticky_key:
            hasher = _SHADOW_HASHER.copy()
            hasher.update(sticky_key.encode())
            draw = _unit_draw(hasher)
        else:
            draw = rng.random()
        return draw < self._threshold

    def __repr__(self) -> str:
        return f"ShadowPolicy({self.variant!r}, {self.percent}%)"

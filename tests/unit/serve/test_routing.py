"""Canary routing: precedence, weighted and sticky shares, minimal moves, weight validation, shadow choice.

Share checks use 5-sigma binomial bounds: with n keys and share p the count has
sd = sqrt(n p (1 - p)); at n = 20,000 and p = 0.1 that is 42.4, so the bound is +-212 around 2,000.
A correct router fails one of these with probability ~6e-7; the hash is deterministic anyway, so a
pass is reproducible, and a wrong split (say 88/12, 400 off) fails by about 9 sigma.
"""

from __future__ import annotations

import math
import random

import pytest

from amalia_serve.routing import (
    RouteDecision,
    RouteReason,
    ShadowPolicy,
    TrafficSplit,
    UnknownVariantError,
    validate_weights,
)

SFT, DPO = "amalia-sft", "amalia-dpo"
VARIANTS = (SFT, DPO)
N_KEYS = 20_000
KEYS = [f"user-{i}" for i in range(N_KEYS)]


def _five_sigma(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


def _assert_binomial(count: int, n: int, p: float) -> None:
    bound = _five_sigma(n, p)
    assert abs(count - n * p) <= bound, f"{count} of {n} is not within {n * p:.0f} +- {bound:.0f}"


def _sticky(split: TrafficSplit, keys: list[str] = KEYS) -> list[str]:
    rng = random.Random(0)
    return [
        split.choose(model="amalia", header_variant=None, sticky_key=key, rng=rng).variant
        for key in keys
    ]


# === shares ===


def test_five_sigma_bound_is_212_when_20000_keys_at_10_percent() -> None:
    assert _five_sigma(N_KEYS, 0.1) == pytest.approx(212.1, abs=0.1)


def test_sticky_share_is_within_binomial_bound_when_split_is_90_10() -> None:
    chosen = _sticky(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}))
    _assert_binomial(chosen.count(DPO), N_KEYS, 0.1)
    assert chosen.count(SFT) + chosen.count(DPO) == N_KEYS


def test_weighted_share_is_within_binomial_bound_when_split_is_90_10() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    rng = random.Random(1234)
    decisions = [
        split.choose(model="amalia", header_variant=None, sticky_key=None, rng=rng)
        for _ in range(N_KEYS)
    ]
    assert {d.reason for d in decisions} == {RouteReason.WEIGHTED}
    _assert_binomial(sum(d.variant == DPO for d in decisions), N_KEYS, 0.1)


def test_sticky_shares_follow_weights_when_three_variants() -> None:
    split = TrafficSplit(("a", "b", "c"), {"a": 50, "b": 30, "c": 20})
    chosen = _sticky(split)
    for name, share in split.shares.items():
        _assert_binomial(chosen.count(name), N_KEYS, share)


def test_shares_sum_to_one_and_keep_variant_order_when_weights_are_relative() -> None:
    split = TrafficSplit(VARIANTS, {DPO: 1, SFT: 3})
    assert split.shares == {SFT: 0.75, DPO: 0.25}
    assert list(split.weights) == [SFT, DPO]


# === stickiness ===


def test_sticky_key_keeps_its_variant_when_asked_again_with_other_rngs() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 50, DPO: 50})
    for key in KEYS[:200]:
        first = split.choose(
            model="amalia", header_variant=None, sticky_key=key, rng=random.Random(1)
        )
        again = split.choose(
            model="amalia", header_variant=None, sticky_key=key, rng=random.Random(2)
        )
        assert first == again == RouteDecision(first.variant, RouteReason.STICKY)


def test_sticky_assignment_is_unchanged_when_weights_are_scaled() -> None:
    # Only the ratios matter, so 90/10 and 9/1 are the same split (an operator may write either).
    assert _sticky(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})) == _sticky(
        TrafficSplit(VARIANTS, {SFT: 9, DPO: 1})
    )


GOLDEN_50_50 = [DPO, DPO, DPO, DPO, DPO, DPO, DPO, DPO, SFT, SFT, SFT, DPO, DPO, SFT, DPO, DPO]


def test_sticky_assignment_is_stable_across_releases_when_hash_is_unchanged() -> None:
    # Pinned: a change of hash or scoring reshuffles every live session, so it must be deliberate.
    split = TrafficSplit(VARIANTS, {SFT: 50, DPO: 50})
    assert [split.sticky_variant(f"session-{i}") for i in range(16)] == GOLDEN_50_50


# === minimal moves when weights change ===


def test_only_keys_in_the_moved_share_move_when_90_10_becomes_80_20() -> None:
    before = _sticky(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}))
    after = _sticky(TrafficSplit(VARIANTS, {SFT: 80, DPO: 20}))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert set(moved) == {(SFT, DPO)}, "a key already on the canary must stay there"
    _assert_binomial(len(moved), N_KEYS, 0.1)


def test_only_canary_keys_move_back_when_80_20_becomes_90_10() -> None:
    before = _sticky(TrafficSplit(VARIANTS, {SFT: 80, DPO: 20}))
    after = _sticky(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert set(moved) == {(DPO, SFT)}
    _assert_binomial(len(moved), N_KEYS, 0.1)


def test_keys_only_move_to_the_new_variant_when_a_canary_is_added() -> None:
    before = _sticky(TrafficSplit(("a", "b", "c"), {"a": 50, "b": 50}))
    after = _sticky(TrafficSplit(("a", "b", "c"), {"a": 45, "b": 45, "c": 10}))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert {a for _, a in moved} == {"c"}
    _assert_binomial(len(moved), N_KEYS, 0.1)


def test_only_keys_of_a_removed_variant_move_when_its_weight_drops_to_zero() -> None:
    before = _sticky(TrafficSplit(("a", "b", "c"), {"a": 60, "b": 30, "c": 10}))
    after = _sticky(TrafficSplit(("a", "b", "c"), {"a": 60, "b": 30, "c": 0}))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert {b for b, _ in moved} == {"c"}
    # Leftover keys split in the survivors' ratio, 2:1.
    _assert_binomial(sum(a == "a" for _, a in moved), len(moved), 2 / 3)


def test_keys_only_move_towards_relatively_grown_variants_when_three_weights_change() -> None:
    old, new = {"a": 50, "b": 25, "c": 25}, {"a": 40, "b": 25, "c": 35}
    before = _sticky(TrafficSplit(("a", "b", "c"), old))
    after = _sticky(TrafficSplit(("a", "b", "c"), new))
    growth = {name: new[name] / old[name] for name in old}
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(growth[a] > growth[b] for b, a in moved)
    # Rendezvous hashing moves 1 - J_P of the keys (P-MinHash), here 12.3%; the minimum, the total
    # variation distance, is 10%, and cumulative intervals in a fixed order would move 20%.
    _assert_binomial(len(moved), N_KEYS, 1 - _p_jaccard(old, new))


def _p_jaccard(x: dict[str, int], y: dict[str, int]) -> float:
    """Chance that weighted rendezvous hashing keeps a key where it is (Moulton & Jiang 2018)."""
    px = {k: v / sum(x.values()) for k, v in x.items()}
    py = {k: v / sum(y.values()) for k, v in y.items()}
    return sum(
        1 / sum(max(px[j] / px[i], py[j] / py[i]) for j in px) for i in px if px[i] and py[i]
    )


def test_p_jaccard_is_the_textbook_value_when_50_25_25_becomes_40_25_35() -> None:
    assert _p_jaccard({"a": 50, "b": 25, "c": 25}, {"a": 40, "b": 25, "c": 35}) == pytest.approx(
        0.4 + 1 / 4.4 + 0.25
    )


# === precedence ===


def test_model_name_pins_the_variant_when_header_and_sticky_key_disagree() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 100, DPO: 0})
    decision = split.choose(
        model=DPO, header_variant=SFT, sticky_key="user-1", rng=random.Random(0)
    )
    assert decision == RouteDecision(DPO, RouteReason.PINNED)


def test_pinned_model_wins_when_header_names_an_unknown_variant() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    decision = split.choose(model=SFT, header_variant="nope", sticky_key=None, rng=random.Random(0))
    assert decision == RouteDecision(SFT, RouteReason.PINNED)


def test_header_beats_sticky_key_when_model_is_the_alias() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    for key in KEYS[:100]:
        decision = split.choose(
            model="amalia", header_variant=DPO, sticky_key=key, rng=random.Random(0)
        )
        assert decision == RouteDecision(DPO, RouteReason.HEADER)


def test_unknown_header_variant_raises_when_model_is_the_alias() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    with pytest.raises(UnknownVariantError, match="'amalia-kto'") as caught:
        split.choose(
            model="amalia", header_variant="amalia-kto", sticky_key=None, rng=random.Random()
        )
    assert caught.value.variant == "amalia-kto"
    assert isinstance(caught.value, ValueError)


def test_empty_header_and_sticky_key_count_as_absent_when_routing() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    decision = split.choose(model="amalia", header_variant="", sticky_key="", rng=random.Random(0))
    assert decision.reason is RouteReason.WEIGHTED


def test_route_reason_values_are_the_metric_label_values() -> None:
    assert [r.value for r in RouteReason] == ["pinned", "header", "sticky", "weighted"]
    assert RouteReason.STICKY == "sticky"


# === weight 0 and empty weights ===


def test_zero_weight_variant_gets_no_unpinned_traffic_when_sticky_or_weighted() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 100, DPO: 0})
    assert set(_sticky(split, KEYS[:2000])) == {SFT}
    rng = random.Random(7)
    weighted = {
        split.choose(model="amalia", header_variant=None, sticky_key=None, rng=rng).variant
        for _ in range(2000)
    }
    assert weighted == {SFT}


def test_zero_weight_variant_still_serves_when_pinned_by_model_or_header() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 100, DPO: 0})
    rng = random.Random(0)
    assert split.choose(model=DPO, header_variant=None, sticky_key=None, rng=rng).variant == DPO
    by_header = split.choose(model="amalia", header_variant=DPO, sticky_key=None, rng=rng)
    assert by_header == RouteDecision(DPO, RouteReason.HEADER)


def test_all_traffic_goes_to_the_first_variant_when_weights_are_empty() -> None:
    split = TrafficSplit(VARIANTS, {})
    assert split.shares == {SFT: 1.0, DPO: 0.0}
    assert set(_sticky(split, KEYS[:500])) == {SFT}


def test_missing_variants_get_weight_zero_when_weights_name_a_subset() -> None:
    assert validate_weights(("a", "b", "c"), {"b": 5}) == {"a": 0, "b": 5, "c": 0}


def test_weights_property_is_a_copy_when_caller_mutates_it() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    split.weights[SFT] = 0
    assert split.weights == {SFT: 90, DPO: 10}


# === validation ===


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({SFT: -1, DPO: 10}, "weight of 'amalia-sft' must be >= 0"),
        ({SFT: 0, DPO: 0}, "at least one weight must be > 0"),
        ({SFT: 90, "amalia-kto": 10}, r"unknown variants \['amalia-kto'\]"),
        ({SFT: 90, DPO: 2.5}, "weight of 'amalia-dpo' must be an integer"),
        ({SFT: True}, "weight of 'amalia-sft' must be an integer"),
    ],
)
def test_split_raises_naming_the_culprit_when_weights_are_invalid(
    weights: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TrafficSplit(VARIANTS, weights)


def test_split_raises_when_variant_names_repeat() -> None:
    with pytest.raises(ValueError, match=r"duplicate variant names: \['a'\]"):
        validate_weights(("a", "b", "a"), {})


def test_split_raises_when_there_are_no_variants() -> None:
    with pytest.raises(ValueError, match="at least one variant"):
        TrafficSplit((), {})


# === shadow traffic ===

STICKY_TO_SFT = RouteDecision(SFT, RouteReason.STICKY)
WEIGHTED_TO_SFT = RouteDecision(SFT, RouteReason.WEIGHTED)


def _shadowed_keys(policy: ShadowPolicy, keys: list[str] = KEYS) -> set[str]:
    rng = random.Random(0)
    return {key for key in keys if policy.shadows(STICKY_TO_SFT, key, rng)}


def _shadowed_draws(policy: ShadowPolicy, n: int = N_KEYS, seed: int = 0) -> int:
    rng = random.Random(seed)
    return sum(policy.shadows(WEIGHTED_TO_SFT, None, rng) for _ in range(n))


@pytest.mark.parametrize("percent", [0.0, 100.0])
def test_shadow_copies_none_or_all_routed_requests_when_percent_is_0_or_100(percent: float) -> None:
    policy = ShadowPolicy(TrafficSplit(VARIANTS, {SFT: 100, DPO: 0}), DPO, percent)
    expected = N_KEYS if percent else 0
    assert len(_shadowed_keys(policy)) == expected
    assert _shadowed_draws(policy) == expected


def test_shadow_share_is_within_binomial_bound_when_percent_is_5() -> None:
    policy = ShadowPolicy(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}), DPO, 5.0)
    _assert_binomial(len(_shadowed_keys(policy)), N_KEYS, 0.05)  # 1000 +- 154
    _assert_binomial(_shadowed_draws(policy), N_KEYS, 0.05)


def test_shadow_choice_of_a_sticky_key_never_changes_when_asked_again_with_other_rngs() -> None:
    policy = ShadowPolicy(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}), DPO, 5.0)
    first = _shadowed_keys(policy, KEYS[:4000])
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        assert {key for key in KEYS[:4000] if policy.shadows(STICKY_TO_SFT, key, rng)} == first


def test_keys_shadowed_at_5_percent_stay_shadowed_when_percent_rises_to_10() -> None:
    split = TrafficSplit(VARIANTS, {SFT: 90, DPO: 10})
    at_5, at_10 = (_shadowed_keys(ShadowPolicy(split, DPO, p)) for p in (5.0, 10.0))
    assert at_5 < at_10
    _assert_binomial(len(at_10), N_KEYS, 0.10)


def test_shadow_choice_is_independent_of_the_route_when_keys_are_split_50_50() -> None:
    # The shadow draw is salted apart from the routing hash: each variant's keys are shadowed at 5%.
    split = TrafficSplit(("amalia-sft", "amalia-kto", DPO), {SFT: 50, "amalia-kto": 50, DPO: 0})
    policy = ShadowPolicy(split, DPO, 5.0)
    by_variant: dict[str, list[str]] = {SFT: [], "amalia-kto": []}
    for key in KEYS:
        by_variant[split.sticky_variant(key)].append(key)
    for variant, keys in by_variant.items():
        rng = random.Random(0)
        decision = RouteDecision(variant, RouteReason.STICKY)
        shadowed = sum(policy.shadows(decision, key, rng) for key in keys)
        _assert_binomial(shadowed, len(keys), 0.05)


@pytest.mark.parametrize(
    "decision",
    [
        RouteDecision(SFT, RouteReason.PINNED),
        RouteDecision(SFT, RouteReason.HEADER),
        RouteDecision(DPO, RouteReason.PINNED),
        RouteDecision(DPO, RouteReason.STICKY),
        RouteDecision(DPO, RouteReason.WEIGHTED),
    ],
)
def test_shadow_never_copies_pinned_requests_or_the_shadow_variants_own_when_percent_is_100(
    decision: RouteDecision,
) -> None:
    policy = ShadowPolicy(TrafficSplit(VARIANTS, {SFT: 50, DPO: 50}), DPO, 100.0)
    rng = random.Random(0)
    assert not any(policy.shadows(decision, key, rng) for key in KEYS[:500])


@pytest.mark.parametrize(
    ("variant", "percent", "message"),
    [
        ("amalia-kto", 5.0, "shadow variant 'amalia-kto' is not a variant"),
        (DPO, -1.0, r"must lie in \[0, 100\]"),
        (DPO, 100.5, r"must lie in \[0, 100\]"),
        (DPO, math.nan, r"must lie in \[0, 100\]"),
    ],
)
def test_shadow_policy_raises_when_variant_unknown_or_percent_out_of_range(
    variant: str, percent: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowPolicy(TrafficSplit(VARIANTS, {SFT: 90, DPO: 10}), variant, percent)

"""The engine-load autoscaling decision on tables of signals, and the config that selects it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from amalia_serve.autoscaling import (
    BATCH_SLOTS,
    ENGINE_LOAD_POLICY,
    KV_CACHE_USAGE,
    STATS_KEYS,
    PolicyKnobs,
    Reason,
    ReplicaLoad,
    ScalingSignals,
    decide,
    replica_stats,
)
from amalia_serve.config import AutoscalingOptions, DeploymentOptions

KNOBS = PolicyKnobs(target_waiting_per_replica=2, target_kv_cache_usage=0.8)
TARGET_ONGOING = 16.0


def load(running: float, waiting: float, kv: float, slots: float = 16) -> ReplicaLoad:
    return ReplicaLoad(running=running, waiting=waiting, kv_cache_usage=kv, batch_slots=slots)


def signals(
    *reported: ReplicaLoad,
    current: int | None = None,
    bounds: tuple[int, int] = (1, 4),
    handle_queued: float = 0.0,
    ongoing: float = 0.0,
) -> ScalingSignals:
    return ScalingSignals(
        current_replicas=len(reported) if current is None else current,
        min_replicas=bounds[0],
        max_replicas=bounds[1],
        reported=reported,
        handle_queued=handle_queued,
        ongoing=ongoing,
    )


# === decide: one row per situation ===

CASES = [
    pytest.param(
        signals(load(1, 0, 0.02), ongoing=1), 1, Reason.KV_CACHE, id="one-stream-holds-one-replica"
    ),
    pytest.param(
        signals(load(0, 0, 0), load(0, 0, 0)), 1, Reason.IDLE, id="idle-falls-to-min-replicas"
    ),
    pytest.param(
        signals(load(0, 0, 0), bounds=(0, 2)), 0, Reason.IDLE, id="idle-scales-to-zero-when-min-0"
    ),
    pytest.param(
        signals(load(16, 24, 0.3), ongoing=40),
        3,
        Reason.WAITING,
        id="queue-beyond-target-adds-replicas",
    ),
    pytest.param(
        signals(load(16, 24, 0.3), bounds=(1, 2), ongoing=40),
        2,
        Reason.WAITING,
        id="queue-bounded-by-max",
    ),
    pytest.param(
        signals(load(16, 2, 0.2), ongoing=18),
        1,
        Reason.KV_CACHE,
        id="queue-within-tolerance-adds-nothing",
    ),
    pytest.param(
        signals(load(4, 0, 0.9), load(4, 0, 0.9), ongoing=8),
        3,
        Reason.KV_CACHE,
        id="long-generations-fill-kv-before-anyone-waits",
    ),
    pytest.param(
        signals(load(16, 0, 0.05), load(16, 0, 0.05), ongoing=32),
        2,
        Reason.BATCH_SLOTS,
        id="short-chats-in-full-batches-keep-their-replicas",
    ),
    pytest.param(
        signals(load(4, 0, 0.02, slots=8), load(4, 0, 0.02, slots=8), ongoing=15),
        2,
        Reason.BATCH_SLOTS,
        id="requests-between-engine-and-caller-still-hold-slots",
    ),
    pytest.param(
        signals(load(16, 0, 0.05, slots=0), load(16, 0, 0.05, slots=0), ongoing=32),
        1,
        Reason.KV_CACHE,
        id="unknown-batch-size-casts-no-slot-vote",
    ),
    pytest.param(
        signals(load(4, 0, 0.1), load(3, 0, 0.1), load(2, 0, 0.1), ongoing=9),
        1,
        Reason.KV_CACHE,
        id="light-load-on-three-replicas-needs-one",
    ),
    pytest.param(
        signals(load(16, 0, 0.3), load(16, 0, 0.3), handle_queued=20, ongoing=52),
        3,
        Reason.WAITING,
        id="requests-queued-at-handles-count-as-waiting",
    ),
    pytest.param(
        signals(load(0, 0, 0.0, slots=8), handle_queued=2, ongoing=2),
        1,
        Reason.BATCH_SLOTS,
        id="backlog-of-a-cold-start-fits-the-free-slots",
    ),
    pytest.param(
        signals(load(0, 0, 0.0, slots=0), handle_queued=4, ongoing=4),
        3,
        Reason.WAITING,
        id="handle-queue-counts-whole-when-batch-size-unknown",
    ),
    pytest.param(
        signals(load(16, 10, 0.3), current=2, ongoing=52),
        3,
        Reason.WAITING,
        id="replicas-without-stats-carry-the-mean-load",
    ),
    pytest.param(
        signals(current=2, ongoing=40),
        3,
        Reason.ONGOING,
        id="no-engine-stats-falls-back-to-ongoing",
    ),
    pytest.param(
        signals(current=2, ongoing=0), 1, Reason.IDLE, id="no-engine-stats-and-no-requests"
    ),
    pytest.param(
        # 0.8 * 3 / 0.8 is 3.0000000000000004 in floats.
        signals(load(4, 0, 0.8), load(4, 0, 0.8), load(4, 0, 0.8), ongoing=12),
        3,
        Reason.KV_CACHE,
        id="replicas-at-the-kv-target-hold-their-count",
    ),
    pytest.param(
        signals(load(8, 7, 0.9), ongoing=15),
        2,
        Reason.WAITING,
        id="tie-between-votes-goes-to-waiting",
    ),
]


@pytest.mark.parametrize(("given", "replicas", "reason"), CASES)
def test_decide_wants_replicas_for_reason_when_signals_given(
    given: ScalingSignals, replicas: int, reason: Reason
) -> None:
    decision = decide(given, KNOBS, TARGET_ONGOING)
    assert (decision.replicas, decision.reason) == (replicas, reason), decision.detail


def test_decide_detail_names_bounds_when_capped() -> None:
    decision = decide(signals(load(16, 24, 0.3), bounds=(1, 2)), KNOBS, TARGET_ONGOING)
    assert decision.detail.startswith("waiting: 2 replicas (")
    assert "wanted 3, bounded to [1, 2]" in decision.detail
    assert "waiting 24.0 (target 2/replica, 0.0 at handles)" in decision.detail
    assert "1/1 replicas reported" in decision.detail


def test_decide_detail_says_fallback_when_no_engine_stats() -> None:
    decision = decide(signals(current=2, ongoing=40), KNOBS, TARGET_ONGOING)
    assert decision.detail == (
        "ongoing_fallback: 3 replicas (no engine stats from 2 replicas: 40.0 ongoing requests "
        "/ target 16 per replica)"
    )


def test_decide_scales_on_one_waiting_request_when_waiting_target_is_zero() -> None:
    strict = PolicyKnobs(target_waiting_per_replica=0, target_kv_cache_usage=0.8)
    one_waiting = signals(load(8, 1, 0.3))
    assert decide(one_waiting, strict, TARGET_ONGOING).replicas == 2
    assert decide(one_waiting, KNOBS, TARGET_ONGOING).replicas == 1


# === the replica's stats contract ===


def test_replica_stats_round_trip_through_replica_load() -> None:
    stats = replica_stats(running=3, waiting=1, kv_cache_usage=0.25, batch_slots=16)
    assert set(stats) == set(STATS_KEYS)
    assert all(isinstance(v, float) for v in stats.values())
    assert ReplicaLoad.from_stats(stats) == load(3, 1, 0.25, 16)


def test_replica_load_is_none_when_a_required_key_is_missing() -> None:
    stats = replica_stats(running=3, waiting=1, kv_cache_usage=0.25, batch_slots=16)
    del stats[KV_CACHE_USAGE]
    assert ReplicaLoad.from_stats(stats) is None


def test_replica_load_has_no_slots_when_batch_size_is_unknown() -> None:
    stats = replica_stats(running=3, waiting=1, kv_cache_usage=0.25, batch_slots=None)
    assert BATCH_SLOTS not in stats
    assert ReplicaLoad.from_stats(stats) == load(3, 1, 0.25, 0)


# === knobs and options ===


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"target_kv_cache_usage": 0}, "greater than 0"),
        ({"target_kv_cache_usage": 1.5}, "less than or equal to 1"),
        ({"target_waiting_per_replica": -1}, "greater than or equal to 0"),
        ({"target_waiting": 2}, "Extra inputs are not permitted"),
    ],
)
def test_policy_knobs_refused_when_out_of_range(knobs: dict[str, float], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PolicyKnobs.model_validate(knobs)


def test_autoscaling_options_render_engine_load_policy_with_its_knobs() -> None:
    options = AutoscalingOptions(
        min_replicas=0, max_replicas=4, target_kv_cache_usage=0.7, downscale_delay_s=120
    )
    assert options.serve_config() == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 16.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 120.0,
        "look_back_period_s": 30.0,
        "policy": {
            "policy_function": ENGINE_LOAD_POLICY,
            "policy_kwargs": {"target_waiting_per_replica": 2.0, "target_kv_cache_usage": 0.7},
        },
    }


def test_autoscaling_options_render_no_policy_when_stock_policy_chosen() -> None:
    config = AutoscalingOptions(max_replicas=2, policy="ongoing_requests").serve_config()
    assert "policy" not in config
    assert "target_kv_cache_usage" not in config and "target_waiting_per_replica" not in config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas 2 is below min_replicas 3"),
        ({"max_replicas": 2, "initial_replicas": 3}, r"initial_replicas 3 is outside \[1, 2\]"),
        ({"min_replicas": 1}, "max_replicas"),
        ({"max_replicas": 2, "policy": "queue"}, "engine_load"),
        ({"max_replicas": 2, "smoothing_factor": 1}, "Extra inputs are not permitted"),
        (
            {"max_replicas": 2, "metrics_interval_s": 30, "look_back_period_s": 30},
            "metrics_interval_s 30.0 must be below look_back_period_s 30.0",
        ),
        ({"max_replicas": 2, "target_kv_cache_usage": 2}, "less than or equal to 1"),
    ],
)
def test_autoscaling_options_refused_with_clear_message_when_invalid(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        AutoscalingOptions.model_validate(options)


def test_deployment_options_pass_rendered_autoscaling_to_serve() -> None:
    options = DeploymentOptions.model_validate(
        {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}
    ).serve_options()
    assert options["autoscaling_config"]["policy"]["policy_function"] == ENGINE_LOAD_POLICY
    assert "num_replicas" not in options

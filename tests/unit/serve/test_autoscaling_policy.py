"""The engine-load policy as Ray Serve 2.60 loads and calls it, without a cluster.

Serve's own code does the work here: `AutoscalingConfig` imports the policy by its path and
pickles it by value, `_resolve_policy_callable` builds the instance with the knobs as keyword
arguments (what the controller does per deployment), and `_apply_autoscaling_config` wraps it
with the delays and scaling factors, exactly as the controller calls it on every tick.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from amalia_serve.autoscaling import PolicyKnobs, replica_stats
from amalia_serve.autoscaling_policy import (
    EngineLoadPolicy,
    signals_from_context,
)
from amalia_serve.config import AutoscalingOptions

VARIANT = DeploymentID(name="amalia-sft", app_name="amalia-sft")
Policy = Callable[[AutoscalingContext], tuple[int, dict[str, Any]]]


def serve_config(**options: Any) -> AutoscalingConfig:
    """Serve's config parsed from what DeploymentOptions hands to `Deployment.options`."""
    rendered = AutoscalingOptions.model_validate({"max_replicas": 4, **options}).serve_config()
    return AutoscalingConfig(**rendered)


def replica(index: int) -> ReplicaID:
    return ReplicaID(unique_id=f"r{index}", deployment_id=VARIANT)


def context(
    config: AutoscalingConfig,
    loads: list[dict[str, float] | None],
    target: int | None = None,
    queued: float = 0.0,
    ongoing: float = 0.0,
) -> AutoscalingContext:
    """A tick's context: `loads[i]` is replica i's look-back mean stats, None if it sent none."""
    replicas = [replica(i) for i in range(len(loads))]
    aggregated: dict[str, dict[ReplicaID, float]] = {}
    for replica_id, stats in zip(replicas, loads, strict=True):
        for key, value in (stats or {}).items():
            aggregated.setdefault(key, {})[replica_id] = value
    # Serve's own ongoing-requests key sits in the same map; the policy must ignore it.
    aggregated["running_requests"] = {r: 1.0 for r in replicas}
    return AutoscalingContext(
        deployment_id=VARIANT,
        deployment_name=VARIANT.name,
        app_name=VARIANT.app_name,
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas) if target is None else target,
        running_replicas=replicas,
        total_num_requests=ongoing,
        total_queued_requests=queued,
        aggregated_metrics=aggregated,
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def controller_policy(config: AutoscalingConfig) -> Policy:
    policy: Policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    return policy


def stats(running: int, waiting: int, kv: float, slots: int = 16) -> dict[str, float]:
    return replica_stats(running=running, waiting=waiting, kv_cache_usage=kv, batch_slots=slots)


def test_serve_builds_the_policy_with_the_configured_knobs() -> None:
    config = serve_config(target_waiting_per_replica=4, target_kv_cache_usage=0.6)
    assert config.policy.policy_function == "amalia_serve.autoscaling_policy:EngineLoadPolicy"
    policy = _resolve_policy_callable(config.policy)
    assert isinstance(policy, EngineLoadPolicy)
    assert policy.knobs == PolicyKnobs(target_waiting_per_replica=4, target_kv_cache_usage=0.6)


def test_serve_refuses_the_policy_when_knobs_are_unknown() -> None:
    rendered = AutoscalingOptions(max_replicas=2).serve_config()
    rendered["policy"]["policy_kwargs"]["target_waiting"] = 3
    config = AutoscalingConfig(**rendered)
    with pytest.raises(ValueError, match="target_waiting"):
        _resolve_policy_callable(config.policy)


def test_signals_from_context_read_each_replicas_stats_and_skip_silent_ones() -> None:
    config = serve_config()
    full = [stats(16, 4, 0.5), None, stats(16, 0, 0.3)]
    signals = signals_from_context(context(config, full, queued=5, ongoing=59))
    assert signals.current_replicas == 3
    assert len(signals.reported) == 2
    # The silent replica counts at the mean load; every slot is taken, so the handle queue waits.
    assert signals.running == pytest.approx(32 * 3 / 2)
    assert signals.waiting == pytest.approx(4 * 3 / 2 + 5)
    assert signals.kv_cache_usage == pytest.approx(0.4)
    assert (signals.handle_queued, signals.ongoing) == (5, 59)
    assert (signals.min_replicas, signals.max_replicas) == (1, 4)


def test_policy_scales_up_on_waiting_requests_when_serve_delay_is_zero() -> None:
    config = serve_config(upscale_delay_s=0)
    replicas, _ = controller_policy(config)(context(config, [stats(16, 24, 0.3)]))
    assert replicas == 3


def test_policy_waits_for_serves_upscale_delay_before_scaling() -> None:
    config = serve_config(upscale_delay_s=3600)
    policy = controller_policy(config)
    replicas, state = policy(context(config, [stats(16, 24, 0.3)]))
    assert replicas == 1
    # Serve's own delay bookkeeping is what the state carries back to the next tick.
    assert state and all(key.startswith("__") for key in state)


def test_policy_scales_to_zero_when_idle_and_min_is_zero() -> None:
    config = serve_config(min_replicas=0, downscale_delay_s=0)
    replicas, _ = controller_policy(config)(context(config, [stats(0, 0, 0.0)]))
    assert replicas == 0


def test_policy_falls_back_to_ongoing_requests_when_no_replica_reports() -> None:
    config = serve_config(upscale_delay_s=0, target_ongoing_requests=8)
    replicas, _ = controller_policy(config)(context(config, [None, None], ongoing=30))
    assert replicas == 4


def test_policy_logs_each_change_of_decision_once(caplog: pytest.LogCaptureFixture) -> None:
    config = serve_config(upscale_delay_s=0)
    policy = controller_policy(config)
    caplog.set_level(logging.INFO, logger="ray.serve.amalia_serve.autoscaling_policy")
    busy = context(config, [stats(16, 24, 0.3)])
    for _ in range(3):
        policy(busy)
    policy(context(config, [stats(1, 0, 0.02)]))
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("autoscaling_policy")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("autoscaling amalia-sft (target now 1): waiting: 3 replicas (")
    assert lines[1].startswith("autoscaling amalia-sft (target now 1): kv_cache: 1 replica (")


def test_pickled_policy_builds_in_a_fresh_process_like_the_controller(tmp_path: Path) -> None:
    # Serve pickles the policy module by value where it parses the config and unpickles it in the
    # controller; within one process cloudpickle hands back the original class, so check another.
    pickled = tmp_path / "policy.pkl"
    serialized = serve_config().policy.get_serialized_policy_def()
    assert serialized
    pickled.write_bytes(serialized)
    script = f"""
import cloudpickle
cls = cloudpickle.loads(open({str(pickled)!r}, "rb").read())
assert cls.__module__ == "amalia_serve.autoscaling_policy", cls.__module__
print(cls(target_waiting_per_replica=2).knobs.model_dump_json())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '{"target_waiting_per_replica":2.0,"target_kv_cache_usage":0.8}'

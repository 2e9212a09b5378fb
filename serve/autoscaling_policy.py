"""The engine-load policy wired into Ray Serve: reads the AutoscalingContext, decides, says why.

``AutoscalingOptions.serve_config`` names `EngineLoadPolicy` in a deployment's
``autoscaling_config.policy`` with the `PolicyKnobs` as ``policy_kwargs``. Serve imports this
module where it parses the config, pickles the class by value, and in its controller creates one
instance per deployment, then calls it on every control-loop tick (about ten times a second).
Serve wraps the call: it applies the upscale/downscale delays and scaling factors to the count
returned here and clamps it to the replica bounds again; it also scales a deployment from zero on
the first request without asking the policy. The decision itself is `amalia_serve.autoscaling.decide`.

Why each decision was taken is visible two ways: a log line in the Serve controller's log whenever
the wanted count or its reason changes, and metrics exported from the controller (Ray prefixes
``ray_``; see `EXPORTED_METRIC_NAMES`). Every metric carries ``variant``, the deployment's name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray.util.metrics import Counter, Gauge

from amalia_serve.autoscaling import (
    STATS_KEYS,
    Decision,
    PolicyKnobs,
    ReplicaLoad,
    ScalingSignals,
    decide,
)

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

# Serve's controller logs everything under "ray.serve" to its own log file.
logger = logging.getLogger(f"ray.serve.{__name__}")

SIGNAL = "amalia_autoscaling_signal"
DESIRED_REPLICAS = "amalia_autoscaling_desired_replicas"
DECISIONS = "amalia_autoscaling_decisions"
EXPORTED_METRIC_NAMES = frozenset(
    {f"ray_{SIGNAL}", f"ray_{DESIRED_REPLICAS}", f"ray_{DECISIONS}_total"}
)
# Values of the `signal` label, one gauge series each; the targets sit next to what they bound.
SIGNALS = (
    "waiting",
    "waiting_tolerated",
    "handle_queued",
    "running",
    "batch_slots",
    "kv_cache_usage",
    "kv_cache_usage_target",
    "ongoing",
)


def signals_from_context(ctx: AutoscalingContext) -> ScalingSignals:
    """The decision's input: Serve's look-back means of each running replica's engine stats."""
    metrics: dict[str, dict[Any, float]] = ctx.aggregated_metrics or {}
    reported = []
    for replica in ctx.running_replicas:
        stats = {
            key: metrics[key][replica] for key in STATS_KEYS if replica in metrics.get(key, {})
        }
        load = ReplicaLoad.from_stats(stats)
        if load is not None:
            reported.append(load)
    return ScalingSignals(
        current_replicas=ctx.current_num_replicas,
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
        reported=tuple(reported),
        handle_queued=ctx.total_queued_requests or 0.0,
        ongoing=ctx.total_num_requests,
    )


class EngineLoadPolicy:
    """Serve custom autoscaling policy; Serve builds it with the `PolicyKnobs` as keyword arguments."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.knobs = PolicyKnobs.model_validate(policy_kwargs)
        self._last: tuple[int, str] | None = None
        self._signal = Gauge(
            SIGNAL,
            description="What the autoscaling policy saw, by `signal`: waiting (engine queues plus "
            "handle queues beyond free batch slots) and waiting_tolerated (target x replicas), handle_queued, running, batch_slots "
            "(per replica), kv_cache_usage (mean 0-1) and its target, ongoing (Serve's count).",
            tag_keys=("variant", "signal"),
        )
        self._desired = Gauge(
            DESIRED_REPLICAS,
            description="Replicas the autoscaling policy wants, before Serve's delays.",
            tag_keys=("variant",),
        )
        self._decisions = Counter(
            DECISIONS,
            description="Changes of the wanted replica count, by the vote that set it and by direction "
            "against Serve's current target (up, down, hold).",
            tag_keys=("variant", "reason", "direction"),
        )

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        # Serve always passes the deployment's AutoscalingConfig; the annotation allows None.
        assert ctx.config is not None
        signals = signals_from_context(ctx)
        decision = decide(signals, self.knobs, ctx.config.get_target_ongoing_requests())
        self._explain(ctx.deployment_name, ctx.target_num_replicas, signals, decision)
        # This instance keeps what it needs; Serve's policy_state holds only its delay bookkeeping.
        return decision.replicas, {}

    def _explain(
        self, variant: str, target: int, signals: ScalingSignals, decision: Decision
    ) -> None:
        values = (
            signals.waiting,
            self.knobs.target_waiting_per_replica * signals.current_replicas,
            signals.handle_queued,
            signals.running,
            signals.batch_slots,
            signals.kv_cache_usage,
            self.knobs.target_kv_cache_usage,
            signals.ongoing,
        )
        for name, value in zip(SIGNALS, values, strict=True):
            self._signal.set(value, tags={"variant": variant, "signal": name})
        self._desired.set(decision.replicas, tags={"variant": variant})
        key = (decision.replicas, decision.reason.value)
        if key == self._last:
            return
        if self._last is not None and decision.replicas != self._last[0]:
            direction = (
                "up"
                if decision.replicas > target
                else "down"
                if decision.replicas < target
                else "hold"
            )
            self._decisions.inc(
                1,
                tags={"variant": variant, "reason": decision.reason.value, "direction": direction},
            )
        self._last = key
        logger.info("autoscaling %s (target now %d): %s", variant, target, decision.detail)

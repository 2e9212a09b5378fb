"""How many replicas a variant needs, from what its engines report: pure logic, no Ray, no torch.

Serve's stock policy counts ongoing requests per replica. For an LLM that count cannot tell 30
short chats from 30 long generations, nor a replica with free batch slots from one whose KV cache
is full. This policy asks the engines instead. Each variant replica reports its running and
waiting requests, its KV-cache usage and, when it knows it, its batch size (see "The replica's
side" below); the policy turns them into three votes, each a replica count, and takes the largest:

- ``waiting``: the requests waiting for a batch slot (in the engines, plus those queued at the
  callers' handles that the running replicas' free batch slots cannot take) beyond
  ``target_waiting_per_replica`` per replica need more replicas. Each new replica is assumed to
  take as many requests as a replica runs now, which is what the current mix of prompt and output
  lengths allows. This vote only ever asks for more.
- ``kv_cache``: enough replicas to bring the mean KV-cache usage down to ``target_kv_cache_usage``
  (``ceil(sum of usage / target)``). Long generations fill the cache before any request waits,
  so this vote scales up before vLLM starts preempting; it also says when fewer replicas would do.
- ``batch_slots``: enough replicas for every request they hold, other than the waiting ones the
  first vote counts, to have a batch slot (``ceil((ongoing - waiting) / slots per replica)``, with
  Serve's count of ongoing requests). It holds replicas that are busy with many short requests
  that use little KV cache, so removing one would only create a queue. The engines' own running
  count would undercount: a short request spends a good part of its life between the engine and
  the caller (measured on the CPU demo: 8 running of about 15 ongoing). Replicas that do not
  report their batch size cast no such vote.

When no running replica reported engine stats (they are starting, or their stats call fails),
the policy falls back to Serve's own rule on ongoing requests: ``ceil(ongoing /
target_ongoing_requests)``. The result is clamped to Serve's replica bounds. Serve then applies
its ``upscale_delay_s`` / ``downscale_delay_s`` and scaling factors before it acts, and brings a
deployment at zero replicas back on the first request itself, before any policy runs.

The replica's side
------------------
``VariantServer`` reports its engine to Serve with this method (Serve 2.60 calls a deployment's
``record_autoscaling_stats`` every ``min(look_back_period_s * 0.2, 10)`` seconds, time-averages
each key over ``look_back_period_s`` per replica, and hands the result to the policy as
``AutoscalingContext.aggregated_metrics[key][replica_id]``)::

    async def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        return replica_stats(running=stats.running, waiting=stats.waiting,
                             kv_cache_usage=stats.kv_cache_usage, batch_slots=<max_num_seqs or None>)

Values must be ints or floats: Serve checks the first answer and, if any value is of another
type, stops collecting custom stats for that replica for good.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

# What Serve imports as the policy (`autoscaling_config.policy.policy_function`): the Serve wiring.
ENGINE_LOAD_POLICY = "amalia_serve.autoscaling_policy:EngineLoadPolicy"

# Keys of the replica's stats dict. Prefixed, because Serve stores them next to its own
# `running_requests` key in one per-replica metrics map.
RUNNING = "amalia_engine_running"
WAITING = "amalia_engine_waiting"
KV_CACHE_USAGE = "amalia_engine_kv_cache_usage"
BATCH_SLOTS = "amalia_engine_batch_slots"
STATS_KEYS = (RUNNING, WAITING, KV_CACHE_USAGE, BATCH_SLOTS)
REQUIRED_KEYS = (RUNNING, WAITING, KV_CACHE_USAGE)

# `ceil(1.0000000000000002)` is 2: ratios that are whole numbers up to float error stay whole.
_EPS = 1e-9


def replica_stats(
    running: int, waiting: int, kv_cache_usage: float, batch_slots: int | None
) -> dict[str, float]:
    """What ``VariantServer.record_autoscaling_stats`` returns: one engine's load under fixed keys.

    `batch_slots` is the engine's ``max_num_seqs``; None (not known) leaves its key out.
    """
    stats = {
        RUNNING: float(running),
        WAITING: float(waiting),
        KV_CACHE_USAGE: float(kv_cache_usage),
    }
    if batch_slots is not None:
        stats[BATCH_SLOTS] = float(batch_slots)
    return stats


class PolicyKnobs(BaseModel):
    """The policy's own targets; Serve passes them to the policy as ``policy_kwargs``."""

    model_config = ConfigDict(extra="forbid")

    target_waiting_per_replica: float = Field(
        2.0,
        ge=0,
        description="Requests a replica may have waiting for a batch slot before the variant scales up. "
        "A waiting request has no first token yet, so this bounds the queue part of TTFT; keep it small.",
    )
    target_kv_cache_usage: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Mean KV-cache usage (0-1) the variant is scaled to hold. Below 1 leaves room for running "
        "sequences to grow; at 1 vLLM preempts and recomputes.",
    )


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's engine, as Serve averaged it over the look-back window."""

    running: float
    waiting: float
    kv_cache_usage: float
    batch_slots: float
    """0 when the replica does not know its batch size."""

    @classmethod
    def from_stats(cls, stats: Mapping[str, float]) -> ReplicaLoad | None:
        """None unless the running, waiting and KV-cache keys are all there: a partial report is
        not trusted."""
        if any(key not in stats for key in REQUIRED_KEYS):
            return None
        slots = stats.get(BATCH_SLOTS, 0.0)
        return cls(stats[RUNNING], stats[WAITING], stats[KV_CACHE_USAGE], slots)


@dataclass(frozen=True)
class ScalingSignals:
    """Everything one decision looks at."""

    current_replicas: int
    min_replicas: int
    max_replicas: int
    reported: tuple[ReplicaLoad, ...]
    """Running replicas that reported engine stats; fewer than `current_replicas` while some start."""
    handle_queued: float
    """Requests queued at the callers' handles, on no replica yet: every replica was at
    ``max_ongoing_requests``, or none was running (a cold start)."""
    ongoing: float
    """Serve's own count of running plus queued requests: the fallback signal."""

    @property
    def _scale(self) -> float:
        # Replicas that did not report are taken to carry the mean load of those that did.
        return self.current_replicas / len(self.reported) if self.reported else 0.0

    @property
    def running(self) -> float:
        return sum(r.running for r in self.reported) * self._scale

    @property
    def waiting(self) -> float:
        """Requests waiting for a batch slot: the engines' queues, plus the requests queued at
        handles that the running replicas' free batch slots cannot take. Right after a cold start
        the handles still hold the requests that arrived while no replica ran; a replica with free
        slots is about to take them, so they are no reason to scale further."""
        engines = sum(r.waiting for r in self.reported) * self._scale
        if not self.batch_slots:
            return engines + self.handle_queued
        free = max(0.0, self.batch_slots * self.current_replicas - self.running)
        return engines + max(0.0, self.handle_queued - free)

    @property
    def kv_cache_usage(self) -> float:
        """Mean over the replicas that reported (0 when none did)."""
        return (
            sum(r.kv_cache_usage for r in self.reported) / len(self.reported)
            if self.reported
            else 0.0
        )

    @property
    def batch_slots(self) -> float:
        return (
            sum(r.batch_slots for r in self.reported) / len(self.reported) if self.reported else 0.0
        )


class Reason(str, Enum):
    """Which vote set the replica count; the ``reason`` label of the decision counter."""

    WAITING = "waiting"
    KV_CACHE = "kv_cache"
    BATCH_SLOTS = "batch_slots"
    ONGOING = "ongoing_fallback"
    IDLE = "idle"


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: Reason
    detail: str
    """One line that says why, with the numbers: what the log line prints."""


def _ceil(ratio: float) -> int:
    return max(0, math.ceil(ratio - _EPS))


def _engine_votes(s: ScalingSignals, knobs: PolicyKnobs) -> dict[Reason, int]:
    n = s.current_replicas
    excess = s.waiting - knobs.target_waiting_per_replica * n
    per_replica = max(1.0, s.running / n)
    # Both are look-back means from different sources (handles, engines): clamp the difference.
    held = max(0.0, s.ongoing - s.waiting)
    return {
        Reason.WAITING: n + _ceil(excess / per_replica) if excess > _EPS else 0,
        Reason.KV_CACHE: _ceil(s.kv_cache_usage * n / knobs.target_kv_cache_usage),
        Reason.BATCH_SLOTS: _ceil(held / s.batch_slots) if s.batch_slots > 0 else 0,
    }


def _signal_text(s: ScalingSignals, knobs: PolicyKnobs) -> str:
    reported = f"{len(s.reported)}/{s.current_replicas} replicas reported"
    return (
        f"waiting {s.waiting:.1f} (target {knobs.target_waiting_per_replica:g}/replica, "
        f"{s.handle_queued:.1f} at handles), KV cache {s.kv_cache_usage:.0%} "
        f"(target {knobs.target_kv_cache_usage:.0%}), running {s.running:.1f}, ongoing {s.ongoing:.1f}"
        + (f" for {s.batch_slots:g} slots/replica" if s.batch_slots else " (batch size unknown)")
        + f"; {reported}"
    )


def decide(signals: ScalingSignals, knobs: PolicyKnobs, target_ongoing_requests: float) -> Decision:
    """The replica count the variant should have now, and why (before Serve's delays)."""
    s = signals
    if s.reported:
        votes = _engine_votes(s, knobs)
        # Ties go to the earlier vote: a queue is the most direct sign that users wait.
        reason = max(votes, key=lambda r: votes[r])
        wanted = votes[reason]
        text = (
            _signal_text(s, knobs)
            + "; votes "
            + ", ".join(f"{r.value} {v}" for r, v in votes.items())
        )
    else:
        wanted = _ceil(s.ongoing / target_ongoing_requests)
        reason = Reason.ONGOING
        text = (
            f"no engine stats from {s.current_replicas} replicas: {s.ongoing:.1f} ongoing requests "
            f"/ target {target_ongoing_requests:g} per replica"
        )
    if wanted == 0:
        reason = Reason.IDLE
    replicas = min(max(wanted, s.min_replicas), s.max_replicas)
    if replicas != wanted:
        text += f"; wanted {wanted}, bounded to [{s.min_replicas}, {s.max_replicas}]"
    noun = "replica" if replicas == 1 else "replicas"
    return Decision(replicas, reason, f"{reason.value}: {replicas} {noun} ({text})")

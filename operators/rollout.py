"""The rollout state machine: (spec, status, observations, now) -> next status and the one edit to
make.

Pure: no kopf, no kubernetes, no clock, no network. Every input that changes over time (the
RayService's variants, weights and deployment health, a Prometheus measurement, what is known of an
evaluation run, a person's action, the time) comes in as an argument, so every path is unit-tested
in milliseconds and a restarted operator that re-reads the same status makes the same decision.
Edits are idempotent (add-if-missing, set weights and shadow, remove-if-present), so repeating one
after a crash between "RayService patched" and "status written" is harmless. The evaluation step's
own attempts are decided in evaluation/attempts.py.

Stages (kept in status.stage): Deploying -> Stepping (steps[stepIndex]) -> Promoting -> Promoted, or
at any point RollingBack -> RolledBack. Conditions are computed from the stage; `phase` is derived
from them.

A rollout owns only the stable's share of the traffic: `setWeight: w` gives the canary w% of what
the stable and the canary hold together, and every other variant of the split keeps its weight
(`split_weights`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from amalia_operator.evaluation.attempts import EvaluationReport, advance_attempt, current_progress
from amalia_operator.models import (
    AnalysisProgress,
    Condition,
    EvaluationProgress,
    Measurement,
    RolloutSpec,
    RolloutStatus,
    ShadowStatus,
    Stage,
    Step,
    parse_duration,
    parse_time,
    rfc3339,
)

Action = Literal["promote", "abort", "retry"]
ACTIONS: tuple[Action, ...] = ("promote", "abort", "retry")
HEALTHY = "HEALTHY"
# Serve gives up on a deployment in this state; waiting longer will not help.
DEPLOY_FAILED = "DEPLOY_FAILED"
ACTIVE_STAGES: tuple[Stage, ...] = ("Deploying", "Stepping", "Promoting")


@dataclass(frozen=True)
class ServeObservation:
    """What the RayService says (None in Observations: front application not found).

    `variants`: the variant applications in serveConfigV2; `weights`: the front application's
    ingress weights; `deployment_status`: each variant's health (HEALTHY once its application is
    RUNNING and its deployment HEALTHY), absent while KubeRay reports nothing for it.
    """

    variants: tuple[str, ...]
    weights: dict[str, int]
    deployment_status: dict[str, str]


@dataclass(frozen=True)
class Observations:
    serve: ServeObservation | None
    measurement: Measurement | None = None
    action: Action | None = None
    # What this process knows of the evaluation run status.evaluation names (None: no such run).
    evaluation: EvaluationReport | None = None


@dataclass(frozen=True)
class ServeEdit:
    """Desired change to serveConfigV2: ensure the canary's application, give the canary
    `canary_percent`% of the share the rollout owns, and drop the `remove` variants (their weight
    first, their application on a repeat of the edit once the weight is gone). `shadow` is the
    shadow traffic to the canary; None turns off a shadow to a variant the rollout owns (and
    leaves one to any other variant alone).

    The rollout owns the weights of `stable`, `canary` and the removed variants; the concrete
    weights are computed from the live split when the edit is applied (`split_weights`), so a
    concurrent change to another variant's weight is kept.
    """

    stable: str
    canary: str
    canary_percent: int
    add_canary: bool = False
    remove: tuple[str, ...] = ()
    shadow: ShadowStatus | None = None

    @property
    def owned(self) -> tuple[str, ...]:
        return (self.stable, self.canary, *self.remove)


def owned_share(weights: dict[str, int], edit: ServeEdit) -> int:
    """The weight the rollout moves: what its own variants hold together in `weights`."""
    return sum(weights.get(name, 0) for name in set(edit.owned))


def split_weights(weights: dict[str, int], edit: ServeEdit) -> dict[str, int]:
    """The live split with the owned share divided as `edit` says; other variants keep theirs,
    and the order of the names stays (the canary, when new, goes last).

    Weights are integers, so the canary's part is rounded half up: with weights that sum to 100
    it is within half a percent of the requested share.
    """
    share = owned_share(weights, edit)
    canary = (share * edit.canary_percent + 50) // 100
    owned = {edit.stable: share - canary, edit.canary: canary}
    for name in edit.remove:
        if owned.pop(name, 0):
            raise ValueError(f"cannot remove {name}: the edit would leave it traffic")
    out = {n: owned.pop(n, w) for n, w in weights.items() if n not in edit.remove}
    return {**out, **owned}


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: RolloutStatus
    edit: ServeEdit | None = None
    events: tuple[Event, ...] = ()
    action_consumed: bool = False


def rollout_hash(spec: RolloutSpec) -> str:
    """Identifies the intent (variants and steps); analysis tuning may change in flight."""
    intent = {
        "stable": spec.stable.wire(),
        "canary": spec.canary.wire(),
        "steps": [s.wire() for s in spec.steps],
    }
    return hashlib.sha256(json.dumps(intent, sort_keys=True).encode()).hexdigest()[:16]


def describe_step(step: Step) -> str:
    if step.set_weight is not None:
        return f"setWeight {step.set_weight}"
    if step.pause is not None:
        return f"pause {step.pause.duration}" if step.pause.duration else "pause until promoted"
    if step.evaluation is not None:
        ref = step.evaluation.golden_set.config_map_ref
        where = f"ConfigMap {ref.name} key {ref.key}" if ref else step.evaluation.golden_set.name
        return f"evaluation on {where}"
    if step.shadow is not None:
        return f"shadow {step.shadow.percent:g}%"
    return str(step.kind)


def measurement_due(spec: RolloutSpec, status: RolloutStatus, now: datetime) -> bool:
    """Whether the caller should query Prometheus before calling `advance`."""
    if status.stage != "Stepping" or status.rollout_hash != rollout_hash(spec):
        return False
    if status.step_index >= len(spec.steps) or spec.steps[status.step_index].analysis is None:
        return False
    if now < first_measurement_at(spec, status):
        return False
    progress = _current_analysis(status)
    if progress is None or progress.last is None:
        return True
    if progress.halted:
        return False
    return bool(now >= parse_time(progress.last.time) + spec.analysis.interval_td)


def first_measurement_at(spec: RolloutSpec, status: RolloutStatus) -> datetime:
    """A window that still holds traffic from before the canary's last weight change says
    little about the canary at its new weight: measure initialDelay after that change."""
    changed = status.weight_changed_at or status.step_started_at
    if changed is None:
        return datetime.min.replace(tzinfo=UTC)
    delay: timedelta = spec.analysis.initial_delay_td
    return parse_time(changed) + delay


def advance(
    spec: RolloutSpec, generation: int, status: RolloutStatus, obs: Observations, now: datetime
) -> Decision:
    """One tick of the state machine."""
    machine = _Tick(spec, status.model_copy(deep=True), obs, now)
    machine.run()
    new = machine.status
    new.observed_generation = generation
    new.conditions = _merge_conditions(status.conditions, _conditions(spec, new), now)
    new.phase = derive_phase(new.conditions)
    return Decision(new, machine.edit, tuple(machine.events), machine.action_consumed)


def derive_phase(conditions: list[Condition]) -> str:
    """Phase is a one-word summary of the conditions, never the other way round."""
    by_type = {c.type: c for c in conditions}
    ready, progressing = by_type.get("Ready"), by_type.get("Progressing")
    if ready is not None and ready.status == "True":
        return "Promoted"
    if ready is not None and ready.reason == "RolledBack":
        return "RolledBack"
    if progressing is None:
        return "Pending"
    if progressing.status == "True":
        return "Progressing"
    if progressing.status == "Unknown":
        return "Paused"  # waiting for a person: a pause step or an inconclusive analysis
    return "Failed"


class _Tick:
    """Mutable scratch space for one `advance` call."""

    def __init__(self, spec: RolloutSpec, status: RolloutStatus, obs: Observations, now: datetime):
        self.spec, self.status, self.obs, self.now = spec, status, obs, now
        self.edit: ServeEdit | None = None
        self.events: list[Event] = []
        self.action_consumed = False

    # --- transitions -------------------------------------------------------------------------
    def run(self) -> None:
        if self.status.rollout_hash != rollout_hash(self.spec):
            # A pending action waits for the next tick: it was meant for the old spec's stage.
            self._start(restart=self.status.rollout_hash is not None)
        elif self.obs.action is not None:
            self.action_consumed = True
            if self._act(self.obs.action):
                return
        stage = self.status.stage
        if stage in ("Promoted", "RolledBack", "Failed"):
            return
        serve = self.obs.serve
        if serve is None:
            self.status.message = (
                f"waiting for RayService {self.spec.ray_service_name} application "
                f"{self.spec.application}"
            )
            return
        if stage == "Deploying":
            self._deploying(serve)
        elif stage == "Stepping":
            self._stepping(serve)
        elif stage == "Promoting":
            self._after_delay(serve, "Promoted", f"promoted {self.spec.canary.name}")
        elif stage == "RollingBack":
            self._after_delay(serve, "RolledBack", self.status.message)

    def _enter(self, stage: Stage, message: str) -> None:
        self.status.stage = stage
        self.status.stage_entered_at = rfc3339(self.now)
        self.status.message = message

    def _start(self, restart: bool) -> None:
        old = self.status
        # Until the old rollout finished, its canary may still be live (a promoted one never is
        # a leftover: it is what serves now).
        previous_canary_live = old.stage in (*ACTIVE_STAGES, "RollingBack")
        stale = _stale_canary(old, self.spec) if previous_canary_live else None
        self.status = RolloutStatus(
            rollout_hash=rollout_hash(self.spec),
            # A renamed spec's old canary stays recorded until Deploying has removed it.
            canary_name=stale or self.spec.canary.name,
            conditions=old.conditions,
            last_analysis=old.last_analysis,
            last_evaluation=old.last_evaluation,
        )
        self._enter("Deploying", f"deploying canary {self.spec.canary.name}")
        if restart:
            self.events.append(
                Event("Normal", "RolloutRestarted", "spec changed: starting at step 0")
            )

    def _act(self, action: Action) -> bool:
        """Applies a person's action; returns True when it decided this tick (a retry does not:
        the stage it starts over in runs at once)."""
        stage = self.status.stage
        serve = self.obs.serve
        # Late in a promotion the old stable's application may be gone already: rolling back
        # then would give its share to nothing (the ingress refuses weight for a missing
        # application and would keep routing to the canary being removed).
        stable_gone = serve is not None and self.spec.stable.name not in serve.variants
        if action == "abort" and stage in ACTIVE_STAGES and not stable_gone:
            self.status.aborted_at = rfc3339(self.now)
            self._rollback("Aborted", "aborted by a person")
            return True
        if action == "retry" and stage in ("RolledBack", "RollingBack", "Failed"):
            self._start(restart=False)
            self.events.append(Event("Normal", "RolloutRetried", "retry: starting at step 0"))
            return False
        if action == "promote" and stage == "Stepping":
            step, index = self._step(), self.status.step_index
            if step is not None and step.pause is not None:
                self._next_step(f"pause at step {index} promoted by a person")
            elif _halted(self.status):
                self._next_step(f"inconclusive analysis at step {index} accepted by a person")
            elif _evaluation_halted(self.status):
                self._next_step(f"inconclusive evaluation at step {index} accepted by a person")
            else:
                self._promote("promoted in full by a person")
            return True
        self.events.append(
            Event("Warning", "ActionIgnored", f"{action} does nothing in stage {stage}")
        )
        return False

    def _deploying(self, serve: ServeObservation) -> None:
        stable, canary = self.spec.stable.name, self.spec.canary.name
        stale = _stale_canary(self.status, self.spec)
        if stale is not None:
            if stale in serve.variants or stale in serve.weights:
                self.edit = self._weights_edit(0, add_canary=True)
                return
            self.status.canary_name = canary
        if stable not in serve.variants:
            self._fail(
                "StableVariantNotFound",
                f"stable variant {stable} is not in application "
                f"{self.spec.application}; variants: {list(serve.variants)}",
            )
            return
        if owned_share(serve.weights, self._weights_edit(0)) == 0:
            self._fail(
                "NothingToMove",
                f"stable variant {stable} has weight 0 in the traffic split {serve.weights}: "
                "a rollout moves the stable's share, and it has none",
            )
            return
        if canary not in serve.variants or serve.weights.get(canary) != 0:
            # A new canary comes with weight 0; one left from before a restart goes back to 0
            # (and back into the weights, which a rollback may have taken it out of).
            self.edit = self._weights_edit(0, add_canary=True)
            return
        health = serve.deployment_status.get(canary, "missing")
        if health == HEALTHY:
            self._enter("Stepping", f"canary {canary} is healthy")
            self.status.step_index = 0
            self.status.step_started_at = rfc3339(self.now)
            self.events.append(Event("Normal", "CanaryHealthy", self.status.message))
            return
        deadline = parse_time(self.status.stage_entered_at or rfc3339(self.now)) + timedelta(
            seconds=self.spec.progress_deadline_seconds
        )
        if health == DEPLOY_FAILED or self.now >= deadline:
            self._rollback("CanaryUnhealthy", f"canary {canary} not healthy: Serve says {health}")
            return
        self.status.message = f"waiting for canary {canary} to be HEALTHY (now {health})"

    def _stepping(self, serve: ServeObservation) -> None:
        step = self._step()
        if step is None:
            self._promote(f"all {len(self.spec.steps)} steps passed")
            return
        if step.set_weight is not None:
            self.edit = self._weights_edit(step.set_weight)
            self.status.canary_weight = step.set_weight
            self.status.weight_changed_at = rfc3339(self.now)
            self._next_step(
                f"canary given {step.set_weight}% of {self.spec.stable.name}'s share of the traffic"
            )
        elif step.pause is not None:
            self._paused(step.pause.duration)
        elif step.shadow is not None:
            self._shadow(step.shadow.percent, step.shadow.max_in_flight)
        elif step.evaluation is not None:
            self._evaluation(step)
        else:
            self._analysis(step)

    def _shadow(self, percent: float, max_in_flight: int) -> None:
        """Copies `percent`% of the alias's requests to the canary (0 turns it off); the weights
        stay as they are."""
        on = percent > 0
        self.status.shadow = (
            ShadowStatus(percent=percent, max_in_flight=max_in_flight) if on else None
        )
        self.edit = self._weights_edit(self.status.canary_weight)
        # What the canary answers changed as much as with a weight: analysis waits initialDelay.
        self.status.weight_changed_at = rfc3339(self.now)
        canary = self.spec.canary.name
        self._next_step(
            f"{percent:g}% of the requests copied to canary {canary} as shadow traffic "
            f"(at most {max_in_flight} in flight)"
            if on
            else f"shadow traffic to canary {canary} off"
        )

    def _evaluation(self, step: Step) -> None:
        assert step.evaluation is not None
        index = self.status.step_index
        progress = current_progress(self.status)
        if progress is None:
            progress = self.status.evaluation = EvaluationProgress(step_index=index)
        if progress.halted:
            return  # the message set when it halted still says what to do
        outcome = advance_attempt(step.evaluation, progress, self.obs.evaluation, self.now)
        if outcome.summary is not None:
            self.status.last_evaluation = outcome.summary
        if outcome.next == "pass":
            self._next_step(outcome.message)
        elif outcome.next == "fail":
            self._rollback("EvaluationFailed", outcome.message)
        else:
            self.status.message = outcome.message
            if outcome.next == "halt":
                self.events.append(Event("Warning", "EvaluationInconclusive", outcome.message))

    def _paused(self, duration: str | None) -> None:
        if duration is None:
            self.status.message = f"paused at step {self.status.step_index}: waiting for promote"
            return
        started = parse_time(self.status.step_started_at or rfc3339(self.now))
        until = started + parse_duration(duration)
        if self.now >= until:
            self._next_step(f"pause of {duration} ended")
        else:
            self.status.message = f"paused at step {self.status.step_index} until {rfc3339(until)}"

    def _analysis(self, step: Step) -> None:
        index = self.status.step_index
        progress = _current_analysis(self.status)
        if progress is None:
            progress = self.status.analysis = AnalysisProgress(step_index=index)
        settings = self.spec.analysis
        if progress.halted:
            return  # the message set when it halted still says what to do
        measurement = self.obs.measurement
        if measurement is None:
            first = first_measurement_at(self.spec, self.status)
            self.status.message = (
                f"analysis at step {index}: first measurement at {rfc3339(first)} "
                f"(initialDelay {settings.initial_delay} after the weight change)"
                if self.now < first
                else f"analysis at step {index}: waiting for the next measurement"
            )
            return
        progress.last = measurement
        self.status.last_analysis = measurement
        detail = "; ".join(r.describe() for r in measurement.results if r.outcome != "Successful")
        if measurement.outcome == "Error":
            self._outage(progress, measurement, detail)
            return
        progress.outage_since = None
        if measurement.outcome == "Successful":
            progress.successes += 1
        elif measurement.outcome == "Failed":
            progress.failures += 1
        else:
            progress.inconclusive += 1
        needed = (
            step.analysis.success_count
            if step.analysis and step.analysis.success_count
            else settings.success_count
        )
        if progress.failures > settings.failure_limit:
            self._rollback(
                "AnalysisFailed",
                f"analysis at step {index} failed "
                f"{progress.failures} time(s), limit {settings.failure_limit}: {detail}",
            )
        elif progress.successes >= needed:
            self._next_step(f"analysis at step {index} passed")
        elif progress.inconclusive > settings.inconclusive_limit:
            progress.halted = True
            self.status.message = (
                f"analysis at step {index} inconclusive {progress.inconclusive} time(s), "
                f"limit {settings.inconclusive_limit}: {detail}; waiting for a person: "
                "promote accepts this step, abort rolls back"
            )
            self.events.append(Event("Warning", "AnalysisInconclusive", self.status.message))
        else:
            self.status.message = (
                f"analysis at step {index}: {progress.successes}/{needed} passed, "
                f"{progress.failures}/{settings.failure_limit} failures and "
                f"{progress.inconclusive}/{settings.inconclusive_limit} inconclusive tolerated "
                f"(last: {measurement.outcome}: {detail or 'ok'})"
            )

    def _outage(self, progress: AnalysisProgress, measurement: Measurement, detail: str) -> None:
        """Prometheus could not answer: no evidence about the canary either way, so the analysis
        waits (nothing is counted) until the outage outlasts outageLimit."""
        index, limit = self.status.step_index, self.spec.analysis.outage_limit
        since = progress.outage_since = progress.outage_since or measurement.time
        if self.now >= parse_time(since) + self.spec.analysis.outage_limit_td:
            self._rollback(
                "AnalysisUnavailable",
                f"analysis at step {index}: Prometheus unavailable since {since}, "
                f"longer than outageLimit {limit}: {detail}",
            )
        else:
            self.status.message = (
                f"analysis at step {index} paused: Prometheus unavailable since {since} "
                f"(rolls back after outageLimit {limit}): {detail}"
            )

    def _next_step(self, message: str) -> None:
        self.status.step_index += 1
        self.status.step_started_at = rfc3339(self.now)
        self.status.message = message

    def _promote(self, message: str) -> None:
        self._enter("Promoting", message)
        self._stop_extras()
        self.status.step_index = len(self.spec.steps)
        self.status.canary_weight = 100
        self.status.weight_changed_at = rfc3339(self.now)
        self.edit = self._weights_edit(100)
        self.events.append(Event("Normal", "Promoting", message))

    def _rollback(self, reason: str, message: str) -> None:
        self._enter("RollingBack", message)
        self._stop_extras()
        self.status.canary_weight = 0
        self.status.weight_changed_at = rfc3339(self.now)
        self.edit = self._weights_edit(0)
        self.events.append(Event("Warning", reason, f"rolled back: {message}"))

    def _stop_extras(self) -> None:
        """Leaving the steps: no shadow traffic stays behind (the next edit clears it), and an
        evaluation run in flight is dropped (the operator cancels it)."""
        self.status.shadow = None
        if self.status.evaluation is not None:
            self.status.evaluation.started_at = None

    def _fail(self, reason: str, message: str) -> None:
        self._enter("Failed", message)
        self.events.append(Event("Warning", reason, message))

    def _after_delay(self, serve: ServeObservation, final: Stage, message: str) -> None:
        """Drops the variants that lost their traffic once in-flight requests had time to finish:
        the old stable after a promotion; the canary after a rollback, and a renamed spec's old
        canary in both cases.

        The edit repeats every tick until they are gone from the weights and from the
        applications: their weight goes first, their application on a later tick.
        """
        entered = parse_time(self.status.stage_entered_at or rfc3339(self.now))
        if self.now < entered + timedelta(seconds=self.spec.scale_down_delay_seconds):
            return
        promoted = final == "Promoted"
        loser = self.spec.stable.name if promoted else self.spec.canary.name
        edit = self._weights_edit(100 if promoted else 0, remove=(loser,))
        if any(n in serve.variants or n in serve.weights for n in edit.remove):
            self.edit = edit
            return
        self.status.stage = final
        self.status.message = message
        self.status.canary_name = self.spec.canary.name
        self.events.append(
            Event("Normal", final, f"{message}; removed variant {', '.join(edit.remove)}")
        )

    # --- helpers -------------------------------------------------------------------------------
    def _step(self) -> Step | None:
        index = self.status.step_index
        return self.spec.steps[index] if index < len(self.spec.steps) else None

    def _weights_edit(
        self, canary_percent: int, add_canary: bool = False, remove: tuple[str, ...] = ()
    ) -> ServeEdit:
        """An edit of the rollout's share. A renamed spec's old canary, remembered in
        status.canaryName until it is gone, is owned too and dropped on the way, whatever the
        rollout does meanwhile (an abort included)."""
        stale = _stale_canary(self.status, self.spec)
        if stale is not None and stale not in remove:
            remove = (*remove, stale)
        return ServeEdit(
            self.spec.stable.name,
            self.spec.canary.name,
            canary_percent,
            add_canary,
            remove,
            self.status.shadow,
        )


def _stale_canary(old: RolloutStatus, spec: RolloutSpec) -> str | None:
    """The canary an interrupted earlier rollout of this object left behind, if spec renamed it."""
    name = old.canary_name
    return name if name not in (None, spec.canary.name, spec.stable.name) else None


def _conditions(spec: RolloutSpec, status: RolloutStatus) -> list[Condition]:
    """Desired conditions for the stage; lastTransitionTime is filled in by `_merge_conditions`."""
    stage, msg = status.stage, status.message
    ready: tuple[str, str]
    progressing: tuple[str, str]
    if stage == "Promoted":
        ready, progressing = ("True", "Promoted"), ("False", "RolloutComplete")
    elif stage in ("RollingBack", "RolledBack"):
        ready, progressing = ("False", "RolledBack"), ("False", "RolledBack")
    elif stage == "Failed":
        ready, progressing = ("False", "RolloutFailed"), ("False", "RolloutFailed")
    elif stage == "Deploying":
        ready, progressing = ("False", "CanaryDeploying"), ("True", "CanaryDeploying")
    elif stage == "Promoting":
        ready, progressing = ("False", "Promoting"), ("True", "Promoting")
    else:
        index = status.step_index
        step = spec.steps[index] if index < len(spec.steps) else None
        ready = ("False", "RolloutInProgress")
        if step is not None and step.pause is not None:
            progressing = ("Unknown", "Paused")
        elif _running_analysis(spec, status) and _halted(status):
            progressing = ("Unknown", "AnalysisInconclusive")
        elif _evaluation_halted(status):
            progressing = ("Unknown", "EvaluationInconclusive")
        else:
            progressing = ("True", "StepRunning")
    out = [_cond("Ready", *ready, msg), _cond("Progressing", *progressing, msg)]
    for extra in (_analysing(spec, status), _evaluating(spec, status)):
        if extra is not None:
            out.append(extra)
    return out


def _running_analysis(spec: RolloutSpec, status: RolloutStatus) -> bool:
    index = status.step_index
    return (
        status.stage == "Stepping"
        and index < len(spec.steps)
        and spec.steps[index].analysis is not None
    )


def _current_analysis(status: RolloutStatus) -> AnalysisProgress | None:
    progress = status.analysis
    return progress if progress is not None and progress.step_index == status.step_index else None


def _halted(status: RolloutStatus) -> bool:
    progress = _current_analysis(status)
    return progress is not None and progress.halted


def _evaluation_halted(status: RolloutStatus) -> bool:
    progress = current_progress(status)
    return status.stage == "Stepping" and progress is not None and progress.halted


def _evaluating(spec: RolloutSpec, status: RolloutStatus) -> Condition | None:
    """True while an evaluation step runs, Unknown while one waits for a person, then False with
    the last verdict as its reason."""
    index = status.step_index
    running = (
        status.stage == "Stepping"
        and index < len(spec.steps)
        and spec.steps[index].evaluation is not None
    )
    if running:
        if _evaluation_halted(status):
            return _cond("Evaluating", "Unknown", "Inconclusive", status.message)
        return _cond("Evaluating", "True", "Running", f"evaluation at step {index}")
    last = status.last_evaluation
    if last is None:
        return None
    return _cond("Evaluating", "False", last.verdict, last.reason)


def _analysing(spec: RolloutSpec, status: RolloutStatus) -> Condition | None:
    if _running_analysis(spec, status):
        current = _current_analysis(status)
        if current is not None and current.halted:
            return _cond("Analysing", "Unknown", "Inconclusive", status.message)
        if current is not None and current.outage_since is not None:
            return _cond("Analysing", "Unknown", "PrometheusUnavailable", status.message)
        return _cond("Analysing", "True", "Running", f"analysis at step {status.step_index}")
    last = status.last_analysis
    if last is None:
        return None
    detail = "; ".join(r.describe() for r in last.results)
    return _cond("Analysing", "False", last.outcome, detail)


def _cond(ctype: str, cstatus: str, reason: str, message: str) -> Condition:
    return Condition.model_validate(
        {
            "type": ctype,
            "status": cstatus,
            "reason": reason,
            "message": message,
            "lastTransitionTime": "",
        }
    )


def _merge_conditions(old: list[Condition], new: list[Condition], now: datetime) -> list[Condition]:
    """Keeps lastTransitionTime when a condition's status did not change (Kubernetes convention)."""
    previous = {c.type: c for c in old}
    merged = []
    for cond in new:
        before = previous.get(cond.type)
        same = before is not None and before.status == cond.status
        cond.last_transition_time = before.last_transition_time if same and before else rfc3339(now)
        merged.append(cond)
    return merged

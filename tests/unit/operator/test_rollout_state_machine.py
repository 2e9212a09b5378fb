"""The pure rollout state machine, driven with an injected clock and a simulated RayService."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from amalia_operator.models import Measurement, MetricResult, RolloutSpec, RolloutStatus
from amalia_operator.rollout import (
    Decision,
    Observations,
    ServeEdit,
    ServeObservation,
    advance,
    measurement_due,
    rfc3339,
)

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
STABLE, CANARY = "amalia-sft", "amalia-dpo"
STEPS: list[dict[str, Any]] = [
    {"setWeight": 10},
    {"pause": {"duration": "5m"}},
    {"analysis": {}},
    {"setWeight": 50},
    {"pause": {}},
    {"setWeight": 100},
]


def make_spec(steps: list[dict[str, Any]] | None = None, **analysis: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "application": "amalia",
            "stable": {"name": STABLE, "modelPath": "/models/sft"},
            "canary": {"name": CANARY, "modelPath": "/models/dpo"},
            "steps": STEPS if steps is None else steps,
            "analysis": {"interval": "1m", "failureLimit": 0, **analysis},
            "scaleDownDelaySeconds": 30,
        }
    )


def measured(outcome: str, value: float | None = 0.0) -> Measurement:
    result = MetricResult(metric="error-rate", outcome=outcome, value=value, max=0.01)  # type: ignore[arg-type]
    return Measurement(outcome=outcome, time=rfc3339(T0), results=[result])  # type: ignore[arg-type]


class World:
    """A RayService that applies edits and reports the canary healthy once it is deployed."""

    def __init__(self, spec: RolloutSpec, healthy: bool = True):
        self.spec, self.healthy = spec, healthy
        self.variants: list[str] = [STABLE]
        self.weights: dict[str, int] = {STABLE: 100}
        self.status = RolloutStatus()
        self.now = T0
        self.edits: list[ServeEdit] = []
        self.decisions: list[Decision] = []

    def observe(self) -> ServeObservation:
        health = {v: "HEALTHY" if self.healthy else "UPDATING" for v in self.variants}
        return ServeObservation(tuple(self.variants), dict(self.weights), health)

    def tick(
        self,
        measurement: Measurement | None = None,
        action: str | None = None,
        after: timedelta = timedelta(seconds=5),
        generation: int = 1,
    ) -> Decision:
        self.now += after
        if measurement is not None:  # measured now, as the handler would
            measurement = measurement.model_copy(update={"time": rfc3339(self.now)})
        obs = Observations(self.observe(), measurement, action)  # type: ignore[arg-type]
        decision = advance(self.spec, generation, self.status, obs, self.now)
        if decision.edit is not None:
            self.apply(decision.edit)
        self.status = decision.status
        self.decisions.append(decision)
        return decision

    def apply(self, edit: ServeEdit) -> None:
        """Like serveconfig.apply_edit: an application goes only once its weight is gone."""
        self.edits.append(edit)
        if edit.remove in self.variants and edit.remove not in self.weights:
            self.variants.remove(edit.remove)
        if edit.add_canary and self.spec.canary.name not in self.variants:
            self.variants.append(self.spec.canary.name)
        self.weights = dict(edit.weights)

    def run_to_step(self, index: int) -> None:
        """Ticks (passing analyses, promoting pauses) until status.stepIndex == index."""
        for _ in range(50):
            if self.status.stage == "Stepping" and self.status.step_index == index:
                return
            step = self.current_step()
            if step is not None and "analysis" in step:
                self.tick(measured("Successful"), after=timedelta(minutes=1))
            elif step is not None and step.get("pause") == {}:
                self.tick(action="promote")
            else:
                self.tick(after=timedelta(minutes=6))
        raise AssertionError(f"never reached step {index}: {self.status}")

    def current_step(self) -> dict[str, Any] | None:
        if self.status.stage != "Stepping" or self.status.step_index >= len(self.spec.steps):
            return None
        return self.spec.steps[self.status.step_index].wire()


# === starting ===
def test_rollout_adds_canary_at_weight_zero_when_created() -> None:
    world = World(make_spec())
    decision = world.tick()
    assert decision.edit == ServeEdit(weights={STABLE: 100, CANARY: 0}, add_canary=True)
    assert decision.status.stage == "Deploying"
    assert decision.status.phase == "Progressing"
    assert decision.status.observed_generation == 1
    assert decision.status.canary_name == CANARY


def test_rollout_waits_when_canary_not_healthy() -> None:
    world = World(make_spec(), healthy=False)
    world.tick()
    decision = world.tick()
    assert decision.edit is None
    assert decision.status.stage == "Deploying"
    assert "UPDATING" in decision.status.message


def test_rollout_rolls_back_when_canary_misses_progress_deadline() -> None:
    world = World(make_spec(), healthy=False)
    world.tick()
    decision = world.tick(after=timedelta(seconds=601))
    assert decision.status.phase == "RolledBack"
    assert decision.edit == ServeEdit(weights={STABLE: 100, CANARY: 0})
    assert decision.events[0].reason == "CanaryUnhealthy"


def test_rollout_fails_when_stable_variant_missing() -> None:
    world = World(make_spec())
    world.variants = ["someone-else"]
    world.tick()  # the edit adds the canary; the stable is still absent
    decision = world.tick()
    assert decision.status.phase == "Failed"
    assert decision.events[-1].reason == "StableVariantNotFound"


# === steps ===
def test_rollout_sets_weight_when_step_is_set_weight() -> None:
    world = World(make_spec())
    world.tick()
    assert world.tick().status.stage == "Stepping"  # canary healthy
    decision = world.tick()
    assert decision.edit == ServeEdit(weights={STABLE: 90, CANARY: 10})
    assert decision.status.canary_weight == 10
    assert decision.status.step_index == 1


@pytest.mark.parametrize(
    ("elapsed", "moved"), [(timedelta(minutes=4, seconds=59), False), (timedelta(minutes=5), True)]
)
def test_rollout_leaves_timed_pause_only_when_duration_elapsed(
    elapsed: timedelta, moved: bool
) -> None:
    world = World(make_spec())
    world.run_to_step(1)
    started = world.now
    decision = world.tick(after=timedelta(0))
    assert decision.status.phase == "Paused"
    world.now = started
    decision = world.tick(after=elapsed)
    assert (decision.status.step_index == 2) is moved
    assert decision.status.phase == ("Progressing" if moved else "Paused")


def test_rollout_waits_for_a_person_when_pause_is_indefinite() -> None:
    world = World(make_spec())
    world.run_to_step(4)
    decision = world.tick(after=timedelta(days=3))
    assert decision.status.step_index == 4
    assert decision.status.phase == "Paused"
    assert decision.status.condition("Progressing").status == "Unknown"  # type: ignore[union-attr]
    decision = world.tick(action="promote")
    assert decision.action_consumed
    assert decision.status.step_index == 5
    assert decision.status.phase == "Progressing"


def test_rollout_promotes_fully_when_promote_requested_outside_a_pause() -> None:
    world = World(make_spec())
    world.run_to_step(2)
    decision = world.tick(action="promote")
    assert decision.status.stage == "Promoting"
    assert decision.edit == ServeEdit(weights={STABLE: 0, CANARY: 100})


# === analysis ===
def test_rollout_asks_for_measurement_only_when_interval_elapsed() -> None:
    world = World(make_spec(failureLimit=3))
    world.run_to_step(1)
    assert not measurement_due(world.spec, world.status, world.now)  # a pause measures nothing
    world.run_to_step(2)
    assert measurement_due(world.spec, world.status, world.now)
    world.tick(measured("Failed", 0.5), after=timedelta(0))
    assert not measurement_due(world.spec, world.status, world.now + timedelta(seconds=59))
    assert measurement_due(world.spec, world.status, world.now + timedelta(seconds=60))


def test_rollout_passes_analysis_when_measurement_successful() -> None:
    world = World(make_spec())
    world.run_to_step(2)
    decision = world.tick(measured("Successful", 0.001))
    assert decision.status.step_index == 3
    assert decision.status.condition("Analysing").reason == "Successful"  # type: ignore[union-attr]


def test_rollout_rolls_back_when_analysis_fails_and_names_metric() -> None:
    world = World(make_spec())
    world.run_to_step(2)
    decision = world.tick(measured("Failed", 0.25))
    assert decision.status.phase == "RolledBack"
    assert decision.status.canary_weight == 0
    assert decision.edit == ServeEdit(weights={STABLE: 100, CANARY: 0})
    event = decision.events[-1]
    assert (event.type, event.reason) == ("Warning", "AnalysisFailed")
    assert "error-rate=0.25" in event.message and "<= 0.01" in event.message
    ready = decision.status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "RolledBack")
    assert decision.status.condition("Analysing").reason == "Failed"  # type: ignore[union-attr]


def test_rollout_counts_inconclusive_toward_failure_limit_when_prometheus_silent() -> None:
    world = World(make_spec(failureLimit=1))
    world.run_to_step(2)
    first = world.tick(measured("Inconclusive", None))
    assert first.status.step_index == 2 and first.status.phase == "Progressing"
    assert first.status.analysis is not None and first.status.analysis.failures == 1
    second = world.tick(measured("Inconclusive", None), after=timedelta(minutes=1))
    assert second.status.phase == "RolledBack"


def test_rollout_needs_success_count_passes_when_configured() -> None:
    world = World(make_spec(successCount=2))
    world.run_to_step(2)
    assert world.tick(measured("Successful")).status.step_index == 2
    assert world.tick(measured("Successful"), after=timedelta(minutes=1)).status.step_index == 3


# === abort, promotion, rollback cleanup, retry ===
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_rollout_rolls_back_when_aborted_at_any_step(step: int) -> None:
    world = World(make_spec())
    world.run_to_step(step)
    decision = world.tick(action="abort")
    assert decision.status.phase == "RolledBack"
    assert decision.status.aborted_at is not None
    assert decision.edit == ServeEdit(weights={STABLE: 100, CANARY: 0})
    assert decision.events[-1].reason == "Aborted"


def test_rollout_rolls_back_when_aborted_while_deploying() -> None:
    world = World(make_spec(), healthy=False)
    world.tick()
    assert world.tick(action="abort").status.phase == "RolledBack"


def test_rollout_promotes_and_removes_old_stable_after_delay_when_steps_pass() -> None:
    world = World(make_spec())
    world.run_to_step(len(STEPS))
    promoting = world.tick()
    assert promoting.edit == ServeEdit(weights={STABLE: 0, CANARY: 100})
    assert promoting.status.phase == "Progressing"
    assert world.tick(after=timedelta(seconds=10)).edit is None  # in-flight requests drain
    unweighted = world.tick(after=timedelta(seconds=30))
    assert unweighted.edit == ServeEdit(weights={CANARY: 100}, remove=STABLE)
    # The weight goes first; the stable's application stays until the edit is repeated.
    assert world.variants == [STABLE, CANARY] and world.weights == {CANARY: 100}
    assert unweighted.status.phase == "Progressing"
    removed = world.tick()
    assert removed.edit == ServeEdit(weights={CANARY: 100}, remove=STABLE)
    assert world.variants == [CANARY] and removed.status.phase == "Progressing"
    done = world.tick()
    assert done.edit is None and done.status.phase == "Promoted"
    assert done.status.condition("Ready").status == "True"  # type: ignore[union-attr]
    assert [e.reason for e in done.events] == ["Promoted"]


def test_rollout_removes_canary_after_delay_when_rolled_back() -> None:
    world = World(make_spec())
    world.run_to_step(3)
    world.tick(action="abort")
    edits = [world.tick(after=timedelta(seconds=31)).edit, world.tick().edit]
    assert edits == [ServeEdit(weights={STABLE: 100}, remove=CANARY)] * 2
    assert world.variants == [STABLE] and world.weights == {STABLE: 100}
    done = world.tick()
    assert done.status.phase == "RolledBack" and done.status.stage == "RolledBack"
    assert done.status.message == "aborted by a person"


def test_rollout_restarts_when_retry_requested_after_rollback() -> None:
    world = World(make_spec())
    world.run_to_step(2)
    world.tick(measured("Failed", 1.0))
    world.tick(after=timedelta(minutes=1))
    decision = world.tick(action="retry")
    assert decision.status.stage == "Deploying" and decision.status.step_index == 0
    assert decision.edit == ServeEdit(weights={STABLE: 100, CANARY: 0}, add_canary=True)


def test_rollout_ignores_action_when_it_does_not_apply() -> None:
    world = World(make_spec())
    world.run_to_step(0)
    before = world.status
    decision = world.tick(action="retry", after=timedelta(0))
    assert decision.action_consumed
    assert decision.events[0].reason == "ActionIgnored"
    assert decision.status.stage == before.stage


def test_rollout_restarts_at_step_zero_when_steps_change() -> None:
    world = World(make_spec())
    world.run_to_step(3)
    world.spec = make_spec(steps=[{"setWeight": 20}, {"analysis": {}}])
    decision = world.tick(generation=2)
    assert decision.status.stage == "Deploying" and decision.status.step_index == 0
    assert decision.status.observed_generation == 2
    assert decision.events[0].reason == "RolloutRestarted"


def test_rollout_removes_renamed_canary_weight_first_when_spec_changes() -> None:
    world = World(make_spec())
    world.run_to_step(3)  # the old canary takes 10%
    renamed = "amalia-dpo-v2"
    world.spec = RolloutSpec.model_validate(
        {**make_spec().wire(), "canary": {"name": renamed, "modelPath": "/models/dpo-v2"}}
    )
    first = world.tick(generation=2)
    assert first.edit == ServeEdit(
        weights={STABLE: 100, renamed: 0}, add_canary=True, remove=CANARY
    )
    # The old canary's application waits until its weight is gone; the status remembers it.
    assert world.variants == [STABLE, CANARY, renamed] and first.status.canary_name == CANARY
    second = world.tick(generation=2)
    assert second.edit == first.edit and world.variants == [STABLE, renamed]
    third = world.tick(generation=2)
    assert third.status.canary_name == renamed and third.status.stage == "Stepping"


# === idempotence and resume ===
def test_rollout_is_noop_when_ticked_again_with_same_inputs() -> None:
    world = World(make_spec())
    world.run_to_step(4)  # indefinite pause
    first = world.tick()
    second = world.tick()
    assert second.edit is None
    assert second.status == first.status
    world.run_to_step(len(STEPS))
    world.tick()
    for _ in range(3):  # weight off, application off, Promoted
        world.tick(after=timedelta(minutes=1))
    done = world.status
    assert done.phase == "Promoted"
    again = world.tick(after=timedelta(hours=1))
    assert again.edit is None and again.events == () and again.status == done


def test_rollout_keeps_last_transition_time_when_condition_status_unchanged() -> None:
    world = World(make_spec(), healthy=False)
    world.tick()
    since = world.status.condition("Progressing").last_transition_time  # type: ignore[union-attr]
    world.tick(after=timedelta(minutes=3))
    assert world.status.condition("Progressing").last_transition_time == since  # type: ignore[union-attr]
    world.tick(action="abort")
    assert world.status.condition("Progressing").last_transition_time == rfc3339(world.now)  # type: ignore[union-attr]


def test_rollout_resumes_identically_when_restarted_from_any_status() -> None:
    """A restarted operator only has the stored status (JSON): it must decide exactly the same."""
    world = World(make_spec(failureLimit=1))
    script: list[dict[str, Any]] = [
        {},
        {},
        {},
        {"after": timedelta(minutes=6)},
        {"measurement": measured("Inconclusive", None)},
        {"measurement": measured("Successful"), "after": timedelta(minutes=1)},
        {},
        {},
        {"action": "promote"},
        {},
        {},
        {"after": timedelta(minutes=1)},
        {},  # the old stable's application goes once its weight is gone
        {},
    ]
    for kwargs in script:
        stored = RolloutStatus.model_validate(world.status.wire())  # what the API server returns
        now = world.now + kwargs.get("after", timedelta(seconds=5))
        measurement = kwargs.get("measurement")
        if measurement is not None:
            measurement = measurement.model_copy(update={"time": rfc3339(now)})
        obs = Observations(world.observe(), measurement, kwargs.get("action"))
        resumed = advance(world.spec, 1, stored, obs, now)
        live = world.tick(**kwargs)
        assert resumed == live
    assert world.status.phase == "Promoted"
    assert [e.remove for e in world.edits if e.remove] == [STABLE, STABLE]

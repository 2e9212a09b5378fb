"""The pure rollout state machine, driven with an injected clock and a simulated RayService."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from rollout_world import World, measured

from amalia_operator.models import RolloutSpec, RolloutStatus
from amalia_operator.rollout import (
    Observations,
    ServeEdit,
    advance,
    measurement_due,
    rfc3339,
    split_weights,
)

STABLE, CANARY = "amalia-sft", "amalia-new"
# Variants the rollout does not own: their weights must never move.
OTHERS = {"amalia-dpo": 10, "amalia-base": 0}
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
            "canary": {"name": CANARY, "modelPath": "/models/new"},
            "steps": STEPS if steps is None else steps,
            "analysis": {"interval": "1m", "failureLimit": 0, **analysis},
            "scaleDownDelaySeconds": 30,
        }
    )


def edit(percent: int, add: bool = False, remove: tuple[str, ...] = ()) -> ServeEdit:
    return ServeEdit(STABLE, CANARY, percent, add, remove)


def make_world(spec: RolloutSpec, healthy: bool = True) -> World:
    """The rollout's RayService: the stable with 90, and OTHERS, which it must leave alone."""
    return World(spec, {STABLE: 90, **OTHERS}, healthy)


# === starting ===
def test_rollout_adds_canary_at_weight_zero_when_created() -> None:
    world = make_world(make_spec())
    decision = world.tick()
    assert decision.edit == edit(0, add=True)
    assert world.weights == {STABLE: 90, **OTHERS, CANARY: 0}
    assert decision.status.stage == "Deploying"
    assert decision.status.phase == "Progressing"
    assert decision.status.observed_generation == 1
    assert decision.status.canary_name == CANARY


def test_rollout_waits_when_canary_not_healthy() -> None:
    world = make_world(make_spec(), healthy=False)
    world.tick()
    decision = world.tick()
    assert decision.edit is None
    assert decision.status.stage == "Deploying"
    assert "UPDATING" in decision.status.message


def test_rollout_rolls_back_when_canary_misses_progress_deadline() -> None:
    world = make_world(make_spec(), healthy=False)
    world.tick()
    decision = world.tick(after=timedelta(seconds=601))
    assert decision.status.phase == "RolledBack"
    assert decision.edit == edit(0)
    assert decision.events[0].reason == "CanaryUnhealthy"


def test_rollout_fails_without_editing_when_stable_variant_missing() -> None:
    world = make_world(make_spec())
    world.variants = ["someone-else"]
    decision = world.tick()
    assert decision.status.phase == "Failed" and decision.edit is None
    assert decision.events[-1].reason == "StableVariantNotFound"


def test_rollout_fails_without_editing_when_stable_has_no_traffic_to_move() -> None:
    world = make_world(make_spec())
    world.weights = {STABLE: 0, "amalia-dpo": 100}
    decision = world.tick()
    assert decision.status.phase == "Failed" and decision.edit is None
    assert decision.events[-1].reason == "NothingToMove"
    assert "has weight 0" in decision.status.message


def test_rollout_waits_without_editing_when_rayservice_not_found() -> None:
    world = make_world(make_spec())
    now = world.now + timedelta(seconds=5)
    decision = advance(world.spec, 1, world.status, Observations(None), now)
    assert decision.edit is None and decision.status.stage == "Deploying"
    assert "waiting for RayService amalia" in decision.status.message


# === traffic: only the stable's share moves ===
def test_rollout_sets_canary_share_of_stable_traffic_when_step_is_set_weight() -> None:
    world = make_world(make_spec())
    world.tick()
    assert world.tick().status.stage == "Stepping"  # canary healthy
    decision = world.tick()
    assert decision.edit == edit(10)
    assert world.weights == {STABLE: 81, **OTHERS, CANARY: 9}  # 10% of the stable's 90
    assert decision.status.canary_weight == 10
    assert decision.status.step_index == 1


def test_rollout_keeps_every_other_variants_weight_when_moving_traffic_to_the_end() -> None:
    world = make_world(make_spec())
    canary_weights: list[int] = []
    for _ in range(60):
        if world.status.phase == "Promoted":
            break
        step = world.current_step()
        if step is not None and "analysis" in step:
            world.tick(measured("Successful"), after=timedelta(minutes=1))
        else:
            promote = "promote" if step == {"pause": {}} else None
            world.tick(action=promote, after=timedelta(minutes=6))
        assert {n: world.weights.get(n) for n in OTHERS} == OTHERS, world.weights
        assert sum(world.weights.values()) == 100
        if CANARY in world.weights and world.weights[CANARY] not in canary_weights:
            canary_weights.append(world.weights[CANARY])
    assert world.status.phase == "Promoted"
    assert world.weights == {**OTHERS, CANARY: 90} and world.variants == [*OTHERS, CANARY]
    assert canary_weights == [0, 9, 45, 90]  # 10%, 50%, 100% of the stable's 90


@pytest.mark.parametrize(
    ("weights", "percent", "expected"),
    [
        ({STABLE: 90, "amalia-dpo": 10}, 5, {STABLE: 85, "amalia-dpo": 10, CANARY: 5}),  # 4.5 up
        ({STABLE: 90, "amalia-dpo": 10}, 25, {STABLE: 67, "amalia-dpo": 10, CANARY: 23}),
        ({"amalia-dpo": 10, CANARY: 45, STABLE: 45}, 0, {"amalia-dpo": 10, CANARY: 0, STABLE: 90}),
        ({STABLE: 3, "amalia-dpo": 1}, 100, {STABLE: 0, "amalia-dpo": 1, CANARY: 3}),
    ],
)
def test_split_weights_moves_only_owned_share_and_keeps_order_when_applied(
    weights: dict[str, int], percent: int, expected: dict[str, int]
) -> None:
    out = split_weights(weights, edit(percent))
    assert out == expected and list(out) == list(expected)


def test_split_weights_refuses_to_remove_a_variant_that_would_keep_traffic() -> None:
    assert split_weights({STABLE: 0, CANARY: 90, "x": 10}, edit(100, remove=(STABLE,))) == {
        CANARY: 90,
        "x": 10,
    }
    with pytest.raises(ValueError, match="would leave it traffic"):
        split_weights({STABLE: 90, CANARY: 0}, edit(0, remove=(STABLE,)))


# === steps ===
@pytest.mark.parametrize(
    ("elapsed", "moved"), [(timedelta(minutes=4, seconds=59), False), (timedelta(minutes=5), True)]
)
def test_rollout_leaves_timed_pause_only_when_duration_elapsed(
    elapsed: timedelta, moved: bool
) -> None:
    world = make_world(make_spec())
    world.run_to_step(1)
    started = world.now
    decision = world.tick(after=timedelta(0))
    assert decision.status.phase == "Paused"
    world.now = started
    decision = world.tick(after=elapsed)
    assert (decision.status.step_index == 2) is moved
    assert decision.status.phase == ("Progressing" if moved else "Paused")


def test_rollout_waits_for_a_person_when_pause_is_indefinite() -> None:
    world = make_world(make_spec())
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
    world = make_world(make_spec())
    world.run_to_step(2)
    decision = world.tick(action="promote")
    assert decision.status.stage == "Promoting"
    assert decision.edit == edit(100)
    assert world.weights == {STABLE: 0, **OTHERS, CANARY: 90}


# === analysis ===
def test_rollout_measures_only_after_initial_delay_and_interval_when_analysing() -> None:
    spec = make_spec([{"pause": {"duration": "1m"}}, {"setWeight": 10}, {"analysis": {}}])
    world = make_world(spec.model_copy(update={"analysis": make_spec(initialDelay="2m").analysis}))
    world.run_to_step(0)
    assert not measurement_due(world.spec, world.status, world.now)  # a pause measures nothing
    world.run_to_step(2)
    changed = world.now  # run_to_step ended with the setWeight tick
    assert world.status.weight_changed_at == rfc3339(changed)
    assert not measurement_due(world.spec, world.status, changed + timedelta(seconds=119))
    waiting = world.tick(after=timedelta(0))
    assert "first measurement at" in waiting.status.message
    assert measurement_due(world.spec, world.status, changed + timedelta(minutes=2))
    world.now = changed + timedelta(minutes=2)
    world.tick(measured("Inconclusive", None), after=timedelta(0))
    assert not measurement_due(world.spec, world.status, world.now + timedelta(seconds=59))
    assert measurement_due(world.spec, world.status, world.now + timedelta(seconds=60))


def test_rollout_passes_analysis_when_measurement_successful() -> None:
    world = make_world(make_spec())
    world.run_to_step(2)
    decision = world.tick(measured("Successful", 0.001))
    assert decision.status.step_index == 3
    assert decision.status.condition("Analysing").reason == "Successful"  # type: ignore[union-attr]


def test_rollout_rolls_back_when_analysis_fails_and_names_metric() -> None:
    world = make_world(make_spec())
    world.run_to_step(2)
    decision = world.tick(measured("Failed", 0.25))
    assert decision.status.phase == "RolledBack"
    assert decision.status.canary_weight == 0
    assert decision.edit == edit(0)
    assert world.weights == {STABLE: 90, **OTHERS, CANARY: 0}
    event = decision.events[-1]
    assert (event.type, event.reason) == ("Warning", "AnalysisFailed")
    assert "error-rate=0.25" in event.message and "<= 0.01" in event.message
    ready = decision.status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "RolledBack")
    assert decision.status.condition("Analysing").reason == "Failed"  # type: ignore[union-attr]


def test_rollout_never_fails_on_inconclusive_and_pauses_for_a_person_past_the_limit() -> None:
    world = make_world(make_spec(inconclusiveLimit=2))
    world.run_to_step(2)
    for n in (1, 2):
        decision = world.tick(measured("Inconclusive", None), after=timedelta(minutes=1))
        assert decision.status.phase == "Progressing" and decision.status.step_index == 2
        assert decision.status.analysis is not None
        assert (decision.status.analysis.inconclusive, decision.status.analysis.failures) == (n, 0)
    halted = world.tick(measured("Inconclusive", None), after=timedelta(minutes=1))
    assert halted.status.phase == "Paused" and halted.events[-1].reason == "AnalysisInconclusive"
    assert halted.status.condition("Analysing").status == "Unknown"  # type: ignore[union-attr]
    assert not measurement_due(world.spec, world.status, world.now + timedelta(hours=1))
    assert world.tick(after=timedelta(hours=1)).status.phase == "Paused"
    accepted = world.tick(action="promote")
    assert accepted.status.step_index == 3 and accepted.status.phase == "Progressing"
    assert "accepted by a person" in accepted.status.message


def test_rollout_rolls_back_when_aborted_during_inconclusive_pause() -> None:
    world = make_world(make_spec(inconclusiveLimit=0))
    world.run_to_step(2)
    assert world.tick(measured("Inconclusive", None)).status.phase == "Paused"
    assert world.tick(action="abort").status.phase == "RolledBack"


def test_rollout_pauses_analysis_during_prometheus_outage_and_resumes_counting_after() -> None:
    world = make_world(make_spec(outageLimit="5m"))
    world.run_to_step(2)
    first = world.tick(measured("Error", None), after=timedelta(minutes=1))
    assert first.status.phase == "Progressing" and first.edit is None
    progress = first.status.analysis
    assert progress is not None and progress.outage_since == rfc3339(world.now)
    assert (progress.successes, progress.failures, progress.inconclusive) == (0, 0, 0)
    assert "paused: Prometheus unavailable" in first.status.message
    assert first.status.condition("Analysing").reason == "PrometheusUnavailable"  # type: ignore[union-attr]
    world.tick(measured("Error", None), after=timedelta(minutes=4))  # 4 min of outage: waits
    assert world.status.phase == "Progressing"
    back = world.tick(measured("Successful"), after=timedelta(minutes=1))
    assert back.status.step_index == 3  # the first answer after the outage counts


def test_rollout_rolls_back_when_prometheus_outage_outlasts_its_limit() -> None:
    world = make_world(make_spec(outageLimit="5m"))
    world.run_to_step(2)
    world.tick(measured("Error", None), after=timedelta(minutes=1))
    world.tick(measured("Error", None), after=timedelta(minutes=4, seconds=59))
    assert world.status.phase == "Progressing"
    decision = world.tick(measured("Error", None), after=timedelta(seconds=1))
    assert decision.status.phase == "RolledBack"
    assert decision.events[-1].reason == "AnalysisUnavailable"
    assert "longer than outageLimit 5m" in decision.status.message


def test_rollout_needs_success_count_passes_when_configured() -> None:
    world = make_world(make_spec(successCount=2))
    world.run_to_step(2)
    assert world.tick(measured("Successful")).status.step_index == 2
    assert world.tick(measured("Successful"), after=timedelta(minutes=1)).status.step_index == 3


# === abort, promotion, rollback cleanup, retry ===
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_rollout_rolls_back_when_aborted_at_any_step(step: int) -> None:
    world = make_world(make_spec())
    world.run_to_step(step)
    decision = world.tick(action="abort")
    assert decision.status.phase == "RolledBack"
    assert decision.status.aborted_at is not None
    assert decision.edit == edit(0)
    assert world.weights == {STABLE: 90, **OTHERS, CANARY: 0}
    assert decision.events[-1].reason == "Aborted"
    # The step it stopped at is not running any more.
    assert decision.status.condition("Progressing").status == "False"  # type: ignore[union-attr]
    analysing = decision.status.condition("Analysing")
    assert analysing is None or analysing.reason != "Running"


def test_rollout_ignores_abort_when_old_stable_application_is_already_gone() -> None:
    world = make_world(make_spec())
    world.run_to_step(len(STEPS))
    world.tick()  # Promoting
    world.tick(after=timedelta(seconds=31))  # the old stable's weight goes
    world.tick()  # and then its application
    assert STABLE not in world.variants and world.status.stage == "Promoting"
    decision = world.tick(action="abort")
    assert decision.action_consumed and decision.events[0].reason == "ActionIgnored"
    assert decision.status.phase == "Promoted" and world.weights == {**OTHERS, CANARY: 90}


def test_rollout_rolls_back_when_aborted_while_deploying() -> None:
    world = make_world(make_spec(), healthy=False)
    world.tick()
    assert world.tick(action="abort").status.phase == "RolledBack"


def test_rollout_promotes_and_removes_old_stable_after_delay_when_steps_pass() -> None:
    world = make_world(make_spec())
    world.run_to_step(len(STEPS))
    promoting = world.tick()
    assert promoting.edit == edit(100)
    assert promoting.status.phase == "Progressing"
    assert world.tick(after=timedelta(seconds=10)).edit is None  # in-flight requests drain
    unweighted = world.tick(after=timedelta(seconds=30))
    assert unweighted.edit == edit(100, remove=(STABLE,))
    # The weight goes first; the stable's application stays until the edit is repeated.
    assert STABLE in world.variants and world.weights == {**OTHERS, CANARY: 90}
    assert unweighted.status.phase == "Progressing"
    removed = world.tick()
    assert removed.edit == edit(100, remove=(STABLE,))
    assert world.variants == [*OTHERS, CANARY] and removed.status.phase == "Progressing"
    done = world.tick()
    assert done.edit is None and done.status.phase == "Promoted"
    assert done.status.condition("Ready").status == "True"  # type: ignore[union-attr]
    assert [e.reason for e in done.events] == ["Promoted"]


def test_rollout_removes_canary_after_delay_when_rolled_back() -> None:
    world = make_world(make_spec())
    world.run_to_step(3)
    world.tick(action="abort")
    edits = [world.tick(after=timedelta(seconds=31)).edit, world.tick().edit]
    assert edits == [edit(0, remove=(CANARY,))] * 2
    assert world.variants == [STABLE, *OTHERS] and world.weights == {STABLE: 90, **OTHERS}
    done = world.tick()
    assert done.status.phase == "RolledBack" and done.status.stage == "RolledBack"
    assert done.status.message == "aborted by a person"


def test_rollout_restarts_when_retry_requested_after_rollback() -> None:
    world = make_world(make_spec())
    world.run_to_step(2)
    world.tick(measured("Failed", 1.0))
    world.tick(after=timedelta(minutes=1))
    decision = world.tick(action="retry")
    assert decision.status.stage == "Deploying" and decision.status.step_index == 0
    assert decision.edit == edit(0, add=True)


def test_rollout_ignores_action_when_it_does_not_apply() -> None:
    world = make_world(make_spec())
    world.run_to_step(0)
    before = world.status
    decision = world.tick(action="retry", after=timedelta(0))
    assert decision.action_consumed
    assert decision.events[0].reason == "ActionIgnored"
    assert decision.status.stage == before.stage


def test_rollout_restarts_at_step_zero_when_steps_change() -> None:
    world = make_world(make_spec())
    world.run_to_step(3)
    world.spec = make_spec(steps=[{"setWeight": 20}, {"analysis": {}}])
    decision = world.tick(generation=2)
    assert decision.status.stage == "Deploying" and decision.status.step_index == 0
    assert decision.status.observed_generation == 2
    assert decision.events[0].reason == "RolloutRestarted"
    assert world.weights == {STABLE: 90, **OTHERS, CANARY: 0}


RENAMED = "amalia-new-v2"


def rename_canary(world: World) -> None:
    world.spec = RolloutSpec.model_validate(
        {**make_spec().wire(), "canary": {"name": RENAMED, "modelPath": "/models/new-v2"}}
    )


def test_rollout_removes_renamed_canary_weight_first_when_spec_changes() -> None:
    world = make_world(make_spec())
    world.run_to_step(3)  # the old canary takes 10% of the stable's share
    rename_canary(world)
    first = world.tick(generation=2)
    assert first.edit == ServeEdit(STABLE, RENAMED, 0, add_canary=True, remove=(CANARY,))
    assert world.weights == {STABLE: 90, **OTHERS, RENAMED: 0}
    # The old canary's application waits until its weight is gone; the status remembers it.
    assert world.variants == [STABLE, *OTHERS, CANARY, RENAMED]
    assert first.status.canary_name == CANARY
    second = world.tick(generation=2)
    assert second.edit == first.edit and world.variants == [STABLE, *OTHERS, RENAMED]
    third = world.tick(generation=2)
    assert third.status.canary_name == RENAMED and third.status.stage == "Stepping"


def test_rollout_removes_renamed_specs_old_canary_when_aborted_during_its_removal() -> None:
    world = make_world(make_spec())
    world.run_to_step(3)
    rename_canary(world)
    world.tick(generation=2)  # old canary's weight gone, its application still there
    assert CANARY in world.variants
    aborted = world.tick(action="abort", generation=2)
    assert aborted.status.phase == "RolledBack" and aborted.status.canary_name == CANARY
    for _ in range(4):
        world.tick(after=timedelta(minutes=1), generation=2)
    assert world.status.stage == "RolledBack"
    assert world.variants == [STABLE, *OTHERS] and world.weights == {STABLE: 90, **OTHERS}
    assert world.status.canary_name == RENAMED
    assert world.decisions[-1].edit is None


# === idempotence and resume ===
def test_rollout_is_noop_when_ticked_again_with_same_inputs() -> None:
    world = make_world(make_spec())
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
    world = make_world(make_spec(), healthy=False)
    world.tick()
    since = world.status.condition("Progressing").last_transition_time  # type: ignore[union-attr]
    world.tick(after=timedelta(minutes=3))
    assert world.status.condition("Progressing").last_transition_time == since  # type: ignore[union-attr]
    world.tick(action="abort")
    assert world.status.condition("Progressing").last_transition_time == rfc3339(world.now)  # type: ignore[union-attr]


def test_rollout_resumes_identically_when_restarted_from_any_status() -> None:
    """A restarted operator only has the stored status (JSON): it must decide exactly the same."""
    world = make_world(make_spec(failureLimit=1))
    script: list[dict[str, Any]] = [
        {},
        {},
        {},
        {"after": timedelta(minutes=6)},
        {"measurement": measured("Inconclusive", None), "after": timedelta(minutes=1)},
        {"measurement": measured("Error", None), "after": timedelta(minutes=1)},
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
    assert [e.remove for e in world.edits if e.remove] == [(STABLE,), (STABLE,)]

"""The evaluation and shadow steps of the pure state machine, on an injected clock, a simulated
RayService and evaluation runs built from pass/fail lists (tests/rollout_world.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from rollout_world import World, evaluated, measured

from amalia_operator.constants import EVALUATION_GRACE_S, EVALUATION_RETRY_DELAY_S
from amalia_operator.evaluation.attempts import EvaluationReport, RunKey, run_key
from amalia_operator.models import RolloutSpec

STABLE, CANARY = "amalia-sft", "amalia-new"
OTHERS = {"amalia-dpo": 10}
EVALUATION: dict[str, Any] = {"tolerance": 0.0, "minScore": 0.5, "inconclusiveLimit": 1}


def make_spec(steps: list[dict[str, Any]], **evaluation: Any) -> RolloutSpec:
    """The given steps; an `evaluation: {}` step takes EVALUATION plus `evaluation`."""
    filled = [
        {"evaluation": {**EVALUATION, **evaluation, **s["evaluation"]}} if "evaluation" in s else s
        for s in steps
    ]
    return RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "stable": {"name": STABLE, "modelPath": "/models/sft"},
            "canary": {"name": CANARY, "modelPath": "/models/new"},
            "steps": filled,
            "analysis": {"failureLimit": 0, "initialDelay": "0s"},
            "scaleDownDelaySeconds": 0,
        }
    )


def at_evaluation(steps: list[dict[str, Any]] | None = None, **evaluation: Any) -> World:
    """A world whose rollout has just started the first attempt of its evaluation step."""
    spec = make_spec(steps or [{"evaluation": {}}, {"pause": {}}], **evaluation)
    world = World(spec, {STABLE: 90, **OTHERS})
    index = next(i for i, s in enumerate(spec.steps) if s.evaluation is not None)
    world.run_to_step(index)
    decision = world.tick()
    assert decision.status.evaluation is not None, decision.status.message
    assert decision.status.evaluation.started_at is not None
    return world


# === an attempt ===
def test_evaluation_starts_a_run_and_shows_its_progress_when_step_is_reached() -> None:
    world = at_evaluation()
    status = world.status
    assert status.message == "evaluation at step 0: attempt 1 started"
    assert run_key(world.spec, status) == RunKey(0, 1, status.evaluation.started_at)  # type: ignore[union-attr]
    assert status.condition("Evaluating").status == "True"  # type: ignore[union-attr]
    decision = world.tick(evaluation=EvaluationReport(answered=3, planned=8))
    assert decision.status.phase == "Progressing" and decision.edit is None
    assert "attempt 1 running since" in decision.status.message
    assert "3/8 requests answered" in decision.status.message
    assert (decision.status.evaluation.answered, decision.status.evaluation.planned) == (3, 8)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stable", "canary", "verdict", "in_reason"),
    [
        # As good as the stable, above minScore: the next step.
        ([True, True, True, False], [True, True, True, False], "Passed", "scored 0.750 (3/4)"),
        # Worse than the stable by more than the tolerance (0).
        ([True, True, True, True], [True, True, True, False], "Failed", "threshold 1.000"),
        # Equal to the stable but below minScore: the floor decides.
        ([True, False, False, False], [True, False, False, False], "Failed", "floor 0.5"),
        # A canary that cannot answer fails those items.
        ([True, True, True, True], [None, None, True, True], "Failed", "2 without an answer"),
    ],
    ids=["equal-passes", "worse-fails", "below-floor-fails", "unanswered-fails"],
)
def test_evaluation_verdict_decides_the_step_when_run_finishes(
    stable: list[bool | None], canary: list[bool | None], verdict: str, in_reason: str
) -> None:
    world = at_evaluation()
    decision = world.tick(evaluation=evaluated(stable, canary))
    last = decision.status.last_evaluation
    assert last is not None and last.verdict == verdict and in_reason in last.reason
    assert last.golden_set is not None and last.golden_set.digest == "0123456789ab"
    assert last.stable is not None and last.canary is not None
    assert last.duration_seconds == 12.5
    assert run_key(world.spec, decision.status) is None  # nothing to run any more
    if verdict == "Passed":
        assert decision.status.step_index == 1 and decision.status.phase == "Paused"
        assert decision.status.condition("Evaluating").reason == "Passed"  # type: ignore[union-attr]
        return
    assert decision.status.stage == "RollingBack" and world.weights == {STABLE: 90, **OTHERS,
                                                                        CANARY: 0}  # fmt: skip
    (event,) = decision.events
    assert event.reason == "EvaluationFailed"
    # The event names the score, the threshold and the failing items.
    assert event.message.startswith("rolled back: evaluation at step 0 failed: canary amalia-new")
    assert "threshold" in event.message and "failing: probe-v1/item-" in event.message


def test_evaluation_lists_items_that_went_from_pass_to_fail_when_canary_regresses() -> None:
    world = at_evaluation()
    stable = [True] * 30
    canary = [i % 2 == 0 for i in range(30)]
    last = world.tick(evaluation=evaluated(stable, canary)).status.last_evaluation  # type: ignore[arg-type]
    assert last is not None and last.regression_count == 15
    assert last.regressions[:2] == ["probe-v1/item-1", "probe-v1/item-3"]
    assert len(last.regressions) == 15
    assert last.stable.score == 1.0 and last.canary.score == 0.5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("report", "in_reason"),
    [
        (evaluated([], [], errors=("ingress unreachable: refused",)), "ingress unreachable"),
        (evaluated([None, True], [True, True]), "could not answer 1 of 2 items"),
        (evaluated([True], [True], planned=3), "1 of 3 items were asked"),
    ],
    ids=["evaluator-error", "stable-unanswered", "cut-short"],
)
def test_evaluation_tries_again_after_delay_when_run_is_inconclusive(
    report: EvaluationReport, in_reason: str
) -> None:
    world = at_evaluation()
    decision = world.tick(evaluation=report)
    status = decision.status
    assert status.stage == "Stepping" and status.phase == "Progressing" and not decision.events
    assert status.last_evaluation is not None and status.last_evaluation.verdict == "Inconclusive"
    assert in_reason in status.last_evaluation.reason and in_reason in status.message
    progress = status.evaluation
    assert progress is not None and (progress.attempt, progress.inconclusive) == (2, 1)
    assert progress.started_at is None and run_key(world.spec, status) is None
    # No second run until the delay has passed.
    assert world.tick(after=timedelta(seconds=EVALUATION_RETRY_DELAY_S - 10)).status.evaluation
    assert world.status.evaluation.started_at is None  # type: ignore[union-attr]
    decision = world.tick(after=timedelta(seconds=10))
    assert decision.status.message == "evaluation at step 0: attempt 2 started"
    assert run_key(world.spec, decision.status) is not None


def test_evaluation_halts_for_a_person_and_promote_accepts_it_when_inconclusive_past_limit() -> (
    None
):
    world = at_evaluation()  # inconclusiveLimit 1: the second inconclusive run halts
    error = evaluated([], [], errors=("ingress unreachable: refused",))
    world.tick(evaluation=error)
    world.tick(after=timedelta(seconds=EVALUATION_RETRY_DELAY_S))
    decision = world.tick(evaluation=error)
    status = decision.status
    assert status.phase == "Paused" and status.evaluation.halted  # type: ignore[union-attr]
    progressing = status.condition("Progressing")
    assert progressing is not None and progressing.reason == "EvaluationInconclusive"
    assert status.condition("Evaluating").status == "Unknown"  # type: ignore[union-attr]
    (event,) = decision.events
    assert event.reason == "EvaluationInconclusive" and "promote accepts this step" in event.message
    # Halted: nothing runs, however long it waits.
    assert run_key(world.spec, world.tick(after=timedelta(hours=1)).status) is None
    decision = world.tick(action="promote")
    assert decision.action_consumed and decision.status.step_index == 1
    assert decision.status.message == "inconclusive evaluation at step 0 accepted by a person"


def test_evaluation_is_inconclusive_when_run_outlives_its_timeout() -> None:
    world = at_evaluation(timeout="10m")
    running = EvaluationReport(answered=5, planned=8)
    world.tick(evaluation=running, after=timedelta(minutes=10))
    assert world.status.evaluation.started_at is not None  # type: ignore[union-attr]
    decision = world.tick(evaluation=running, after=timedelta(seconds=EVALUATION_GRACE_S))
    progress = decision.status.evaluation
    assert progress is not None and progress.inconclusive == 1 and progress.attempt == 2
    assert "still going 10m after it started (timeout)" in decision.status.message
    assert run_key(world.spec, decision.status) is None  # the operator cancels the hung run


def test_evaluation_counts_an_interrupted_run_when_operator_restarted_mid_run() -> None:
    world = at_evaluation()
    # A new operator process knows of no run: it passes no report for the one status names.
    decision = world.tick()
    last = decision.status.last_evaluation
    assert last is not None and last.verdict == "Inconclusive"
    assert "interrupted: the operator restarted" in last.reason
    assert decision.status.evaluation.attempt == 2  # type: ignore[union-attr]


def test_abort_stops_a_running_evaluation_when_requested_mid_run() -> None:
    world = at_evaluation()
    decision = world.tick(action="abort", evaluation=EvaluationReport(answered=1, planned=8))
    assert decision.status.stage == "RollingBack" and decision.status.aborted_at
    assert decision.status.evaluation.started_at is None  # type: ignore[union-attr]
    assert run_key(world.spec, decision.status) is None


# === shadow traffic ===
SHADOW_STEPS: list[dict[str, Any]] = [
    {"shadow": {"percent": 12.5, "maxInFlight": 2}},
    {"setWeight": 20},
    {"pause": {}},
    {"shadow": {"percent": 0}},
    {"pause": {}},
]


def test_shadow_step_copies_requests_to_canary_and_keeps_weights_when_reached() -> None:
    world = World(make_spec(SHADOW_STEPS), {STABLE: 90, **OTHERS})
    world.run_to_step(0)
    decision = world.tick()
    assert decision.edit is not None and decision.edit.canary_percent == 0
    assert world.weights == {STABLE: 90, **OTHERS, CANARY: 0}
    assert world.shadow == {"variant": CANARY, "percent": 12.5, "maxInFlight": 2}
    assert decision.status.shadow is not None and decision.status.step_index == 1
    assert "12.5% of the requests copied to canary amalia-new" in decision.status.message
    # A weight change keeps the shadow; a shadow of 0 turns it off.
    world.tick()
    assert world.weights[CANARY] == 18 and world.shadow is not None
    world.tick(action="promote")
    decision = world.tick()
    assert world.shadow is None and decision.status.shadow is None
    assert world.weights[CANARY] == 18


@pytest.mark.parametrize(
    ("steps", "finish", "stage"),
    [
        ([{"shadow": {"percent": 10}}, {"pause": {}}], {"action": "abort"}, "RolledBack"),
        ([{"shadow": {"percent": 10}}, {"pause": {}}], {"action": "promote"}, "Promoted"),
        (
            [{"shadow": {"percent": 10}}, {"analysis": {}}],
            {"measurement": measured("Failed", 0.5)},
            "RolledBack",
        ),
        (
            [{"shadow": {"percent": 10}}, {"evaluation": {}}],
            {"evaluation": evaluated([True, True], [False, False])},
            "RolledBack",
        ),
    ],
    ids=["abort", "promotion", "analysis-failure", "evaluation-failure"],
)
def test_rollout_leaves_no_shadow_behind_when_it_ends(
    steps: list[dict[str, Any]], finish: dict[str, Any], stage: str
) -> None:
    world = World(make_spec(steps), {STABLE: 90, **OTHERS})
    world.run_to_step(1)
    if "evaluation" in finish:
        world.tick()  # the evaluation's first attempt starts
    assert world.shadow is not None
    world.tick(after=timedelta(minutes=2), **finish)
    for _ in range(5):
        if world.status.stage != "Stepping":
            # The edit that leaves the steps (promotion, rollback) turns the shadow off with it.
            assert world.shadow is None and world.status.shadow is None
        world.tick()
    assert world.status.stage == stage and world.shadow is None
    assert CANARY not in world.variants or stage == "Promoted"

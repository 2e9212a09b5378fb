"""A simulated RayService for the pure rollout state machine: it applies each edit the way
serveconfig.apply_edit does (weights, applications, shadow traffic) and reports every variant
healthy (or not), on an injected clock; and finished evaluation runs built from pass/fail lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from amalia_operator.evaluation.attempts import EvaluationReport
from amalia_operator.evaluation.result import Attempt, EvaluationResult, ItemResult, summarise
from amalia_operator.models import (
    GoldenSetInfo,
    Measurement,
    MetricResult,
    RolloutSpec,
    RolloutStatus,
)
from amalia_operator.rollout import (
    Decision,
    Observations,
    ServeEdit,
    ServeObservation,
    advance,
    rfc3339,
    split_weights,
)

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
GOLDEN = GoldenSetInfo(name="probe-v1", source="shipped", items=4, digest="0123456789ab")


def measured(outcome: str, value: float | None = 0.0) -> Measurement:
    result = MetricResult(metric="error-rate", outcome=outcome, value=value, max=0.01)  # type: ignore[arg-type]
    return Measurement(outcome=outcome, time=rfc3339(T0), results=[result])  # type: ignore[arg-type]


def _attempt(passed: bool | None) -> Attempt:
    """True/False: answered and passed or failed; None: no answer (a 503, a timeout)."""
    if passed is None:
        return Attempt(answered=False, passed=False, latency_s=0.1, detail="HTTP 503: busy")
    return Attempt(answered=True, passed=passed, latency_s=0.1, detail="checked", text="resposta")


def evaluated(
    stable: list[bool | None],
    canary: list[bool | None],
    errors: tuple[str, ...] = (),
    planned: int | None = None,
) -> EvaluationReport:
    """A finished run: item i passed (True), failed (False) or went unanswered (None) per variant."""
    items = [
        ItemResult(key=f"probe-v1/item-{i}", category="sonda", stable=_attempt(s),
                   canary=_attempt(c))
        for i, (s, c) in enumerate(zip(stable, canary, strict=True))
    ]  # fmt: skip
    total = len(items) if planned is None else planned
    result: EvaluationResult = summarise(
        "amalia-sft", "amalia-new", items, total, 12.5, list(errors)
    )
    return EvaluationReport(2 * len(items), 2 * total, result, GOLDEN)


class World:
    """A RayService that applies edits and reports the canary healthy once it is deployed."""

    def __init__(self, spec: RolloutSpec, weights: dict[str, int], healthy: bool = True):
        self.spec, self.healthy = spec, healthy
        self.variants: list[str] = list(weights)
        self.weights: dict[str, int] = dict(weights)
        self.shadow: dict[str, Any] | None = None
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
        evaluation: EvaluationReport | None = None,
    ) -> Decision:
        self.now += after
        if measurement is not None:  # measured now, as the handler would
            measurement = measurement.model_copy(update={"time": rfc3339(self.now)})
        obs = Observations(self.observe(), measurement, action, evaluation)  # type: ignore[arg-type]
        decision = advance(self.spec, generation, self.status, obs, self.now)
        if decision.edit is not None:
            self.apply(decision.edit)
        self.status = decision.status
        self.decisions.append(decision)
        return decision

    def apply(self, change: ServeEdit) -> None:
        """Like serveconfig.apply_edit: an application goes only once its weight is gone."""
        self.edits.append(change)
        for name in change.remove:
            if name in self.variants and name not in self.weights:
                self.variants.remove(name)
        if change.add_canary and change.canary not in self.variants:
            self.variants.append(change.canary)
        self.weights = split_weights(self.weights, change)
        if change.shadow is not None:
            self.shadow = {"variant": change.canary, **change.shadow.wire()}
        elif (self.shadow or {}).get("variant") in change.owned:
            self.shadow = None

    def run_to_step(self, index: int) -> None:
        """Ticks (passing analyses, promoting pauses) until status.stepIndex == index."""
        for _ in range(50):
            if self.status.stage == "Stepping" and self.status.step_index == index:
                return
            step = self.current_step()
            if step is not None and "analysis" in step:
                self.tick(measured("Successful"), after=timedelta(minutes=1))
            elif step is not None and "evaluation" in step:
                running = self.status.evaluation and self.status.evaluation.started_at
                self.tick(evaluation=evaluated([True], [True]) if running else None)
            elif step is not None and step.get("pause") == {}:
                self.tick(action="promote")
            else:
                self.tick(after=timedelta(minutes=6))
        raise AssertionError(f"never reached step {index}: {self.status}")

    def current_step(self) -> dict[str, Any] | None:
        if self.status.stage != "Stepping" or self.status.step_index >= len(self.spec.steps):
            return None
        return self.spec.steps[self.status.step_index].wire()

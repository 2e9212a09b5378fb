"""Typed views of a ModelRollout's spec and status (camelCase on the wire, snake_case in Python).

The API server already validated the object against the CRD (operators/crd.py); these models give
the state machine typed access and hold the defaults in one place. No kopf or kubernetes import
here.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from amalia_operator.constants import BUILTIN_QUERIES, DEFAULT_METRICS

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# Prometheus range selectors take one integer and one unit.
WINDOW_PATTERN = r"^[0-9]+(ms|s|m|h|d)$"
VARIANT_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """Go-style duration (`90s`, `5m`, `1h30m`, `250ms`) as a timedelta."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h30m)")
    return timedelta(seconds=sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text)))


class WireModel(BaseModel):
    """camelCase field names on the wire; unknown keys are refused."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, protected_namespaces=()
    )

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StableVariant(WireModel):
    name: str = Field(..., pattern=VARIANT_NAME_PATTERN)
    model_path: str = Field(..., min_length=1)


class CanaryVariant(StableVariant):
    engine: dict[str, Any] | None = Field(
        None, description="Keys merged over the stable variant's `engine` (e.g. max_batch_size)."
    )
    deployment: dict[str, Any] | None = Field(
        None, description="Keys merged over the stable variant's Serve `deployment` options."
    )


class Metric(WireModel):
    name: str = Field(..., min_length=1)
    query: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _query_known(self) -> Metric:
        if self.query is None and self.name not in BUILTIN_QUERIES:
            raise ValueError(
                f"metric {self.name!r} needs a query (built-ins: {sorted(BUILTIN_QUERIES)})"
            )
        if self.min is None and self.max is None:
            raise ValueError(f"metric {self.name!r} needs a min or a max threshold")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"metric {self.name!r}: min must not exceed max")
        return self

    def promql(self) -> str:
        """The query template; `$variant` and `$window` are substituted by the analysis."""
        return self.query if self.query is not None else BUILTIN_QUERIES[self.name]


class AnalysisSettings(WireModel):
    prometheus_url: str = Field("http://prometheus.monitoring:9090", alias="prometheusURL")
    interval: str = Field("1m", pattern=DURATION_PATTERN)
    window: str = Field("1m", pattern=WINDOW_PATTERN)
    initial_delay: str = Field("1m", pattern=DURATION_PATTERN)
    min_requests: int = Field(20, ge=0)
    failure_limit: int = Field(0, ge=0)
    inconclusive_limit: int = Field(3, ge=0)
    outage_limit: str = Field("10m", pattern=DURATION_PATTERN)
    success_count: int = Field(1, ge=1)
    metrics: list[Metric] = Field(
        default_factory=lambda: [Metric.model_validate(m) for m in DEFAULT_METRICS]
    )

    @property
    def interval_td(self) -> timedelta:
        return parse_duration(self.interval)

    @property
    def initial_delay_td(self) -> timedelta:
        return parse_duration(self.initial_delay)

    @property
    def outage_limit_td(self) -> timedelta:
        return parse_duration(self.outage_limit)


class Pause(WireModel):
    duration: str | None = Field(None, pattern=DURATION_PATTERN)


class AnalysisStep(WireModel):
    success_count: int | None = Field(None, ge=1)


# Wire names of the step kinds, in order; a step sets exactly one. A new kind (an evaluation step)
# is a new field on Step plus its name here: the CRD's one-of rule is generated from this tuple.
STEP_KINDS: tuple[str, ...] = ("setWeight", "pause", "analysis")


class Step(WireModel):
    set_weight: int | None = Field(None, ge=0, le=100)
    pause: Pause | None = None
    analysis: AnalysisStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        if len(self.wire()) != 1:
            raise ValueError(f"a step must set exactly one of {', '.join(STEP_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        """The wire name of the one kind this step sets."""
        (name,) = self.wire()
        return name


class RolloutSpec(WireModel):
    ray_service_name: str = Field(..., min_length=1)
    application: str = Field("amalia", min_length=1)
    stable: StableVariant
    canary: CanaryVariant
    steps: list[Step] = Field(..., min_length=1)
    analysis: AnalysisSettings = Field(default_factory=lambda: AnalysisSettings.model_validate({}))
    scale_down_delay_seconds: int = Field(30, ge=0)
    progress_deadline_seconds: int = Field(600, ge=1)

    @model_validator(mode="after")
    def _distinct(self) -> RolloutSpec:
        if self.stable.name == self.canary.name:
            raise ValueError("stable.name and canary.name must differ")
        return self


Stage = Literal[
    "Deploying", "Stepping", "Promoting", "Promoted", "RollingBack", "RolledBack", "Failed"
]
# Failed: evidence the canary is worse. Inconclusive: no evidence either way (too few canary
# requests, no data). Error: Prometheus could not answer, so nothing was measured at all.
Outcome = Literal["Successful", "Failed", "Inconclusive", "Error"]


class MetricResult(WireModel):
    metric: str
    outcome: Outcome
    value: float | None = None
    min: float | None = None
    max: float | None = None
    message: str = ""

    def describe(self) -> str:
        bound = " and ".join(
            s
            for s in (
                f">= {self.min}" if self.min is not None else "",
                f"<= {self.max}" if self.max is not None else "",
            )
            if s
        )
        value = "no value" if self.value is None else f"{self.value:.6g}"
        extra = f" ({self.message})" if self.message else ""
        return f"{self.metric}={value} (threshold {bound or 'none'}){extra}"


class Measurement(WireModel):
    """One evaluation of all metrics at one instant."""

    outcome: Outcome
    time: str
    results: list[MetricResult] = Field(default_factory=list)


class AnalysisProgress(WireModel):
    step_index: int
    successes: int = 0
    failures: int = 0
    inconclusive: int = 0
    # First of the consecutive measurements Prometheus could not answer; cleared by an answer.
    outage_since: str | None = None
    # Too many inconclusive measurements: the step waits for a person (promote or abort).
    halted: bool = False
    last: Measurement | None = None


class Condition(WireModel):
    type: Literal["Ready", "Progressing", "Analysing"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str


class RolloutStatus(WireModel):
    """Everything needed to resume: a restarted operator continues from this alone."""

    # Tolerates keys an older operator version wrote; they are dropped on the next write.
    model_config = ConfigDict(**{**WireModel.model_config, "extra": "ignore"})

    observed_generation: int | None = None
    phase: str = "Pending"
    message: str = ""
    stage: Stage | None = None
    rollout_hash: str | None = None
    canary_name: str | None = None
    step_index: int = 0
    canary_weight: int = 0
    # The whole traffic split of the front application after the last tick: every variant,
    # not only the two this rollout moves.
    weights: dict[str, int] | None = None
    step_started_at: str | None = None
    # When the canary's share last changed: analysis measures only initialDelay after it.
    weight_changed_at: str | None = None
    stage_entered_at: str | None = None
    analysis: AnalysisProgress | None = None
    last_analysis: Measurement | None = None
    aborted_at: str | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, ctype: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == ctype), None)

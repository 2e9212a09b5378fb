"""Typed views of a ModelRollout's spec and status (camelCase on the wire, snake_case in Python).

The API server already validated the object against the CRD (operators/crd.py); these models give
the state machine typed access and hold the defaults in one place. No kopf or kubernetes import
here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from amalia_operator.constants import (
    BUILTIN_QUERIES,
    DEFAULT_GOLDEN_SET,
    DEFAULT_METRICS,
    DEFAULT_MIN_SCORE,
    DEFAULT_TOLERANCE,
    SHADOW_BUILTINS,
)

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# Prometheus range selectors take one integer and one unit.
WINDOW_PATTERN = r"^[0-9]+(ms|s|m|h|d)$"
# Lowercase letters, digits and '-', at most 63: variant names, golden-set names and item ids.
SLUG_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
VARIANT_NAME_PATTERN = SLUG_PATTERN
# A ConfigMap's name (a DNS subdomain) and one of its keys (a file name).
CONFIG_MAP_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
CONFIG_MAP_KEY_PATTERN = r"^[-._a-zA-Z0-9]{1,253}$"
URL_PATTERN = r"^https?://[^\s/?#]+(/[^\s]*)?$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """Go-style duration (`90s`, `5m`, `1h30m`, `250ms`) as a timedelta."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h30m)")
    return timedelta(seconds=sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text)))


def rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


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
    source: Literal["live", "shadow"] | None = Field(
        None,
        description="What a custom query measures: `live` requests (default) or the answers to "
        "shadowed requests; built-ins know their own.",
    )

    @model_validator(mode="after")
    def _query_known(self) -> Metric:
        if self.query is None and self.name not in BUILTIN_QUERIES:
            raise ValueError(
                f"metric {self.name!r} needs a query (built-ins: {sorted(BUILTIN_QUERIES)})"
            )
        if self.query is None and self.source is not None:
            raise ValueError(f"metric {self.name!r}: source is for custom queries only")
        if self.min is None and self.max is None:
            raise ValueError(f"metric {self.name!r} needs a min or a max threshold")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"metric {self.name!r}: min must not exceed max")
        return self

    def promql(self) -> str:
        """The query template; `$variant` and `$window` are substituted by the analysis."""
        return self.query if self.query is not None else BUILTIN_QUERIES[self.name]

    @property
    def shadow(self) -> bool:
        """Judged on the answers to shadowed requests (gated on their count, not live ones)."""
        if self.query is None:
            return self.name in SHADOW_BUILTINS
        return self.source == "shadow"


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
    metrics: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of spec.analysis.metrics judged at this step (default: all of them).",
    )


class ConfigMapRef(WireModel):
    name: str = Field(..., pattern=CONFIG_MAP_NAME_PATTERN)
    key: str = Field(..., pattern=CONFIG_MAP_KEY_PATTERN)


class GoldenSetSource(WireModel):
    """Where the evaluation's golden set comes from: a set the operator finds by name (shipped, or
    mounted from a ConfigMap into its pod), or a key of a ConfigMap in the rollout's namespace."""

    name: str | None = Field(None, pattern=SLUG_PATTERN)
    config_map_ref: ConfigMapRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> GoldenSetSource:
        if (self.name is None) == (self.config_map_ref is None):
            raise ValueError("a golden set is given by exactly one of name and configMapRef")
        return self

    def describe(self, namespace: str) -> str:
        ref = self.config_map_ref
        if ref is None:
            return str(self.name)
        return f"ConfigMap {namespace}/{ref.name} key {ref.key}"


class EvaluationStep(WireModel):
    golden_set: GoldenSetSource = Field(
        default_factory=lambda: GoldenSetSource(name=DEFAULT_GOLDEN_SET)
    )
    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0, le=1)
    min_score: float = Field(DEFAULT_MIN_SCORE, ge=0, le=1)
    timeout: str = Field("30m", pattern=DURATION_PATTERN)
    max_requests: int = Field(500, ge=2)
    request_timeout: str = Field("30s", pattern=DURATION_PATTERN)
    max_concurrency: int = Field(4, ge=1, le=64)
    ingress_url: str | None = Field(None, alias="ingressURL", pattern=URL_PATTERN)
    inconclusive_limit: int = Field(2, ge=0)

    @property
    def timeout_td(self) -> timedelta:
        return parse_duration(self.timeout)

    @property
    def request_timeout_td(self) -> timedelta:
        return parse_duration(self.request_timeout)


class ShadowStep(WireModel):
    percent: float = Field(..., ge=0, le=100)
    max_in_flight: int = Field(4, ge=1, le=1024)


# Wire names of the step kinds, in order; a step sets exactly one. A new kind is a new field on
# Step plus its name here: the CRD's one-of rule is generated from this tuple.
STEP_KINDS: tuple[str, ...] = ("setWeight", "pause", "analysis", "evaluation", "shadow")


class Step(WireModel):
    set_weight: int | None = Field(None, ge=0, le=100)
    pause: Pause | None = None
    analysis: AnalysisStep | None = None
    evaluation: EvaluationStep | None = None
    shadow: ShadowStep | None = None

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

    @model_validator(mode="after")
    def _step_metrics_known(self) -> RolloutSpec:
        known = {m.name for m in self.analysis.metrics}
        for index, step in enumerate(self.steps):
            unknown = sorted(set(step.analysis.metrics or []) - known) if step.analysis else []
            if unknown:
                raise ValueError(
                    f"steps[{index}].analysis.metrics names {unknown}, which spec.analysis.metrics "
                    f"does not define (it has {sorted(known)})"
                )
        return self

    def metrics_for(self, step: Step) -> list[Metric]:
        """The metrics an analysis step judges: those it names, else all of spec.analysis."""
        names = step.analysis.metrics if step.analysis is not None else None
        return [m for m in self.analysis.metrics if names is None or m.name in names]


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


class EvaluationProgress(WireModel):
    """The evaluation step in progress: its attempts and the run now in flight, if any."""

    step_index: int
    attempt: int = 1
    # When the attempt now in flight started; None between attempts. With step_index and attempt,
    # it names the run: an operator that finds no run of that name in itself has restarted since.
    started_at: str | None = None
    # After an inconclusive attempt, when the next one may start.
    next_attempt_at: str | None = None
    # Requests of the run in flight answered so far, of `planned` (both variants together).
    answered: int = 0
    planned: int = 0
    inconclusive: int = 0
    # Too many inconclusive attempts: the step waits for a person (promote or abort).
    halted: bool = False


class GoldenSetInfo(WireModel):
    """Which golden set a run asked: its name, where it came from and a digest of its content (a
    changed item gives another digest, so two runs with one digest asked the same questions)."""

    name: str
    source: str
    items: int
    digest: str


class EvaluationScore(WireModel):
    variant: str
    score: float
    passed: int
    total: int
    unanswered: int


class EvaluationSummary(WireModel):
    """One finished evaluation run and its verdict (status.lastEvaluation)."""

    step_index: int
    attempt: int
    verdict: Literal["Passed", "Failed", "Inconclusive"]
    reason: str
    time: str
    duration_seconds: float
    golden_set: GoldenSetInfo | None = None
    stable: EvaluationScore | None = None
    canary: EvaluationScore | None = None
    threshold: float | None = None
    # Items the stable passed and the canary failed, the first few of `regressionCount`.
    regressions: list[str] = Field(default_factory=list)
    regression_count: int = 0


class ShadowStatus(WireModel):
    """The share of the alias's requests copied to the canary, set by the last shadow step."""

    percent: float
    max_in_flight: int


class Condition(WireModel):
    type: Literal["Ready", "Progressing", "Analysing", "Evaluating"]
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
    evaluation: EvaluationProgress | None = None
    last_evaluation: EvaluationSummary | None = None
    # Shadow traffic this rollout has set on the ingress; None when off.
    shadow: ShadowStatus | None = None
    aborted_at: str | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, ctype: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == ctype), None)

"""ModelRollouts the CRD must accept and refuse, with the message each refusal carries.

Shared by the offline schema test (jsonschema + celpy, tests/unit/operator/test_crd_schema.py) and
the real API server (tests/integration/k8s/test_k8s_crd.py). A CEL rule's message is the same in
both; an OpenAPI keyword's wording differs, so each case gives both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

GOOD: dict[str, Any] = {
    "apiVersion": "serving.amalia.pt/v1alpha1",
    "kind": "ModelRollout",
    "metadata": {"name": "r", "namespace": "amalia"},
    "spec": {
        "rayServiceName": "amalia",
        "stable": {"name": "amalia-sft", "modelPath": "/models/sft"},
        "canary": {"name": "amalia-dpo", "modelPath": "/models/dpo"},
        "steps": [{"setWeight": 10}, {"pause": {}}, {"analysis": {}}],
        "analysis": {"metrics": [{"name": "error-rate", "max": 0.01}]},
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD)
    obj["spec"].update(changes)
    return obj


@dataclass(frozen=True)
class Case:
    name: str
    obj: dict[str, Any]
    offline: str  # in jsonschema's or the CEL rule's message
    server: str  # in the API server's message


STEP_ONE_OF = "a step must set exactly one of setWeight, pause, analysis, evaluation, shadow"
STEP_METRICS = "an analysis step names a metric spec.analysis.metrics lacks"
GOLDEN_ONE_OF = "a golden set is given by exactly one of name and configMapRef"


def evaluation(**fields: Any) -> dict[str, Any]:
    return with_spec(steps=[{"evaluation": fields}])


def shadow(**fields: Any) -> dict[str, Any]:
    return with_spec(steps=[{"shadow": fields}])


BAD: list[Case] = [
    Case(
        "weight above 100",
        with_spec(steps=[{"setWeight": 101}]),
        "maximum of 100",
        "should be less than or equal to 100",
    ),
    Case(
        "negative weight",
        with_spec(steps=[{"setWeight": -1}]),
        "minimum of 0",
        "should be greater than or equal to 0",
    ),
    Case(
        "stable equals canary",
        with_spec(canary={"name": "amalia-sft", "modelPath": "/m"}),
        "stable.name and canary.name must differ",
        "stable.name and canary.name must differ",
    ),
    Case("empty steps", with_spec(steps=[]), "should be non-empty", "should have at least 1 items"),
    Case("step with nothing", with_spec(steps=[{}]), STEP_ONE_OF, STEP_ONE_OF),
    Case(
        "step with two kinds",
        with_spec(steps=[{"setWeight": 5, "pause": {}}]),
        STEP_ONE_OF,
        STEP_ONE_OF,
    ),
    Case(
        "step with three kinds",
        with_spec(steps=[{"setWeight": 5, "pause": {}, "analysis": {}}]),
        STEP_ONE_OF,
        STEP_ONE_OF,
    ),
    Case(
        "custom metric without query",
        with_spec(analysis={"metrics": [{"name": "mine", "max": 1}]}),
        "a custom metric needs a query",
        "a custom metric needs a query",
    ),
    Case(
        "metric without threshold",
        with_spec(analysis={"metrics": [{"name": "error-rate"}]}),
        "a metric needs a min or a max threshold",
        "a metric needs a min or a max threshold",
    ),
    Case(
        "min above max",
        with_spec(analysis={"metrics": [{"name": "error-rate", "min": 2, "max": 1}]}),
        "metric min must not exceed max",
        "metric min must not exceed max",
    ),
    Case(
        "bad pause duration",
        with_spec(steps=[{"pause": {"duration": "five minutes"}}]),
        "does not match",
        "spec.steps[0].pause.duration in body should match",
    ),
    Case(
        "bad variant name",
        with_spec(canary={"name": "Amalia_DPO", "modelPath": "/m"}),
        "does not match",
        "spec.canary.name in body should match",
    ),
    Case(
        "missing canary",
        {**GOOD, "spec": {k: v for k, v in GOOD["spec"].items() if k != "canary"}},
        "'canary' is a required property",
        "spec.canary: Required value",
    ),
    Case(
        "negative failure limit",
        with_spec(analysis={"failureLimit": -1}),
        "minimum of 0",
        "spec.analysis.failureLimit in body should be greater than or equal to 0",
    ),
    Case(
        "negative min requests",
        with_spec(analysis={"minRequests": -5}),
        "minimum of 0",
        "spec.analysis.minRequests in body should be greater than or equal to 0",
    ),
    Case(
        "negative inconclusive limit",
        with_spec(analysis={"inconclusiveLimit": -1}),
        "minimum of 0",
        "spec.analysis.inconclusiveLimit in body should be greater than or equal to 0",
    ),
    Case(
        "bad initial delay",
        with_spec(analysis={"initialDelay": "soon"}),
        "does not match",
        "spec.analysis.initialDelay in body should match",
    ),
    Case(
        "bad outage limit",
        with_spec(analysis={"outageLimit": "10"}),
        "does not match",
        "spec.analysis.outageLimit in body should match",
    ),
    # --- evaluation steps ---
    Case(
        "golden set by name and configmap",
        evaluation(goldenSet={"name": "pt-pt-core-v1", "configMapRef": {"name": "g", "key": "k"}}),
        GOLDEN_ONE_OF,
        GOLDEN_ONE_OF,
    ),
    Case("golden set empty", evaluation(goldenSet={}), GOLDEN_ONE_OF, GOLDEN_ONE_OF),
    Case(
        "golden set configmap without key",
        evaluation(goldenSet={"configMapRef": {"name": "g"}}),
        "'key' is a required property",
        "spec.steps[0].evaluation.goldenSet.configMapRef.key: Required value",
    ),
    Case(
        "tolerance above 1",
        evaluation(tolerance=1.5),
        "maximum of 1",
        "spec.steps[0].evaluation.tolerance in body should be less than or equal to 1",
    ),
    Case(
        "negative min score",
        evaluation(minScore=-0.1),
        "minimum of 0",
        "spec.steps[0].evaluation.minScore in body should be greater than or equal to 0",
    ),
    Case(
        "max requests below 2",
        evaluation(maxRequests=1),
        "minimum of 2",
        "spec.steps[0].evaluation.maxRequests in body should be greater than or equal to 2",
    ),
    Case(
        "bad evaluation timeout",
        evaluation(timeout="half an hour"),
        "does not match",
        "spec.steps[0].evaluation.timeout in body should match",
    ),
    Case(
        "ingress url without scheme",
        evaluation(ingressURL="amalia-serve-svc:8000"),
        "does not match",
        "spec.steps[0].evaluation.ingressURL in body should match",
    ),
    # --- shadow steps ---
    Case(
        "shadow above 100",
        shadow(percent=100.5),
        "maximum of 100",
        "spec.steps[0].shadow.percent in body should be less than or equal to 100",
    ),
    Case(
        "shadow without percent",
        shadow(maxInFlight=4),
        "'percent' is a required property",
        "spec.steps[0].shadow.percent: Required value",
    ),
    Case(
        "shadow with no room in flight",
        shadow(percent=10, maxInFlight=0),
        "minimum of 1",
        "spec.steps[0].shadow.maxInFlight in body should be greater than or equal to 1",
    ),
    Case(
        "step with evaluation and shadow",
        with_spec(steps=[{"evaluation": {}, "shadow": {"percent": 5}}]),
        STEP_ONE_OF,
        STEP_ONE_OF,
    ),
    # --- analysis of shadow traffic ---
    Case(
        "analysis step names an undefined metric",
        with_spec(steps=[{"analysis": {"metrics": ["shadow-error-rate"]}}]),
        STEP_METRICS,
        STEP_METRICS,
    ),
    Case(
        "analysis step names a default metric without spec metrics",
        {
            **GOOD,
            "spec": {
                **{k: v for k, v in GOOD["spec"].items() if k != "analysis"},
                "steps": [{"analysis": {"metrics": ["no-such-metric"]}}],
            },
        },
        STEP_METRICS,
        STEP_METRICS,
    ),
    Case(
        "source on a built-in metric",
        with_spec(
            analysis={"metrics": [{"name": "shadow-error-rate", "max": 1, "source": "live"}]}
        ),
        "metric source is for custom queries",
        "metric source is for custom queries",
    ),
]

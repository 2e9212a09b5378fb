"""The ModelRollout CRD, in one place: this module is the source of truth for its schema.

`python -m amalia_operator.crd` writes `operators/crd/*.yaml` (package data); the chart and
`manifests/` copy those files, and a test proves the files are current. OpenAPI keywords refuse
malformed fields; CEL rules (`x-kubernetes-validations`) refuse objects that are well-typed but
meaningless, with a message a person can act on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from amalia_operator.constants import (
    BUILTIN_QUERIES,
    DEFAULT_GOLDEN_SET,
    DEFAULT_METRICS,
    DEFAULT_MIN_SCORE,
    DEFAULT_TOLERANCE,
    GROUP,
    KIND,
    PEERING_GROUP,
    PEERING_VERSION,
    PLURAL,
    SERVE_PORT,
    SERVE_SERVICE_SUFFIX,
    SHADOW_BUILTINS,
    SHORT_NAMES,
    VERSION,
)
from amalia_operator.models import (
    CONFIG_MAP_KEY_PATTERN,
    CONFIG_MAP_NAME_PATTERN,
    DURATION_PATTERN,
    SLUG_PATTERN,
    STEP_KINDS,
    URL_PATTERN,
    VARIANT_NAME_PATTERN,
    WINDOW_PATTERN,
    EvaluationStep,
    ShadowStep,
)

CRD_DIR = Path(__file__).parent / "crd"
CRD_NAME = f"{PLURAL}.{GROUP}"
# Bounds on lists and names that CEL rules loop over: the API server refuses a rule whose
# worst-case cost it cannot bound.
MAX_METRICS = 32
MAX_NAME = 63

Schema = dict[str, Any]


def _str(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _int(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def _num(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def _obj(
    description: str,
    properties: dict[str, Schema],
    required: list[str] | None = None,
    rules: list[tuple[str, str]] | None = None,
) -> Schema:
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = required
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in rules]
    return schema


def _free(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _list(description: str, items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "description": description, "items": items, **extra}


def _variant(role: str) -> dict[str, Schema]:
    return {
        "name": _str(
            f"{role} variant: Serve deployment name and served model id.",
            pattern=VARIANT_NAME_PATTERN,
            maxLength=63,
        ),
        "modelPath": _str(
            f"Checkpoint directory of the {role} variant (local path or PVC mount).", minLength=1
        ),
    }


def _metric() -> Schema:
    builtins = ", ".join(f"'{name}'" for name in sorted(BUILTIN_QUERIES))
    shadow = ", ".join(sorted(SHADOW_BUILTINS))
    return _obj(
        "One analysis metric: a PromQL query whose single value must stay within min..max.",
        {
            "name": _str(
                f"Metric name; the built-ins {builtins} need no query.",
                minLength=1,
                maxLength=MAX_NAME,
            ),
            "query": _str(
                "PromQL instant query returning one series; `$variant` and `$window` are "
                "replaced by the canary's name and analysis.window.",
                minLength=1,
            ),
            "min": _num("Fail when the value is below this."),
            "max": _num("Fail when the value is above this."),
            "source": _str(
                "What a custom query measures: `live` requests (the default; gated on the "
                "canary's request count) or `shadow` traffic (gated on the shadowed requests it "
                f"answered). The built-ins know theirs: {shadow} are shadow metrics.",
                enum=["live", "shadow"],
            ),
        },
        required=["name"],
        rules=[
            (
                f"has(self.query) || self.name in [{builtins}]",
                f"a custom metric needs a query; only {builtins} have built-in queries",
            ),
            (
                "!has(self.source) || has(self.query)",
                "metric source is for custom queries; built-in metrics know theirs",
            ),
            ("has(self.min) || has(self.max)", "a metric needs a min or a max threshold"),
            (
                "!has(self.min) || !has(self.max) || self.min <= self.max",
                "metric min must not exceed max",
            ),
        ],
    )


def _step() -> Schema:
    kinds = ", ".join(STEP_KINDS)
    one_of = " + ".join(f"(has(self.{kind}) ? 1 : 0)" for kind in STEP_KINDS)
    return _obj(
        f"One rollout step: exactly one of {kinds}.",
        {
            "setWeight": _int(
                "Percentage of the stable variant's share of the traffic given to the canary; "
                "every other variant keeps its weight.",
                minimum=0,
                maximum=100,
            ),
            "pause": _obj(
                "Wait: for `duration`, or until a person promotes when it is absent.",
                {
                    "duration": _str(
                        "How long to wait, e.g. 30s, 5m, 1h30m.", pattern=DURATION_PATTERN
                    ),
                },
            ),
            "analysis": _obj(
                "Query Prometheus (spec.analysis) until the step passes or fails.",
                {
                    "successCount": _int(
                        "Successful measurements needed; overrides spec.analysis.successCount.",
                        minimum=1,
                    ),
                    "metrics": _list(
                        "Names of spec.analysis.metrics judged at this step (default: all), "
                        "e.g. only shadow metrics while the canary has no live traffic.",
                        _str("A metric name.", minLength=1, maxLength=MAX_NAME),
                        minItems=1,
                        maxItems=MAX_METRICS,
                    ),
                },
            ),
            "evaluation": _evaluation(),
            "shadow": _obj(
                "Copy a share of the alias's live requests to the canary after the stable has "
                "answered them; the copies' answers are never returned to anyone and are "
                "judged by shadow metrics. Stays on until another shadow step changes it; "
                "promotion, abort and rollback turn it off.",
                {
                    "percent": _num(
                        "Share of the alias's requests copied, 0..100 (0 turns shadow off).",
                        minimum=0,
                        maximum=100,
                    ),
                    "maxInFlight": _int(
                        "Shadow requests in flight at once per ingress replica; more are dropped "
                        f"(default {ShadowStep.model_fields['max_in_flight'].default}).",
                        minimum=1,
                        maximum=1024,
                    ),
                },
                required=["percent"],
            ),
        },
        rules=[(f"{one_of} == 1", f"a step must set exactly one of {kinds}")],
    )


def _evaluation() -> Schema:
    defaults = EvaluationStep.model_fields

    def default(name: str) -> Any:
        return defaults[name].default

    url = f"http://<rayServiceName>{SERVE_SERVICE_SUFFIX}.<namespace>.svc:{SERVE_PORT}"
    return _obj(
        "Ask a golden set of the stable and the canary through the ingress, each pinned by "
        "model name, greedy and seeded; pass when the canary scores at least the stable's score "
        "minus tolerance, and at least minScore (docs/evaluation.md).",
        {
            "goldenSet": _obj(
                f"The golden set (default name {DEFAULT_GOLDEN_SET}): exactly one of name and "
                "configMapRef.",
                {
                    "name": _str(
                        "A set the operator finds by name: shipped with it, or mounted into its "
                        "pod (chart value operator.goldenSetConfigMaps).",
                        pattern=SLUG_PATTERN,
                        maxLength=63,
                    ),
                    "configMapRef": _obj(
                        "A key of a ConfigMap in the rollout's namespace holding one set in the "
                        "same YAML format; read when each run starts.",
                        {
                            "name": _str(
                                "ConfigMap name.", pattern=CONFIG_MAP_NAME_PATTERN, maxLength=253
                            ),
                            "key": _str(
                                "Key holding the set, e.g. finance-team-v1.yaml.",
                                pattern=CONFIG_MAP_KEY_PATTERN,
                                maxLength=253,
                            ),
                        },
                        required=["name", "key"],
                    ),
                },
                rules=[
                    (
                        "has(self.name) != has(self.configMapRef)",
                        "a golden set is given by exactly one of name and configMapRef",
                    )
                ],
            ),
            "tolerance": _num(
                "How far below the stable's score the canary may land, 0..1 "
                f"(default {DEFAULT_TOLERANCE}; one item of N is 1/N).",
                minimum=0,
                maximum=1,
            ),
            "minScore": _num(
                f"The score the canary must reach regardless, 0..1 (default {DEFAULT_MIN_SCORE}).",
                minimum=0,
                maximum=1,
            ),
            "timeout": _str(
                f"Time bound of one run, all requests included (default {default('timeout')}); "
                "a run cut short is inconclusive.",
                pattern=DURATION_PATTERN,
            ),
            "maxRequests": _int(
                "Request bound of one run: a golden set needing more (2 per item) is refused "
                f"and the run is inconclusive (default {default('max_requests')}).",
                minimum=2,
            ),
            "requestTimeout": _str(
                "Time one request may take; a canary that does not answer in time fails "
                f"that item (default {default('request_timeout')}).",
                pattern=DURATION_PATTERN,
            ),
            "maxConcurrency": _int(
                "Requests in flight at once, both variants together "
                f"(default {default('max_concurrency')}).",
                minimum=1,
                maximum=64,
            ),
            "ingressURL": _str(
                f"The OpenAI ingress (default {url}, KubeRay's Serve Service).",
                pattern=URL_PATTERN,
                maxLength=2048,
            ),
            "inconclusiveLimit": _int(
                "Inconclusive runs (evaluator errors, a run cut short, an operator restart) "
                "tried again; one more pauses the rollout until a person promotes or aborts "
                f"(default {default('inconclusive_limit')}).",
                minimum=0,
            ),
        },
    )


def _spec() -> Schema:
    return _obj(
        "Desired rollout: move the model alias's traffic from stable to canary step by step.",
        {
            "rayServiceName": _str(
                "RayService (same namespace) whose serveConfigV2 is edited.", minLength=1
            ),
            "application": _str(
                "Front Serve application of the RayService, the one holding the AmaliaIngress "
                "deployment whose weights are edited (default `amalia`). Each variant is its own "
                "application, named after it.",
                minLength=1,
            ),
            "stable": _obj(
                "The variant serving now; its application (amalia_serve.app:build_variant_app) "
                "must be in serveConfigV2.",
                _variant("stable"),
                required=["name", "modelPath"],
            ),
            "canary": _obj(
                "The new variant; added as its own application with weight 0, from the stable "
                "application's args.",
                {
                    **_variant("canary"),
                    "engine": _free(
                        "Engine settings merged over the stable application's `args.engine`."
                    ),
                    "deployment": _free(
                        "Serve deployment options merged over the stable application's "
                        "`args.deployment`."
                    ),
                },
                required=["name", "modelPath"],
            ),
            "steps": _list(
                "Steps run in order; passing the last one promotes the canary.",
                _step(),
                minItems=1,
                maxItems=100,
            ),
            "analysis": _obj(
                "How analysis steps query and judge metrics.",
                {
                    "prometheusURL": _str(
                        "Prometheus base URL (default http://prometheus.monitoring:9090).",
                        minLength=1,
                    ),
                    "interval": _str(
                        "Time between measurements (default 1m).", pattern=DURATION_PATTERN
                    ),
                    "window": _str(
                        "Range selector for rate() in queries (default 1m).", pattern=WINDOW_PATTERN
                    ),
                    "initialDelay": _str(
                        "Wait after each change of the canary's weight before measuring, so "
                        "the window holds traffic at the new weight (default 1m).",
                        pattern=DURATION_PATTERN,
                    ),
                    "minRequests": _int(
                        "Canary requests in the window a measurement needs to count; fewer "
                        "(or none) make it inconclusive (default 20).",
                        minimum=0,
                    ),
                    "failureLimit": _int(
                        "Failed measurements tolerated per analysis step before rolling back "
                        "(default 0).",
                        minimum=0,
                    ),
                    "inconclusiveLimit": _int(
                        "Inconclusive measurements tolerated per analysis step; one more "
                        "pauses the rollout until a person promotes or aborts (default 3).",
                        minimum=0,
                    ),
                    "outageLimit": _str(
                        "How long Prometheus may fail to answer before the rollout rolls back; "
                        "until then the analysis pauses and counts nothing (default 10m).",
                        pattern=DURATION_PATTERN,
                    ),
                    "successCount": _int(
                        "Successful measurements that pass an analysis step (default 1).", minimum=1
                    ),
                    "metrics": _list(
                        "Metrics judged at each measurement (default: error-rate <= 0.01 "
                        "and ttft-p95-seconds <= 2.0).",
                        _metric(),
                        minItems=1,
                        maxItems=MAX_METRICS,
                        **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
                    ),
                },
            ),
            "scaleDownDelaySeconds": _int(
                "Seconds between moving traffic off a variant and removing "
                "its weight and then its application (default 30).",
                minimum=0,
            ),
            "progressDeadlineSeconds": _int(
                "Seconds the canary may take to become HEALTHY before "
                "the rollout rolls back (default 600).",
                minimum=1,
            ),
        },
        required=["rayServiceName", "stable", "canary", "steps"],
        rules=[
            ("self.stable.name != self.canary.name", "stable.name and canary.name must differ"),
            (_STEP_METRICS_KNOWN, "an analysis step names a metric spec.analysis.metrics lacks"),
        ],
    )


_DEFAULT_METRIC_NAMES = ", ".join(f"'{m['name']}'" for m in DEFAULT_METRICS)
# Each name an analysis step picks is one of spec.analysis.metrics, or of the defaults without it.
_STEP_METRICS_KNOWN = (
    "self.steps.all(s, !has(s.analysis) || !has(s.analysis.metrics) || "
    "s.analysis.metrics.all(n, has(self.analysis) && has(self.analysis.metrics) ? "
    f"self.analysis.metrics.exists(m, m.name == n) : n in [{_DEFAULT_METRIC_NAMES}]))"
)


def _measurement(description: str) -> Schema:
    result = _obj(
        "One metric's verdict.",
        {
            "metric": _str("Metric name."),
            "outcome": _str("Successful, Failed, Inconclusive or Error."),
            "value": _num("Measured value; absent when there was none."),
            "min": _num("Lower threshold."),
            "max": _num("Upper threshold."),
            "message": _str("Why there is no verdict, when there is none."),
        },
    )
    return _obj(
        description,
        {
            "outcome": _str(
                "Successful (every metric passed), Failed (one failed), Error (Prometheus did "
                "not answer) or Inconclusive (too few canary requests, or no data)."
            ),
            "time": _str("When it was measured (RFC 3339).", format="date-time"),
            "results": _list("Per-metric verdicts.", result),
        },
    )


def _evaluation_summary() -> Schema:
    score = _obj(
        "One variant's score.",
        {
            "variant": _str("Variant name."),
            "score": _num("Fraction of items passed, 0..1."),
            "passed": _int("Items passed."),
            "total": _int("Items asked."),
            "unanswered": _int("Items without an answer (counted as failed)."),
        },
    )
    return _obj(
        "The latest finished evaluation run of any step.",
        {
            "stepIndex": _int("Step it belongs to."),
            "attempt": _int("Attempt of that step."),
            "verdict": _str("Passed, Failed or Inconclusive."),
            "reason": _str("The verdict in words: both scores, the threshold, failing items."),
            "time": _str("When it finished (RFC 3339).", format="date-time"),
            "durationSeconds": _num("How long the run took."),
            "goldenSet": _obj(
                "The golden set asked.",
                {
                    "name": _str("Set name (its revision is part of it, e.g. -v1)."),
                    "source": _str("Where it came from: shipped, a file, or a ConfigMap key."),
                    "items": _int("Items in the set."),
                    "digest": _str("SHA-256 prefix of the parsed set: its exact version."),
                },
            ),
            "stable": score,
            "canary": score,
            "threshold": _num("max(stable score - tolerance, minScore)."),
            "regressions": _list(
                "Items the stable passed and the canary failed (the first 20).", _str("Item key.")
            ),
            "regressionCount": _int("How many items went from pass to fail."),
        },
    )


def _status() -> Schema:
    condition = _obj(
        "Kubernetes-style condition.",
        {
            "type": _str("Ready, Progressing, Analysing or Evaluating."),
            "status": _str("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _str("CamelCase reason."),
            "message": _str("Human-readable detail."),
            "lastTransitionTime": _str("When status last changed.", format="date-time"),
        },
        required=["type", "status"],
    )
    return _obj(
        "Observed progress; everything needed to resume after a restart.",
        {
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "description": "metadata.generation this status describes.",
            },
            "phase": _str(
                "Pending, Progressing, Paused, Promoted, RolledBack or Failed (from conditions)."
            ),
            "message": _str("What the rollout is doing or waiting for."),
            "stage": _str(
                "Internal stage: Deploying, Stepping, Promoting, Promoted, RollingBack, "
                "RolledBack, Failed."
            ),
            "rolloutHash": _str("Hash of stable, canary and steps; a change restarts the rollout."),
            "canaryName": _str(
                "Canary variant this rollout added (a renamed spec's old canary until removed)."
            ),
            "stepIndex": _int("Index of the current step; len(steps) when all passed."),
            "canaryWeight": _int(
                "Percentage of the stable's share of the traffic the canary has now."
            ),
            "weights": {
                "type": "object",
                "description": "The whole traffic split (variant -> weight) after the last tick.",
                "additionalProperties": {"type": "integer"},
            },
            "stepStartedAt": _str("When the current step started.", format="date-time"),
            "weightChangedAt": _str(
                "When the canary's weight last changed (analysis waits initialDelay after it).",
                format="date-time",
            ),
            "stageEnteredAt": _str("When the current stage started.", format="date-time"),
            "abortedAt": _str("When a person aborted.", format="date-time"),
            "analysis": _obj(
                "Progress of the running analysis step.",
                {
                    "stepIndex": _int("Step this progress belongs to."),
                    "successes": _int("Successful measurements so far."),
                    "failures": _int("Failed measurements so far."),
                    "inconclusive": _int("Inconclusive measurements so far."),
                    "outageSince": _str(
                        "Since when Prometheus has failed to answer, while it does.",
                        format="date-time",
                    ),
                    "halted": {
                        "type": "boolean",
                        "description": "Too many inconclusive measurements: waiting for a person.",
                    },
                    "last": _measurement("Latest measurement of this step."),
                },
            ),
            "lastAnalysis": _measurement("Latest measurement of any step."),
            "evaluation": _obj(
                "Progress of the running evaluation step.",
                {
                    "stepIndex": _int("Step this progress belongs to."),
                    "attempt": _int("Attempt now running or next to run, from 1."),
                    "startedAt": _str(
                        "When the attempt in flight started; absent between attempts.",
                        format="date-time",
                    ),
                    "nextAttemptAt": _str(
                        "After an inconclusive attempt, when the next one starts.",
                        format="date-time",
                    ),
                    "answered": _int("Requests of the run in flight answered so far."),
                    "planned": _int("Requests the run in flight sends (2 per item)."),
                    "inconclusive": _int("Inconclusive attempts so far."),
                    "halted": {
                        "type": "boolean",
                        "description": "Too many inconclusive attempts: waiting for a person.",
                    },
                },
            ),
            "lastEvaluation": _evaluation_summary(),
            "shadow": _obj(
                "Shadow traffic this rollout has set on the ingress; absent when off.",
                {
                    "percent": _num("Share of the alias's requests copied to the canary."),
                    "maxInFlight": _int("Shadow requests in flight at once per ingress replica."),
                },
            ),
            "conditions": _list(
                "Ready, Progressing, Analysing and Evaluating.",
                condition,
                **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
            ),
        },
    )


def open_api_schema() -> Schema:
    return _obj(
        f"{KIND}: a step-by-step traffic shift between two model variants of a RayService.",
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _spec(),
            "status": _status(),
        },
        required=["spec"],
    )


def modelrollout_crd() -> dict[str, Any]:
    column = [
        ("Phase", "string", ".status.phase"),
        ("Canary weight", "integer", ".status.canaryWeight"),
        ("Step", "integer", ".status.stepIndex"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p} for n, t, p in column
                    ]
                    + [
                        {
                            "name": "Message",
                            "type": "string",
                            "jsonPath": ".status.message",
                            "priority": 1,
                        }
                    ],
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def peering_crd(scope: str) -> dict[str, Any]:
    """kopf's peering CRDs (kopf.dev/v1): replicas announce themselves in the object's status."""
    kind = "ClusterKopfPeering" if scope == "Cluster" else "KopfPeering"
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
        "spec": {
            "group": PEERING_GROUP,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": PEERING_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def rendered() -> dict[str, str]:
    """File name -> YAML text of every CRD the operator needs."""
    docs = {
        f"{CRD_NAME}.yaml": modelrollout_crd(),
        f"clusterkopfpeerings.{PEERING_GROUP}.yaml": peering_crd("Cluster"),
        f"kopfpeerings.{PEERING_GROUP}.yaml": peering_crd("Namespaced"),
    }
    header = "# Generated by `python -m amalia_operator.crd` from operators/crd.py; do not edit.\n"
    return {
        name: header + yaml.safe_dump(doc, sort_keys=False, width=100) for name, doc in docs.items()
    }


def write_generated(files: dict[str, str], out: Path) -> None:
    """Write generated YAML files into `out` (shared by the CRD and RBAC generators)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")


def main(argv: list[str] | None = None) -> int:
    write_generated(rendered(), Path(argv[0]) if argv else CRD_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

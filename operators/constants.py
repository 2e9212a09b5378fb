"""Names shared by the operator's modules. The operator never imports amalia_serve (it ships as its
own slim image), so the two serve names it needs are duplicated here on purpose.
"""

from __future__ import annotations

import os

# Must equal amalia_serve.constants.INGRESS_DEPLOYMENT_NAME; tests/unit/operator checks they agree.
INGRESS_DEPLOYMENT_NAME = "AmaliaIngress"
# The builder of one variant's own Serve application (named after the variant); a unit test checks
# that amalia_serve.app provides it.
VARIANT_IMPORT_PATH = "amalia_serve.app:build_variant_app"

GROUP = "serving.amalia.pt"
VERSION = "v1alpha1"
PLURAL = "modelrollouts"
KIND = "ModelRollout"
SHORT_NAMES = ["mro"]

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayservices"

# `kubectl annotate modelrollout NAME serving.amalia.pt/action=promote`: promote|abort|retry.
ACTION_ANNOTATION = f"{GROUP}/action"
# kopf keeps its own handler progress in annotations under this prefix, never in status.
PROGRESS_ANNOTATION_PREFIX = GROUP

# One timer tick per ModelRollout: how often the state machine is re-evaluated.
TICK_INTERVAL_S = float(os.getenv("AMALIA_OPERATOR_TICK_S", "5"))
# Conflicting writers (KubeRay, a person, another rollout): re-read and recompute this many times.
CONFLICT_RETRIES = int(os.getenv("AMALIA_OPERATOR_CONFLICT_RETRIES", "5"))
PROMETHEUS_TIMEOUT_S = float(os.getenv("AMALIA_OPERATOR_PROMETHEUS_TIMEOUT_S", "10"))

# Names Ray exports for the per-variant series (provisional until serve/metrics.py pins them).
REQUESTS_TOTAL_METRIC = "ray_amalia_requests_total"
TTFT_BUCKET_METRIC = "ray_amalia_time_to_first_token_seconds_bucket"
# `$variant` and `$window` are substituted per query (string.Template: PromQL is full of braces);
# one edit here fixes every default query.
BUILTIN_QUERIES: dict[str, str] = {
    "error-rate": (
        f'sum(rate({REQUESTS_TOTAL_METRIC}{{variant="$variant",status_class="5xx"}}[$window]))'
        f' / sum(rate({REQUESTS_TOTAL_METRIC}{{variant="$variant"}}[$window]))'
    ),
    "ttft-p95-seconds": (
        "histogram_quantile(0.95, sum by (le) "
        f'(rate({TTFT_BUCKET_METRIC}{{variant="$variant"}}[$window])))'
    ),
}
DEFAULT_METRICS: list[dict[str, object]] = [
    {"name": "error-rate", "max": 0.01},
    {"name": "ttft-p95-seconds", "max": 2.0},
]

"""Builds charts/amalia/values.schema.json.

Written as code rather than by hand so the parts that mirror Python models stay equal to them:
a variant's `engine` block is amalia_serve's EngineConfig schema and `autoscaling` its
AutoscalingOptions schema. Every object the chart defines refuses unknown keys.
`scripts/render_manifests.py` writes the file; a test fails when it is stale.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from amalia_serve.capacity import GPUS, PRESETS
from amalia_serve.config import (
    K8S_SUBDOMAIN_PATTERN,
    VARIANT_NAME_PATTERN,
    AutoscalingOptions,
    EngineConfig,
    MeshProvider,
)

Schema = dict[str, Any]

K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mkMGTPE]|)$"


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), desc: str = "") -> Schema:
    """A closed object: unknown keys are refused, which is how typos get caught."""
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    if desc:
        schema["description"] = desc
    return schema


def string(desc: str = "", **extra: Any) -> Schema:
    return {"type": "string", **({"description": desc} if desc else {}), **extra}


def integer(minimum: int | None = None, desc: str = "") -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if desc:
        schema["description"] = desc
    return schema


def number(minimum: float | None = None, exclusive: bool = False) -> Schema:
    schema: Schema = {"type": "number"}
    if minimum is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = minimum
    return schema


# Kubernetes objects the chart passes through untouched; the API server validates them.
K8S_MAP: Schema = {"type": "object"}
K8S_LIST: Schema = {"type": "array"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
RESOURCES: Schema = obj({"requests": K8S_MAP, "limits": K8S_MAP, "claims": K8S_LIST})
# NetworkPolicy peers (namespaceSelector, podSelector, ipBlock), passed through as written.
PEERS: Schema = {"type": "array", "items": {"type": "object", "minProperties": 1}}
RENAMED = (
    ("apiNamespaceLabels", "apiCallers"),
    ("apiExtraFrom", "apiCallers"),
    ("monitoringNamespace", "metricsScrapers"),
    ("kuberayNamespace", "kuberayOperator"),
)
START_PARAMS: Schema = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def model_schema(model: type[BaseModel]) -> Schema:
    schema: Schema = _strip_titles(model.model_json_schema())
    schema.pop("$defs", None)
    return schema


def engine_schema() -> Schema:
    return model_schema(EngineConfig)


def autoscaling_schema() -> Schema:
    return model_schema(AutoscalingOptions)


def checkpoint_schema(desc: str) -> Schema:
    """A built-in checkpoint of charts/amalia/files/capacity.yaml, or `custom` (not checked)."""
    return {"enum": [*PRESETS, "custom"], "description": desc}


def variant_schema() -> Schema:
    return {
        **obj(
            {
                "name": string(
                    "Served model id; also the name of the variant's own Serve application and "
                    "deployment.",
                    pattern=VARIANT_NAME_PATTERN,
                ),
                "modelPath": string("Checkpoint directory inside the worker pods.", minLength=1),
                "gpus": integer(1, "GPUs per replica (a positive integer)."),
                "cpus": number(0, exclusive=True),
                "replicas": integer(1),
                "autoscaling": autoscaling_schema(),
                "maxOngoingRequests": integer(1),
                "maxQueuedRequests": integer(-1),
                "engine": engine_schema(),
                "checkpoint": checkpoint_schema(
                    "What modelPath holds, for the install-time capacity check."
                ),
            },
            required=("name", "modelPath", "gpus"),
        ),
        # A fixed count and an autoscaling block contradict each other.
        "not": {"required": ["replicas", "autoscaling"]},
    }


def worker_group_schema() -> Schema:
    return obj(
        {
            "name": string(pattern=K8S_NAME),
            "replicas": integer(0),
            "minReplicas": integer(0),
            "maxReplicas": integer(1),
            "idleTimeoutSeconds": integer(0),
            "gpusPerWorker": integer(1, "GPUs of each worker pod (a positive integer)."),
            "gpuResourceName": string("e.g. nvidia.com/gpu or nvidia.com/mig-3g.40gb", minLength=1),
            "gpu": {
                # Whole cards: a MIG slice is this card plus the profile in gpuResourceName.
                "enum": sorted({name.partition(":")[0] for name in GPUS}),
                "description": "The card, for the install-time capacity check.",
            },
            "resources": RESOURCES,
            "nodeSelector": STRING_MAP,
            "tolerations": K8S_LIST,
            "affinity": K8S_MAP,
            "rayStartParams": START_PARAMS,
        },
        required=("name", "gpusPerWorker", "gpuResourceName"),
    )


# Seconds, as both Istio (a protobuf Duration) and Gateway API (at most 5 digits) read them.
SECONDS = r"^[0-9]{1,5}s$"


def mesh_schema() -> Schema:
    callers: Schema = {
        "type": "array",
        "items": obj(
            {
                "namespace": string(pattern=K8S_NAME),
                "serviceAccount": string(pattern=K8S_SUBDOMAIN_PATTERN),
            },
            required=("namespace",),
        ),
    }
    providers = list(get_args(MeshProvider))
    return obj(
        {
            "provider": {"enum": providers},
            "trustDomain": string(minLength=1),
            "allowedCallers": callers,
            "stickyByCaller": {"type": "boolean"},
            "metrics": obj({"scrapers": callers, "plaintext": {"type": "boolean"}}),
            "outboundPorts": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 65535},
            },
            "traffic": obj(
                {
                    "requestTimeout": string(pattern=SECONDS),
                    "consecutiveConnectFailures": integer(1),
                    "baseEjectionTime": string(pattern=SECONDS),
                }
            ),
            "waypoint": obj({"enabled": {"type": "boolean"}}),
        }
    )


def enabled_or_auto() -> Schema:
    return {"enum": [True, False, "auto"]}


def values_schema() -> Schema:
    image = obj(
        {
            "repository": string(minLength=1),
            "tag": string(),
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        },
        required=("repository",),
    )
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "amalia chart values",
        **obj(
            {
                "global": K8S_MAP,  # helm injects it when the chart is a subchart
                "nameOverride": string(),
                "fullnameOverride": string(),
                "kuberay": obj({"capabilityCheck": {"enum": ["auto", "always", "never"]}}),
                "image": image,
                "imagePullSecrets": K8S_LIST,
                "serve": obj(
                    {
                        "modelAlias": string(pattern=VARIANT_NAME_PATTERN),
                        "weights": {
                            "type": "object",
                            "description": "Variant name -> traffic weight (an integer >= 0); variants "
                            "left out get 0.",
                            "propertyNames": {"pattern": VARIANT_NAME_PATTERN},
                            "additionalProperties": integer(0),
                        },
                        "ingress": obj(
                            {
                                "replicas": integer(1),
                                "cpus": number(0),
                                "maxOngoingRequests": integer(1),
                                "maxRequestBytes": integer(1024),
                                "readyTimeoutS": number(0, exclusive=True),
                            }
                        ),
                        "apiKeys": obj(
                            {
                                "existingSecret": {
                                    "type": "string",
                                    "description": "Secret with the API key file; empty: keys off.",
                                    "pattern": "^$|" + K8S_NAME,
                                },
                                "secretKey": string(pattern=r"^[-._a-zA-Z0-9]+$"),
                                "required": {"type": "boolean"},
                                "reloadIntervalS": number(0, exclusive=True),
                            }
                        ),
                    },
                    required=("modelAlias",),
                ),
                "variants": {"type": "array", "minItems": 1, "items": variant_schema()},
                "capacity": obj(
                    {
                        "enforce": {"type": "boolean"},
                        "checkpoint": checkpoint_schema(
                            "Checkpoint of variants that name none."
                        ),
                    }
                ),
                "rayCluster": obj(
                    {
                        "rayVersion": string(minLength=1),
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": integer(0),
                        "autoscalerVersion": {"enum": ["v1", "v2"]},
                        "auth": obj({"mode": {"enum": ["token", "disabled"]}}),
                        "sharedMemorySize": string(pattern=QUANTITY),
                        "tmpSizeLimit": string(pattern=QUANTITY),
                    }
                ),
                "upgradeStrategy": obj(
                    {
                        "type": {
                            "enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]
                        },
                        "clusterUpgradeOptions": K8S_MAP,
                    }
                ),
                "head": obj(
                    {
                        "resources": RESOURCES,
                        "rayStartParams": START_PARAMS,
                        "nodeSelector": STRING_MAP,
                        "tolerations": K8S_LIST,
                        "affinity": K8S_MAP,
                    }
                ),
                "workerGroups": {"type": "array", "minItems": 1, "items": worker_group_schema()},
                "models": obj(
                    {
                        "mountPath": string(pattern=r"^/"),
                        "source": {"enum": ["pvc", "hostPath", "emptyDir"]},
                        "pvc": obj({"claimName": string(pattern=K8S_NAME)}),
                        "hostPath": obj({"path": string(pattern=r"^/")}),
                        "emptyDir": obj({"sizeLimit": string(pattern=QUANTITY)}),
                        "fill": obj(
                            {
                                "image": string(),
                                "command": {"type": "array", "items": {"type": "string"}},
                                "env": K8S_LIST,
                                "resources": RESOURCES,
                            }
                        ),
                    }
                ),
                "tracing": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "endpoint": string(),
                        "protocol": {"enum": ["grpc", "http/protobuf"]},
                        "sampler": string(),
                        "samplerArg": string(),
                        "serviceName": string(minLength=1),
                        "resourceAttributes": STRING_MAP,
                    }
                ),
                "extraEnv": K8S_LIST,
                "service": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "port": integer(1),
                        "annotations": STRING_MAP,
                    }
                ),
                "httpRoute": obj(
                    {"enabled": {"type": "boolean"}, "parentRefs": K8S_LIST, "hostnames": K8S_LIST}
                ),
                "podDisruptionBudget": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "maxUnavailable": {"type": ["integer", "string"]},
                    }
                ),
                "networkPolicy": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "apiCallers": PEERS,
                        "metricsScrapers": PEERS,
                        "kuberayOperator": PEERS,
                        "extraIngress": K8S_LIST,
                        # Renamed: accepted here so the template can fail naming the new key.
                        **{old: {"description": f"Removed: use {new}."} for old, new in RENAMED},
                    }
                ),
                "monitoring": obj(
                    {
                        "podMonitor": obj(
                            {
                                "enabled": enabled_or_auto(),
                                "interval": string(pattern=r"^[0-9]+(ms|s|m|h)$"),
                                "labels": STRING_MAP,
                            }
                        ),
                        "grafanaDashboard": obj(
                            {"enabled": {"type": "boolean"}, "labels": STRING_MAP}
                        ),
                    }
                ),
                "podSecurityContext": K8S_MAP,
                "securityContext": K8S_MAP,
                "operator": obj(
                    {
                        "enabled": {"type": "boolean"},
                        "image": image,
                        "replicas": integer(1),
                        "namespaced": {"type": "boolean"},
                        "verbose": {"type": "boolean"},
                        "resources": RESOURCES,
                        "nodeSelector": STRING_MAP,
                        "tolerations": K8S_LIST,
                        "goldenSetConfigMaps": {
                            "type": "array",
                            "uniqueItems": True,
                            "items": string(pattern=K8S_SUBDOMAIN_PATTERN, maxLength=253),
                        },
                    }
                ),
                "tests": obj({"image": string(), "maxTokens": integer(1)}),
                "mesh": mesh_schema(),
                "modelRollouts": {
                    "type": "array",
                    "items": obj(
                        {"name": string(pattern=K8S_NAME), "spec": K8S_MAP}, ("name", "spec")
                    ),
                },
            },
            required=("serve", "variants", "workerGroups", "models"),
        ),
    }

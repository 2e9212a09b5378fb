"""RayService access: read it, and change spec.serveConfigV2 without losing anyone else's write.

Every write is a JSON merge patch that carries the `metadata.resourceVersion` we read. The API
server applies the merge and then runs its optimistic-concurrency check, so a stale version is
refused with 409 Conflict, the standard signal for "re-read and recompute". We chose this over a
JSON patch with a `test` op on /metadata/resourceVersion because a failed `test` comes back as 422
Unprocessable Entity, which cannot be told apart from a genuinely invalid patch (kopf's own client
treats it that way). On 409 we re-read the object and re-run the edit function on the fresh
serveConfigV2, so a concurrent change by KubeRay, Helm or a person is kept, never overwritten.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from amalia_operator import serveconfig
from amalia_operator.constants import (
    CONFLICT_RETRIES,
    PEERING_GROUP,
    PEERING_VERSION,
    RAY_GROUP,
    RAY_PLURAL,
    RAY_VERSION,
)
from amalia_operator.rollout import DEPLOY_FAILED, HEALTHY, ServeObservation

logger = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
APP_RUNNING = "RUNNING"  # Serve's ApplicationStatus once every deployment of it is healthy


class ConflictRetriesExhausted(RuntimeError):
    """Every attempt met a newer resourceVersion; the next tick tries again."""


def observe(rayservice: dict[str, Any] | None, app: str) -> ServeObservation | None:
    """The state machine's view of front application `app` and the variant applications; None
    when it cannot be found.
    """
    if rayservice is None:
        return None
    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        return None
    try:
        view = serveconfig.observe(text, app)
    except serveconfig.ServeConfigError as exc:
        logger.warning("RayService %s: %s", (rayservice.get("metadata") or {}).get("name"), exc)
        return None
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    statuses = active.get("applicationStatuses") or {}
    health = {
        name: variant_health(statuses[name], name) for name in view.variants if name in statuses
    }
    return ServeObservation(variants=view.variants, weights=view.weights, deployment_status=health)


def variant_health(app_status: dict[str, Any], name: str) -> str:
    """One word for a variant application's KubeRay status (`applicationStatuses[name]`).

    HEALTHY needs both the application RUNNING and its deployment HEALTHY: a new application's
    deployment can look healthy while Serve still deploys the application. DEPLOY_FAILED from
    either level means Serve gave up.
    """
    app_state = str((app_status or {}).get("status", ""))
    deployments = (app_status or {}).get("serveDeploymentStatuses") or {}
    dep_state = str((deployments.get(name) or {}).get("status", ""))
    if DEPLOY_FAILED in (app_state, dep_state):
        return DEPLOY_FAILED
    if dep_state == HEALTHY:
        return HEALTHY if app_state == APP_RUNNING else app_state or "missing"
    return dep_state or app_state or "missing"


class RayServices:
    def __init__(self, api: client.CustomObjectsApi, retry_delay_s: float = 0.2):
        self.api = api
        self.retry_delay_s = retry_delay_s

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = cast(
                dict[str, Any],
                self.api.get_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def edit_serve_config(
        self, namespace: str, name: str, edit: Callable[[str], str]
    ) -> tuple[bool, str]:
        """Applies `edit` to the live serveConfigV2; returns whether it changed anything and the
        serveConfigV2 the RayService holds afterwards."""
        for attempt in range(1, CONFLICT_RETRIES + 1):
            obj = self.read(namespace, name)
            if obj is None:
                raise LookupError(f"RayService {namespace}/{name} not found")
            text = obj["spec"]["serveConfigV2"]
            new_text = edit(text)
            if new_text == text:
                return False, text
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "spec": {"serveConfigV2": new_text},
            }
            try:
                self.api.patch_namespaced_custom_object(
                    RAY_GROUP,
                    RAY_VERSION,
                    namespace,
                    RAY_PLURAL,
                    name,
                    body,
                    _content_type=MERGE_PATCH,
                )
                return True, new_text
            except ApiException as exc:
                if exc.status != 409:
                    raise
                logger.info(
                    "RayService %s/%s changed under us (409, attempt %d/%d); re-reading",
                    namespace,
                    name,
                    attempt,
                    CONFLICT_RETRIES,
                )
                time.sleep(self.retry_delay_s * attempt)
        raise ConflictRetriesExhausted(
            f"RayService {namespace}/{name}: {CONFLICT_RETRIES} conflicting writes in a row"
        )


def ensure_peering(api: client.CustomObjectsApi, name: str, namespaces: list[str]) -> None:
    """Creates the kopf peering object(s) the replicas share, when missing.

    kopf neither creates them nor starts without them. Creating them here rather than in the chart
    keeps every object of the chart's own CRDs out of the chart, so `helm install --dry-run=server`
    works on a cluster that does not have those CRDs yet. Watching namespaces: one KopfPeering in
    each; all namespaces: one ClusterKopfPeering.
    """
    kind = "KopfPeering" if namespaces else "ClusterKopfPeering"
    body = {
        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
        "kind": kind,
        "metadata": {"name": name},
    }
    plural = kind.lower() + "s"
    targets: list[str | None] = list(namespaces) or [None]
    for namespace in targets:
        try:
            if namespace is None:
                api.create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, plural, body)
            else:
                api.create_namespaced_custom_object(
                    PEERING_GROUP, PEERING_VERSION, namespace, plural, body
                )
        except ApiException as exc:
            if exc.status != 409:  # AlreadyExists: another replica or an earlier start made it
                raise
            continue
        logger.info("created %s %s%s", kind, f"{namespace}/" if namespace else "", name)


def read_config_map_key(api: client.CoreV1Api, namespace: str, name: str, key: str) -> str:
    """One key of a ConfigMap (a golden set); LookupError says what is missing or refused."""
    try:
        config_map = api.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        raise LookupError(f"ConfigMap {namespace}/{name}: {exc.status} {exc.reason}") from None
    data = config_map.data or {}
    if key not in data:
        raise LookupError(f"ConfigMap {namespace}/{name} has no key {key!r} (keys: {sorted(data)})")
    return str(data[key])


def api_client() -> client.ApiClient:
    """In-cluster service account when running in a pod, else the current kubeconfig context."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # The client reads $KUBECONFIG once at import; read it now so a late-set value counts.
        return config.new_client_from_config(  # type: ignore[no-any-return,no-untyped-call]
            os.getenv("KUBECONFIG")
        )
    return client.ApiClient()


def custom_objects_api() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())

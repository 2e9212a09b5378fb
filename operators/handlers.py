"""kopf wiring: one timer per ModelRollout feeds the pure state machine and carries out its
decision.

Why one timer and no separate create/update/annotation handlers: kopf runs timers concurrently with
change handlers for the same object, so two writers would each compute a next status from the same
old one and overwrite each other. A single writer per object makes every tick a clean read -> decide
-> act -> record cycle. Spec changes are seen through `generation`/`rolloutHash` and actions through
the `serving.amalia.pt/action` annotation on the next tick (TICK_INTERVAL_S), and the timer also
covers resume after a restart: it starts for every existing ModelRollout.

Order matters for crash safety: the RayService is patched first, status is written after (by kopf,
from `patch`, to the status subresource). A crash in between repeats an idempotent edit.

An evaluation step runs for minutes, so the timer never waits for it: the run is a background
task (evaluation/tasks.py) that the timer starts, reads each tick and cancels when the rollout
moves on; the timer stays the only writer of status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client
from pydantic import ValidationError

from amalia_operator import analysis, kube, serveconfig
from amalia_operator.constants import (
    ACTION_ANNOTATION,
    FINALIZER,
    GROUP,
    PEERING_LIFETIME_S,
    PLURAL,
    PROGRESS_ANNOTATION_PREFIX,
    TICK_INTERVAL_S,
    VERSION,
)
from amalia_operator.evaluation.tasks import EvaluationTasks
from amalia_operator.models import RolloutSpec, RolloutStatus
from amalia_operator.patches import merge_patch
from amalia_operator.rollout import (
    ACTIONS,
    Action,
    Decision,
    Observations,
    advance,
    measurement_due,
)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=PROGRESS_ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PROGRESS_ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # Equal priorities make every replica pause (kopf's conflict rule), so each replica draws its
    # own; the highest one works and the others stand by until its heartbeat stops.
    settings.peering.priority = int(
        os.getenv("AMALIA_OPERATOR_PRIORITY", str(random.SystemRandom().randint(1, 2**30)))
    )
    # A replica killed without goodbye (SIGKILL, a lost node) keeps its peering record until
    # this runs out; a standby takes over only then. A restart in the same pod does not wait:
    # the chart sets POD_ID (kopf's peering identity) to the pod's name, and a replica ignores
    # its own record.
    settings.peering.lifetime = PEERING_LIFETIME_S
    # Our explicit events say what happened; kopf's per-log-line events would drown them.
    settings.posting.level = logging.WARNING
    if "rayservices" not in memo:
        api = kube.api_client()
        memo["rayservices"] = kube.RayServices(client.CustomObjectsApi(api))
        read = functools.partial(kube.read_config_map_key, client.CoreV1Api(api))
        memo["evaluations"] = EvaluationTasks(read)


@kopf.timer(GROUP, VERSION, PLURAL, id="rollout", interval=TICK_INTERVAL_S)
async def tick(
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    patch: kopf.Patch,
    namespace: str | None,
    memo: Any,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    assert namespace is not None  # ModelRollout is a namespaced resource
    current = RolloutStatus.model_validate(dict(status))
    try:
        rollout = RolloutSpec.model_validate(dict(spec))
    except ValidationError as exc:
        # The CRD refuses such objects; this guards against a CRD older than the operator.
        message = f"invalid spec: {exc.errors()[0]['msg']}"
        if current.message != message:
            patch.status["message"] = message
        return
    rayservices: kube.RayServices = memo["rayservices"]
    evaluations: EvaluationTasks = memo["evaluations"]
    uid = str(meta.get("uid"))
    obj = await asyncio.to_thread(rayservices.read, namespace, rollout.ray_service_name)
    now = datetime.now(UTC)
    measurement = None
    if measurement_due(rollout, current, now):
        variant = current.canary_name or rollout.canary.name
        metrics = rollout.metrics_for(rollout.steps[current.step_index])
        measurement = await analysis.measure(rollout.analysis, variant, now, metrics)
    raw_action = meta.annotations.get(ACTION_ANNOTATION)
    action: Action | None = raw_action if raw_action in ACTIONS else None
    observations = Observations(
        kube.observe(obj, rollout.application),
        measurement,
        action,
        evaluations.report(uid, rollout, current),
    )
    decision = advance(rollout, int(meta.get("generation") or 0), current, observations, now)

    weights = observations.serve.weights if observations.serve is not None else None
    if decision.edit is not None:
        edit = decision.edit

        def apply(text: str) -> str:
            return serveconfig.apply_edit(text, rollout.application, edit, rollout.canary)

        try:
            changed, text = await asyncio.to_thread(
                rayservices.edit_serve_config, namespace, rollout.ray_service_name, apply
            )
            weights = serveconfig.observe(text, rollout.application).weights
        except (
            kube.ConflictRetriesExhausted,
            LookupError,
            ValueError,  # ServeConfigError, or a split that cannot be made (rollout.split_weights)
        ) as exc:
            raise kopf.TemporaryError(f"serveConfigV2 not updated: {exc}", delay=TICK_INTERVAL_S)
        logger.info(
            "RayService %s: %s (weights %s)",
            rollout.ray_service_name,
            "patched" if changed else "already up to date",
            weights,
        )
    if weights is not None:
        decision.status.weights = weights
    evaluations.sync(uid, rollout, decision.status, namespace)

    _record(decision, current, patch, raw_action, body, logger)


def _record(
    decision: Decision,
    current: RolloutStatus,
    patch: kopf.Patch,
    raw_action: str | None,
    body: kopf.Body,
    logger: kopf.Logger,
) -> None:
    old, new = current.wire(), decision.status.wire()
    for key, value in merge_patch(old, new).items():
        patch.status[key] = value
    if raw_action is not None and (decision.action_consumed or raw_action not in ACTIONS):
        patch.metadata.annotations[ACTION_ANNOTATION] = None
        if raw_action not in ACTIONS:
            kopf.event(
                body,
                type="Warning",
                reason="UnknownAction",
                message=f"{raw_action!r} is not one of {', '.join(ACTIONS)}",
            )
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        log = logger.warning if event.type == "Warning" else logger.info
        log("%s: %s", event.reason, event.message)
    if old.get("phase") != new.get("phase"):
        logger.info(
            "phase %s -> %s: %s", old.get("phase", "Pending"), new["phase"], decision.status.message
        )

"""The evaluation runs of this operator process, one per ModelRollout, as asyncio tasks in kopf's
event loop.

A run takes minutes (hundreds of requests through the ingress); kopf's timer must keep ticking
meanwhile (actions, spec changes, other rollouts). So the timer never awaits a run: each tick it
asks `report` what the run named in status has done so far and, after the state machine decided,
calls `sync`, which starts the run the new status names and cancels any other one (an abort, a
spec change, a step that moved on). The run only reads and computes; status stays the timer's to
write. The run is I/O (aiohttp) and short CPU bursts (scoring an answer); the golden set is loaded
in a thread, since reading a ConfigMap is a blocking Kubernetes call.

Nothing here survives a restart: a new operator finds no run of the name in status and the state
machine counts that attempt as interrupted (evaluation/attempts.py says why restarting beats
resuming).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from amalia_operator.constants import SERVE_PORT, SERVE_SERVICE_SUFFIX
from amalia_operator.evaluation.attempts import EvaluationReport, RunKey, run_key
from amalia_operator.evaluation.goldenset import (
    GoldenSet,
    GoldenSetError,
    golden_set_info,
    load_named_golden_set,
    parse_golden_set,
)
from amalia_operator.evaluation.result import EvaluationResult, summarise
from amalia_operator.evaluation.runner import EvaluationRun, Progress, ask
from amalia_operator.models import EvaluationStep, GoldenSetInfo, RolloutSpec, RolloutStatus

logger = logging.getLogger(__name__)

# (namespace, ConfigMap name, key) -> the key's text; raises LookupError when it cannot.
ConfigMapReader = Callable[[str, str, str], str]
_Outcome = tuple[EvaluationResult, GoldenSetInfo | None]


def serve_service_url(ray_service: str, namespace: str) -> str:
    """KubeRay's Service in front of the RayService's Serve proxies: the default ingress."""
    return f"http://{ray_service}{SERVE_SERVICE_SUFFIX}.{namespace}.svc:{SERVE_PORT}"


@dataclass(frozen=True)
class RunRequest:
    step: EvaluationStep
    stable: str
    canary: str
    namespace: str
    base_url: str


def _load(request: RunRequest, read: ConfigMapReader) -> tuple[GoldenSet, GoldenSetInfo]:
    source = request.step.golden_set
    ref = source.config_map_ref
    if ref is None:
        golden, where = load_named_golden_set(str(source.name))
    else:
        where = source.describe(request.namespace)
        golden = parse_golden_set(read(request.namespace, ref.name, ref.key), where)
    return golden, golden_set_info(golden, where)


async def run_step(request: RunRequest, read: ConfigMapReader, progress: Progress) -> _Outcome:
    """Loads the step's golden set and asks it of both variants; a set that cannot be loaded is
    an evaluator error in the result (inconclusive), never an exception."""
    started = time.monotonic()
    try:
        golden, info = await asyncio.to_thread(_load, request, read)
    except (GoldenSetError, LookupError) as exc:
        logger.error("evaluation of %s not started: %s", request.canary, exc)
        errors = [f"golden set not loaded: {exc}"]
        return summarise(request.stable, request.canary, [], 0, time.monotonic() - started,
                         errors), None  # fmt: skip
    step = request.step
    run = EvaluationRun(
        base_url=request.base_url,
        stable=request.stable,
        canary=request.canary,
        golden_sets=[golden.name],
        seed=0,
        request_timeout_s=step.request_timeout_td.total_seconds(),
        max_concurrency=step.max_concurrency,
        budget_s=step.timeout_td.total_seconds(),
        max_requests=step.max_requests,
    )
    logger.info(
        "evaluation of %s against %s at %s: golden set %s (%d items, %s)",
        request.canary, request.stable, request.base_url, info.name, info.items, info.source,
    )  # fmt: skip
    return await ask(run, [golden], progress), info


@dataclass
class _Run:
    key: RunKey
    request: RunRequest
    progress: Progress
    task: asyncio.Task[_Outcome]


class EvaluationTasks:
    """At most one run per ModelRollout (by uid), the one its status names."""

    def __init__(self, read: ConfigMapReader):
        self._read = read
        self._runs: dict[str, _Run] = {}

    def report(self, uid: str, spec: RolloutSpec, status: RolloutStatus) -> EvaluationReport | None:
        """What the run `status` names has done; None when this process runs no such run."""
        run = self._runs.get(uid)
        key = run_key(spec, status)
        if run is None or key is None or run.key != key:
            return None
        answered, planned = run.progress.answered, run.progress.planned
        if not run.task.done():
            return EvaluationReport(answered, planned)
        error = run.task.exception()
        if error is not None:
            # A bug, not a verdict on the canary: inconclusive, with what went wrong.
            logger.error("evaluation of %s crashed", run.request.canary, exc_info=error)
            errors = [f"the evaluation failed: {type(error).__name__}: {error}"]
            crashed = summarise(run.request.stable, run.request.canary, [], 0, 0.0, errors)
            return EvaluationReport(answered, planned, crashed)
        result, info = run.task.result()
        return EvaluationReport(answered, planned, result, info)

    def sync(self, uid: str, spec: RolloutSpec, status: RolloutStatus, namespace: str) -> None:
        """Makes the run in flight for `uid` the one `status` names: any other is cancelled, and
        the named one is started when it is not running yet."""
        key = run_key(spec, status)
        run = self._runs.get(uid)
        if run is not None and run.key != key:
            if not run.task.done():
                logger.info("evaluation of %s cancelled: the rollout moved on", run.request.canary)
            run.task.cancel()
            del self._runs[uid]
        if key is None or uid in self._runs:
            return
        step = spec.steps[key.step_index].evaluation
        assert step is not None  # run_key names evaluation steps only
        request = RunRequest(
            step=step,
            stable=spec.stable.name,
            canary=spec.canary.name,
            namespace=namespace,
            base_url=step.ingress_url or serve_service_url(spec.ray_service_name, namespace),
        )
        progress = Progress()
        task = asyncio.create_task(
            run_step(request, self._read, progress),
            name=f"evaluation of {spec.canary.name} (step {key.step_index}, attempt {key.attempt})",
        )
        self._runs[uid] = _Run(key, request, progress, task)

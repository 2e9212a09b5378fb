"""The evaluation run against a real Ray Serve with the two demo variants, and the operator's
evaluation step rolling out canaries on that same Serve.

The demo checkpoints are tiny random models, so they fail nearly every item of pt-pt-core-v1: the
run tests prove the mechanics (pinning by model name, seeded reruns giving the same scores,
counting, time bounds, a canary that cannot answer vs an ingress that cannot be reached), not answer
quality. The rollout tests use a golden set whose items the demo stable does answer (a few words to
short prompts), and canaries the operator adds itself from the stable's application: one whose
engine (a 64-token context) cannot answer the longer items, rolled back by the step; one on the
stable's own checkpoint, which answers exactly as the stable and passes, then gets a copy of every
request through a shadow step until an abort turns it off (this part needs the serving side of
shadow traffic, amalia_serve.shadow).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

from amalia_operator import kube, serveconfig
from amalia_operator.evaluation import EvaluationResult, GoldenSet, judge, load_golden_sets
from amalia_operator.evaluation.runner import EvaluationRun, ask
from amalia_operator.evaluation.tasks import EvaluationTasks
from amalia_operator.models import CanaryVariant, RolloutSpec, RolloutStatus
from amalia_operator.rollout import Event, Observations, ServeEdit, ServeObservation, advance

pytestmark = [pytest.mark.integration, pytest.mark.demo_variants, pytest.mark.timeout(900)]

# One item per kind of check, so every scorer runs on real model output.
CORE_SUBSET = [
    "capital",
    "sns24-telefone",
    "sns24-funcao",
    "tres-palavras",
    "lista-tres-rios",
    "json-capital",
    "uma-frase",
    "palavra-em-maiusculas",
    "autocarro",
    "estas-a-fazer",
]
# Items any answer passes: a canary that cannot answer turns them from pass to fail.
PROBE = GoldenSet.model_validate(
    {
        "apiVersion": "evaluation.amalia.pt/v1",
        "kind": "GoldenSet",
        "name": "probe-v1",
        "maxTokens": 8,
        "items": [
            {
                "id": f"responde-{n}",
                "category": "sonda",
                "prompt": prompt,
                "check": {"type": "regex", "pattern": r"\S"},
            }
            for n, prompt in enumerate(["Olá!", "Bom dia, como estás?"])
        ],
    }
)


@pytest.fixture(scope="module")
def served_config(demo_checkpoints: tuple[Path, Path]) -> dict[str, Any]:
    sft, dpo = demo_checkpoints
    return demo_app_config(sft, dpo, free_port())


@pytest.fixture(scope="module")
def served(served_config: dict[str, Any]) -> Iterator[RunningServe]:
    with running_serve(served_config) as serve:
        yield serve


@pytest.fixture(scope="module")
def golden_sets() -> list[GoldenSet]:
    (core,) = load_golden_sets(["pt-pt-core-v1"])
    subset = [item for item in core.items if item.id in CORE_SUBSET]
    return [core.model_copy(update={"items": subset}), PROBE]


def evaluation(base_url: str, **overrides: Any) -> EvaluationRun:
    return EvaluationRun.model_validate(
        {
            "baseUrl": base_url,
            "stable": "amalia-sft",
            "canary": "amalia-dpo",
            "goldenSets": ["pt-pt-core-v1", "probe-v1"],
            "seed": 1234,
            "requestTimeoutS": 60,
            "maxConcurrency": 4,
            "budgetS": 300,
            **overrides,
        }
    )


def scores(result: EvaluationResult) -> tuple[object, ...]:
    stable, canary = result.stable, result.canary
    return stable.score, canary.score, stable.by_category, canary.by_category, result.regressions


async def test_evaluation_pins_variants_and_repeats_itself_when_run_twice_with_one_seed(
    served: RunningServe, golden_sets: list[GoldenSet]
) -> None:
    first = await ask(evaluation(served.base_url), golden_sets)
    second = await ask(evaluation(served.base_url), golden_sets)

    planned = len(CORE_SUBSET) + len(PROBE.items)
    for result in (first, second):
        # No evaluator error: every answer came from the variant asked for by name.
        assert result.errors == []
        assert result.planned == len(result.items) == planned
        assert result.stable.unanswered == result.canary.unanswered == 0
        assert result.stable.by_category["sonda"] == result.canary.by_category["sonda"] == 1.0
        assert all(i.stable.latency_s > 0 and i.canary.latency_s > 0 for i in result.items)
        assert result.duration_s < 300
    # Greedy and seeded: the same answers, so the same scores.
    assert [(i.stable.text, i.canary.text) for i in first.items] == [
        (i.stable.text, i.canary.text) for i in second.items
    ]
    assert scores(first) == scores(second)
    # Two different checkpoints: pinning really reached two variants.
    assert any(i.stable.text != i.canary.text for i in first.items)


async def test_evaluation_fails_canary_not_evaluator_when_canary_model_is_not_deployed(
    served: RunningServe, golden_sets: list[GoldenSet]
) -> None:
    result = await ask(evaluation(served.base_url, canary="amalia-absent"), golden_sets)
    assert result.errors == []
    assert result.stable.unanswered == 0
    assert result.canary.unanswered == result.canary.total == len(result.items)
    assert all(
        i.canary.detail.startswith("HTTP 404: The model `amalia-absent`") for i in result.items
    )
    assert {"probe-v1/responde-0", "probe-v1/responde-1"} <= set(result.regressions)
    verdict = judge(result, tolerance=0.05, floor=0.0)
    assert verdict.verdict == "Failed"
    assert "canary amalia-absent scored 0.000" in verdict.reason
    assert f"{len(result.items)} without an answer" in verdict.reason


async def test_evaluation_counts_timeouts_as_unanswered_when_requests_are_too_slow(
    served: RunningServe,
) -> None:
    slow = PROBE.model_copy(update={"max_tokens": 512})
    result = await ask(evaluation(served.base_url, requestTimeoutS=0.01), [slow])
    assert result.errors == []
    assert result.canary.unanswered == result.stable.unanswered == len(PROBE.items)
    assert {i.canary.detail for i in result.items} == {"no answer within 0.01s"}
    # The stable timed out too: no baseline, so no verdict on the canary.
    assert judge(result, tolerance=0.05, floor=0.0).verdict == "Inconclusive"


async def test_evaluation_stops_at_budget_and_is_inconclusive_when_budget_is_too_small(
    served: RunningServe, golden_sets: list[GoldenSet]
) -> None:
    started = time.monotonic()
    result = await ask(evaluation(served.base_url, budgetS=0.05), golden_sets)
    assert time.monotonic() - started < 2.0
    (error,) = result.errors
    assert error.startswith("the time budget of 0.05s ran out with ")
    assert len(result.items) < result.planned
    assert judge(result, tolerance=0.05, floor=0.0).verdict == "Inconclusive"


async def test_evaluation_is_inconclusive_when_ingress_is_unreachable(
    golden_sets: list[GoldenSet],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = await ask(evaluation(dead), golden_sets)
    assert result.items == []
    assert result.errors and result.errors[0].startswith("ingress unreachable")
    assert judge(result, tolerance=0.05, floor=0.0).verdict == "Inconclusive"


# === the operator's evaluation step on this Serve ===
NS = "amalia"
# A golden set the demo stable answers: at least three words to each prompt (seen: 8 to 19, greedy;
# a prompt it answered with one run of underscores is left out). With the set's own short system
# message (the variant's default one is ~65 tokens), the demo tokenizer makes the short prompts
# 32-37 tokens and the long ones 51 and 64: with 24 answer tokens, a 64-token context holds the
# first, never the second.
SHORT_PROMPTS = ["Olá!", "Bom dia!", "Boa noite!"]
LONG_PROMPTS = [
    "Escreve uma frase sobre Lisboa e o rio Tejo, por favor.",
    "Descreve em poucas palavras o que se vê da janela de um comboio entre Lisboa e o Porto.",
]
# The worse canary's engine: the stable's, with a context too small for the longer items.
SHORT_ENGINE = {"max_model_len": 64}
DEMO_SET = yaml.safe_dump(
    {
        "apiVersion": "evaluation.amalia.pt/v1",
        "kind": "GoldenSet",
        "name": "demo-answers-v1",
        "system": "Responde em português europeu.",
        "maxTokens": 24,
        "items": [
            {
                "id": f"{kind}-{n}",
                "category": kind,
                "prompt": prompt,
                "check": {"type": "words", "min": 3},
                "goodAnswers": ["uma resposta curta"],
                "badAnswers": ["sim"],
            }
            for kind, prompts in (("curta", SHORT_PROMPTS), ("longa", LONG_PROMPTS))
            for n, prompt in enumerate(prompts)
        ],
    },
    allow_unicode=True,
)


def read_config_map(namespace: str, name: str, key: str) -> str:
    """The ConfigMap `goldensets` of the rollout's namespace, as the Kubernetes API would return
    its key (the real API read is tested on a kube-apiserver, tests/integration/k8s)."""
    assert (namespace, name, key) == (NS, "goldensets", "demo-answers-v1.yaml")
    return DEMO_SET


class ServeAsRayService:
    """KubeRay's part for the operator, on the module's running Serve: each serveConfigV2 the
    operator writes is deployed (as KubeRay submits it), and Serve's own application statuses are
    shown the way KubeRay writes them into RayService.status."""

    def __init__(self, config: dict[str, Any], served: RunningServe):
        # The port Serve really listens on: a Serve shared between modules keeps its own.
        http = {**config["http_options"], "port": int(served.base_url.rsplit(":", 1)[1])}
        self.text = yaml.safe_dump({**config, "http_options": http}, sort_keys=False)
        self.deployed: list[dict[str, Any]] = []

    def observe(self) -> ServeObservation | None:
        from ray import serve

        statuses = {
            name: {
                "status": app.status.value,
                "serveDeploymentStatuses": {
                    d: {"status": dep.status.value} for d, dep in app.deployments.items()
                },
            }
            for name, app in serve.status().applications.items()
        }
        rayservice = {
            "spec": {"serveConfigV2": self.text},
            "status": {"activeServiceStatus": {"applicationStatuses": statuses}},
        }
        return kube.observe(rayservice, "amalia")

    def apply(self, edit: ServeEdit, canary: CanaryVariant) -> None:
        from amalia_serve.local_run import deploy_config

        text = serveconfig.apply_edit(self.text, "amalia", edit, canary)
        if text != self.text:
            self.text = text
            self.deployed.append(yaml.safe_load(text))
            deploy_config(self.deployed[-1])


def rollout_spec(
    served: RunningServe, canary: dict[str, Any], then: list[dict[str, Any]] | None = None
) -> RolloutSpec:
    """An evaluation step, then `then` (default: a pause for a person)."""
    evaluation = {
        "goldenSet": {"configMapRef": {"name": "goldensets", "key": "demo-answers-v1.yaml"}},
        "tolerance": 0.0,
        "minScore": 0.5,
        "ingressURL": served.base_url,
        "timeout": "3m",
        "requestTimeout": "60s",
        "inconclusiveLimit": 0,
    }
    return RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "stable": {"name": "amalia-sft", "modelPath": "/unused"},
            "canary": canary,
            "steps": [{"evaluation": evaluation}, *(then or [{"pause": {}}])],
            "scaleDownDelaySeconds": 0,
        }
    )


@dataclass
class Rollout:
    """One ModelRollout as the operator holds it: its spec, its status, the events it emitted."""

    spec: RolloutSpec
    until: Callable[[RolloutStatus], bool]
    status: RolloutStatus = field(default_factory=RolloutStatus)
    events: list[Event] = field(default_factory=list)
    action: str | None = None


async def drive(
    world: ServeAsRayService, tasks: EvaluationTasks, rollouts: dict[str, Rollout]
) -> None:
    """What the kopf timer does for each rollout every tick, minus Kubernetes: observe, decide,
    edit the config, keep the evaluation run in step; a rollout stops at its `until`."""
    deadline = time.monotonic() + 300
    while not all(r.until(r.status) for r in rollouts.values()):
        assert time.monotonic() < deadline, {u: r.status.message for u, r in rollouts.items()}
        for uid, r in rollouts.items():
            if r.until(r.status):
                continue
            report = tasks.report(uid, r.spec, r.status)
            observations = Observations(world.observe(), None, r.action, report)  # type: ignore[arg-type]
            decision = advance(r.spec, 1, r.status, observations, datetime.now(UTC))
            r.action = None
            if decision.edit is not None:
                world.apply(decision.edit, r.spec.canary)
            tasks.sync(uid, r.spec, decision.status, NS)
            r.status = decision.status
            r.events.extend(decision.events)
        await asyncio.sleep(0.5)


def gone(name: str) -> Callable[[RolloutStatus], bool]:
    """Rolled back, and Serve has deleted the canary's application."""

    def check(status: RolloutStatus) -> bool:
        from ray import serve

        return status.stage == "RolledBack" and name not in serve.status().applications

    return check


@dataclass(frozen=True)
class SideBySide:
    world: ServeAsRayService
    tasks: EvaluationTasks
    worse: Rollout
    equal: Rollout
    # The equal canary's status once its evaluation passed and its shadow step ran.
    equal_passed: RolloutStatus


SHADOWED = 8  # unpinned requests sent while the equal canary gets a copy of every one


def shadow_counts(served: RunningServe, variant: str) -> tuple[int, int]:
    """(copies answered, copies dropped) for `variant`, from the metrics Ray exports."""
    text = httpx.get(served.metrics_url, timeout=10).text
    counts = {"ray_amalia_shadow_requests_total": 0.0, "ray_amalia_shadow_dropped_total": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in counts and f'variant="{variant}"' in rest:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return int(counts["ray_amalia_shadow_requests_total"]), int(
        counts["ray_amalia_shadow_dropped_total"]
    )


def ask_alias(served: RunningServe, n: int) -> None:
    """`n` requests to the alias, not pinned: the weighted draw routes them (and may copy them)."""
    body = {"model": "amalia", "messages": [{"role": "user", "content": "Olá!"}], "max_tokens": 4}
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        assert all(client.post("/v1/chat/completions", json=body).status_code == 200
                   for _ in range(n))  # fmt: skip


def copies_reach(served: RunningServe, variant: str, total: int) -> tuple[int, int]:
    deadline = time.monotonic() + 30  # Ray exports counters every second here (tests/conftest.py)
    while sum(counts := shadow_counts(served, variant)) < total:
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)
    return counts


def ingress_shadow(served: RunningServe, on: bool) -> dict[str, Any]:
    """Waits until the ingress's live routing has the shadow on (or off), as GET /routing shows it:
    Serve reconfigures the ingress a moment after a config is deployed."""
    deadline = time.monotonic() + 30
    while True:
        routing: dict[str, Any] = httpx.get(f"{served.base_url}/routing", timeout=10).json()
        if bool(routing.get("shadow")) is on:
            return routing
        assert time.monotonic() < deadline, routing
        time.sleep(0.2)


@pytest.fixture(scope="module")
def side_by_side(
    served: RunningServe, served_config: dict[str, Any], demo_checkpoints: tuple[Path, Path]
) -> SideBySide:
    """Two rollouts of the stable at once, as the operator runs rollouts of different objects:
    the stable, a worse canary and an equal one are three variant applications of one Serve, and
    the two canaries start and are evaluated side by side (they stay at weight 0, so neither moves
    the other's traffic). The equal one goes on to a shadow step and waits at a pause."""
    sft, _ = demo_checkpoints
    world, tasks = ServeAsRayService(served_config, served), EvaluationTasks(read_config_map)
    short = {"name": "amalia-short", "modelPath": str(sft), "engine": SHORT_ENGINE}
    worse = Rollout(rollout_spec(served, short), gone("amalia-short"))
    shadow = {"shadow": {"percent": 100, "maxInFlight": 4}}
    equal = Rollout(
        rollout_spec(
            served, {"name": "amalia-twin", "modelPath": str(sft)}, [shadow, {"pause": {}}]
        ),
        lambda s: s.stage == "Stepping" and s.step_index == 2,
    )
    asyncio.run(drive(world, tasks, {"worse": worse, "equal": equal}))
    return SideBySide(world, tasks, worse, equal, equal.status)


@dataclass(frozen=True)
class Shadowed:
    # Copies of unpinned requests the twin got (answered, dropped) while the shadow was on, and
    # how many more came after the abort took it off.
    copies: tuple[int, int]
    after_abort: int


@pytest.fixture(scope="module")
def shadowed(side_by_side: SideBySide, served: RunningServe) -> Shadowed:
    """Requests to the alias while the equal canary's shadow step is on, then an abort, then more
    requests: what the real ingress copied to the canary in each phase."""
    ingress_shadow(served, on=True)
    answered, dropped = shadow_counts(served, "amalia-twin")
    ask_alias(served, SHADOWED)
    total = copies_reach(served, "amalia-twin", answered + dropped + SHADOWED)
    equal = side_by_side.equal
    equal.action, equal.until = "abort", lambda s: s.stage == "RolledBack"
    asyncio.run(drive(side_by_side.world, side_by_side.tasks, {"equal": equal}))
    ingress_shadow(served, on=False)
    ask_alias(served, SHADOWED)
    time.sleep(3)  # three export intervals: copies, had there been any, would show
    after = sum(shadow_counts(served, "amalia-twin")) - sum(total)
    return Shadowed((total[0] - answered, total[1] - dropped), after)


def test_evaluation_step_rolls_back_canary_whose_engine_cuts_its_answers(
    side_by_side: SideBySide, served_config: dict[str, Any]
) -> None:
    status, events = side_by_side.worse.status, side_by_side.worse.events
    last = status.last_evaluation
    assert last is not None and last.verdict == "Failed", status.message
    assert last.stable is not None and last.canary is not None and last.threshold == 1.0
    # The stable answers every item; the canary only the short ones (its engine refuses the rest).
    assert (last.stable.passed, last.stable.total, last.stable.unanswered) == (5, 5, 0)
    assert (last.canary.passed, last.canary.unanswered) == (3, 2)
    assert last.regressions == ["demo-answers-v1/longa-0", "demo-answers-v1/longa-1"]
    assert last.golden_set is not None and last.golden_set.items == 5
    assert last.golden_set.source == "ConfigMap amalia/goldensets key demo-answers-v1.yaml"
    (failed,) = [e for e in events if e.reason == "EvaluationFailed"]
    assert failed.type == "Warning"
    assert "canary amalia-short scored 0.600 (3/5), threshold 1.000" in failed.message
    assert "failing: demo-answers-v1/longa-0, demo-answers-v1/longa-1" in failed.message
    assert "2 without an answer" in failed.message
    # Built by the operator from the stable's application, with the canary's engine override.
    (stable_app,) = [a for a in served_config["applications"] if a["name"] == "amalia-sft"]
    canary_app = next(
        a
        for c in side_by_side.world.deployed
        for a in c["applications"]
        if a["name"] == "amalia-short"
    )
    assert canary_app["args"]["engine"] == {**stable_app["args"]["engine"], **SHORT_ENGINE}


def test_evaluation_step_passes_canary_that_answers_as_well_as_stable(
    side_by_side: SideBySide,
) -> None:
    status = side_by_side.equal_passed
    last = status.last_evaluation
    assert last is not None and last.verdict == "Passed", status.message
    assert last.stable == last.canary.model_copy(update={"variant": "amalia-sft"})  # type: ignore[union-attr]
    assert last.canary.score == 1.0 and last.regression_count == 0  # type: ignore[union-attr]
    assert status.phase == "Paused" and last.duration_seconds < 180


def test_shadow_step_copies_every_request_to_canary_until_abort_turns_it_off(
    side_by_side: SideBySide, shadowed: Shadowed
) -> None:
    status = side_by_side.equal_passed
    assert status.shadow is not None and status.shadow.percent == 100.0
    shadows = [
        serveconfig.observe(yaml.safe_dump(c), "amalia").shadow for c in side_by_side.world.deployed
    ]
    assert {"variant": "amalia-twin", "percent": 100.0, "max_in_flight": 4} in shadows
    answered, dropped = shadowed.copies
    # The real ingress took the operator's user_config and copied each of the SHADOWED requests
    # (a copy past maxInFlight is dropped and counted, never queued).
    assert answered >= 1 and answered + dropped == SHADOWED
    assert shadowed.after_abort == 0
    # Both rollouts over (one rolled back, one aborted): the config is as the module made it.
    assert serveconfig.observe(side_by_side.world.text, "amalia") == serveconfig.AppView(
        ("amalia-sft", "amalia-dpo"), {"amalia-sft": 90, "amalia-dpo": 10}
    )

"""The evaluation run's bookkeeping: who is blamed for a missing answer, and its bounds; and the
operator's background runs of it (started, watched, cancelled).

A scripted OpenAI server on loopback plays the ingress here, because a real one cannot be made to
misbehave on cue (only the canary slow, a variant answering for another, a garbled body).
tests/integration/test_evaluation_runner.py runs the same code against a real Ray Serve.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from amalia_operator.evaluation import GoldenSet, judge
from amalia_operator.evaluation import __main__ as evaluation_cli
from amalia_operator.evaluation.attempts import EvaluationReport
from amalia_operator.evaluation.runner import EvaluationRun, ask, evaluate
from amalia_operator.evaluation.tasks import EvaluationTasks
from amalia_operator.models import EvaluationProgress, RolloutSpec, RolloutStatus

GOLDEN = GoldenSet.model_validate(
    {
        "apiVersion": "evaluation.amalia.pt/v1",
        "kind": "GoldenSet",
        "name": "mini-v1",
        "system": "Responde em português europeu.",
        "maxTokens": 16,
        "items": [
            {
                "id": "capital",
                "category": "factos",
                "prompt": "Qual é a capital de Portugal?",
                "check": {"type": "contains", "expected": "Lisboa"},
            },
            {
                "id": "emergencia",
                "category": "administracao-publica",
                "prompt": "Número de emergência?",
                "maxTokens": 8,
                "check": {"type": "contains", "expected": "112"},
            },
            {
                "id": "autocarro",
                "category": "variedade",
                "messages": [
                    {"role": "system", "content": "Sê breve."},
                    {"role": "user", "content": "Transporte público rodoviário?"},
                ],
                "check": {"type": "variety", "expect": "autocarro"},
            },
        ],
    }
)
GOOD = {
    "Qual é a capital de Portugal?": "Lisboa.",
    "Número de emergência?": "112",
    "Transporte público rodoviário?": "O autocarro.",
}
BRAZILIAN = {**GOOD, "Transporte público rodoviário?": "O ônibus."}


@dataclass
class Ingress:
    """Answers by `model`: a variant's behaviour is looked up in `behaviour` (default: GOOD)."""

    behaviour: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    # A slow variant answers only when the test ends, so a timeout or the budget must cut it off.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)  # long enough for concurrent requests to overlap
            return await self.answer(body)
        finally:
            self.in_flight -= 1

    async def answer(self, body: dict[str, Any]) -> web.StreamResponse:
        model, question = body["model"], body["messages"][-1]["content"]
        mode = self.behaviour.get(model, "good")
        if mode == "slow":
            await self.release.wait()
        if mode == "unavailable":
            error = {"error": {"message": f"variant {model} is unavailable", "type": "x"}}
            return web.json_response(error, status=503)
        if mode == "garbled":
            return web.Response(text="<html>proxy error</html>", status=200)
        if mode == "no-choices":
            return web.json_response({"model": model, "choices": []})
        served_by = "someone-else" if mode == "unpinned" else model
        text = (BRAZILIAN if mode == "brazilian" else GOOD)[question]
        return web.json_response({"model": served_by, "choices": [{"message": {"content": text}}]})


@pytest.fixture
async def ingress() -> AsyncIterator[Ingress]:
    state = Ingress()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    yield state
    state.release.set()
    await runner.cleanup()


def settings(url: str, **overrides: Any) -> EvaluationRun:
    return EvaluationRun.model_validate(
        {
            "baseUrl": url,
            "stable": "amalia-sft",
            "canary": "amalia-dpo",
            "goldenSets": ["mini-v1"],
            "seed": 7,
            "requestTimeoutS": 1.0,
            **overrides,
        }
    )


async def test_ask_pins_each_variant_greedy_and_seeded_when_asking(ingress: Ingress) -> None:
    result = await ask(settings(ingress.url), [GOLDEN])
    assert sorted(r["model"] for r in ingress.requests) == ["amalia-dpo"] * 3 + ["amalia-sft"] * 3
    assert {(r["temperature"], r["seed"]) for r in ingress.requests} == {(0.0, 7)}
    by_question = {r["messages"][-1]["content"]: r for r in ingress.requests}
    assert by_question["Número de emergência?"]["max_tokens"] == 8
    assert by_question["Qual é a capital de Portugal?"]["max_tokens"] == 16
    assert by_question["Qual é a capital de Portugal?"]["messages"][0] == {
        "role": "system",
        "content": "Responde em português europeu.",
    }
    assert by_question["Transporte público rodoviário?"]["messages"][0]["content"] == "Sê breve."
    assert (result.stable.score, result.canary.score, result.errors) == (1.0, 1.0, [])
    assert [i.key for i in result.items] == [
        "mini-v1/capital",
        "mini-v1/emergencia",
        "mini-v1/autocarro",
    ]
    assert all(i.canary.latency_s >= 0.02 for i in result.items)


async def test_ask_lists_regressions_and_category_scores_when_canary_answers_worse(
    ingress: Ingress,
) -> None:
    ingress.behaviour["amalia-dpo"] = "brazilian"
    result = await ask(settings(ingress.url), [GOLDEN])
    assert result.regressions == ["mini-v1/autocarro"]
    assert result.canary.by_category == {
        "administracao-publica": 1.0,
        "factos": 1.0,
        "variedade": 0.0,
    }
    assert result.items[2].canary.text == "O ônibus."
    assert result.items[2].canary.detail == "pt-BR forms for ['bus']"
    verdict = judge(result, tolerance=0.1, floor=0.5)
    assert verdict.verdict == "Failed"
    assert "failing: mini-v1/autocarro" in verdict.reason


@pytest.mark.parametrize(
    ("mode", "detail"),
    [
        ("slow", "no answer within 0.3s"),
        ("unavailable", "HTTP 503: variant amalia-dpo is unavailable"),
        ("garbled", "HTTP 200 with a body that is not JSON"),
        ("no-choices", "HTTP 200 without choices[0].message.content"),
    ],
)
async def test_ask_counts_canary_items_as_failed_not_errors_when_canary_cannot_answer(
    ingress: Ingress, mode: str, detail: str
) -> None:
    ingress.behaviour["amalia-dpo"] = mode
    result = await ask(settings(ingress.url, requestTimeoutS=0.3), [GOLDEN])
    assert result.errors == []
    assert (result.canary.unanswered, result.canary.score, result.stable.score) == (3, 0.0, 1.0)
    assert {i.canary.detail for i in result.items} == {detail}
    assert judge(result, tolerance=0.1, floor=0.0).verdict == "Failed"


async def test_ask_is_inconclusive_when_ingress_answers_with_another_variant(
    ingress: Ingress,
) -> None:
    ingress.behaviour["amalia-dpo"] = "unpinned"
    result = await ask(settings(ingress.url), [GOLDEN])
    (error,) = result.errors
    assert error == (
        "asked amalia-dpo by model name but 'someone-else' answered: "
        "the ingress does not pin variants (3 requests)"
    )
    assert judge(result, tolerance=0.1, floor=0.0).verdict == "Inconclusive"


async def test_ask_keeps_at_most_max_concurrency_requests_in_flight_when_asking(
    ingress: Ingress,
) -> None:
    await ask(settings(ingress.url, maxConcurrency=2), [GOLDEN])
    assert ingress.max_in_flight == 2
    ingress.max_in_flight = 0
    await ask(settings(ingress.url, maxConcurrency=1), [GOLDEN])
    assert ingress.max_in_flight == 1


async def test_ask_stops_at_budget_and_is_inconclusive_when_time_runs_out(
    ingress: Ingress,
) -> None:
    ingress.behaviour["amalia-sft"] = "slow"
    started = time.monotonic()
    result = await ask(settings(ingress.url, budgetS=0.5, requestTimeoutS=10), [GOLDEN])
    assert time.monotonic() - started < 2.0
    assert result.items == []
    assert result.errors == ["the time budget of 0.5s ran out with 3 of 6 requests unanswered"]
    assert judge(result, tolerance=0.1, floor=0.0).verdict == "Inconclusive"


async def test_ask_is_inconclusive_when_ingress_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: connection refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = await ask(settings(url), [GOLDEN])
    assert result.items == [] and result.planned == 3
    (error,) = result.errors
    assert error.startswith("ingress unreachable: Cannot connect to host 127.0.0.1")
    assert error.endswith("(6 requests)")
    verdict = judge(result, tolerance=0.1, floor=0.0)
    assert verdict.verdict == "Inconclusive" and "ingress unreachable" in verdict.reason


async def test_evaluate_is_inconclusive_when_golden_set_does_not_load(ingress: Ingress) -> None:
    result = await evaluate(settings(ingress.url, goldenSets=["missing-v1"]))
    assert ingress.requests == []
    assert len(result.errors) == 1 and "golden sets not found: ['missing-v1']" in result.errors[0]
    assert judge(result, tolerance=0.1, floor=0.0).verdict == "Inconclusive"


def test_evaluation_run_refuses_settings_when_invalid() -> None:
    with pytest.raises(ValueError, match="stable and canary must differ"):
        settings("http://x", canary="amalia-sft")
    with pytest.raises(ValueError, match="maxConcurrency"):
        settings("http://x", maxConcurrency=0)
    with pytest.raises(ValueError, match="goldenSets"):
        settings("http://x", goldenSets=[])


async def test_run_command_prints_scores_and_exits_with_verdict_when_canary_is_worse(
    ingress: Ingress, tmp_path: Path
) -> None:
    (tmp_path / "mini-v1.yaml").write_text(
        yaml.safe_dump(GOLDEN.wire(), allow_unicode=True), encoding="utf-8"
    )
    ingress.behaviour["amalia-dpo"] = "brazilian"
    argv = ["run", "--base-url", ingress.url, "--stable", "amalia-sft", "--canary", "amalia-dpo"]
    argv += ["--golden-set", "mini-v1", "--dir", str(tmp_path), "--tolerance", "0.1"]
    out = io.StringIO()
    # The command runs its own event loop, so it gets a thread of its own.
    code = await asyncio.to_thread(evaluation_cli.main, argv, out)
    assert code == 1
    stable, canary, regressions, duration, verdict = out.getvalue().splitlines()
    assert stable == (
        "stable amalia-sft: 1.000 (3/3) [administracao-publica 1.00, factos 1.00, variedade 1.00]"
    )
    assert canary == (
        "canary amalia-dpo: 0.667 (2/3) [administracao-publica 1.00, factos 1.00, variedade 0.00]"
    )
    assert regressions == "pass to fail: mini-v1/autocarro"
    assert duration.startswith("duration: ")
    assert verdict == (
        "Failed: canary amalia-dpo scored 0.667 (2/3), threshold 0.900 (stable amalia-sft 1.000 "
        "minus tolerance 0.1, floor 0); failing: mini-v1/autocarro"
    )


async def test_ask_sends_nothing_when_golden_sets_need_more_requests_than_allowed(
    ingress: Ingress,
) -> None:
    result = await ask(settings(ingress.url, maxRequests=5), [GOLDEN])
    assert ingress.requests == []
    assert result.errors == [
        "the golden sets need 6 requests (3 items, 2 each), more than maxRequests 5"
    ]
    assert judge(result, 0.05, 0.0).verdict == "Inconclusive"


# === the operator's background runs (evaluation/tasks.py) ===
UID = "0b7c1c9e"
STARTED = "2026-11-28T10:00:00Z"


def at_evaluation(url: str, key: str = "mini-v1.yaml") -> tuple[RolloutSpec, RolloutStatus]:
    """A rollout whose evaluation step (golden set from a ConfigMap) has started attempt 1."""
    spec = RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "stable": {"name": "amalia-sft", "modelPath": "/m/sft"},
            "canary": {"name": "amalia-dpo", "modelPath": "/m/dpo"},
            "steps": [
                {
                    "evaluation": {
                        "goldenSet": {"configMapRef": {"name": "sets", "key": key}},
                        "ingressURL": url,
                        "requestTimeout": "30s",
                    }
                }
            ],
        }
    )
    progress = EvaluationProgress(step_index=0, started_at=STARTED)
    return spec, RolloutStatus(stage="Stepping", step_index=0, evaluation=progress)


def config_maps(namespace: str, name: str, key: str) -> str:
    """The rollout namespace's ConfigMap `sets`, as kube.read_config_map_key returns its keys."""
    if key != "mini-v1.yaml":
        raise LookupError(f"ConfigMap {namespace}/{name} has no key {key!r}")
    return yaml.safe_dump(GOLDEN.model_dump(by_alias=True, exclude_none=True), allow_unicode=True)


async def until_report(
    tasks: EvaluationTasks, spec: RolloutSpec, status: RolloutStatus, done: Any
) -> EvaluationReport:
    deadline = time.monotonic() + 10
    while True:
        report = tasks.report(UID, spec, status)
        if report is not None and done(report):
            return report
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.01)


def evaluation_tasks_alive() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("evaluation of ")]


async def test_tasks_run_in_background_and_report_progress_then_result_when_synced(
    ingress: Ingress,
) -> None:
    ingress.behaviour["amalia-dpo"] = "slow"  # the canary answers when the test says so
    tasks = EvaluationTasks(config_maps)
    spec, status = at_evaluation(ingress.url)
    assert tasks.report(UID, spec, status) is None  # a status naming a run nobody started
    tasks.sync(UID, spec, status, "amalia")
    tasks.sync(UID, spec, status, "amalia")  # the next tick: still the one run
    assert len(evaluation_tasks_alive()) == 1
    running = await until_report(tasks, spec, status, lambda r: r.answered == 3)
    assert (running.planned, running.result) == (6, None)  # the stable answered, the canary not
    ingress.release.set()
    done = await until_report(tasks, spec, status, lambda r: r.result is not None)
    assert done.result is not None and done.result.canary.score == 1.0 and done.answered == 6
    assert done.golden_set is not None and done.golden_set.name == "mini-v1"
    assert done.golden_set.source == "ConfigMap amalia/sets key mini-v1.yaml"
    assert len(done.golden_set.digest) == 12 and done.golden_set.items == 3
    # A restarted operator knows of no run: the state machine counts it as interrupted.
    assert EvaluationTasks(config_maps).report(UID, spec, status) is None


async def test_tasks_cancel_the_run_when_the_rollout_moves_on(ingress: Ingress) -> None:
    ingress.behaviour["amalia-dpo"] = "slow"
    tasks = EvaluationTasks(config_maps)
    spec, status = at_evaluation(ingress.url)
    tasks.sync(UID, spec, status, "amalia")
    await until_report(tasks, spec, status, lambda r: r.answered == 3)
    aborted = status.model_copy(update={"stage": "RollingBack"})
    tasks.sync(UID, spec, aborted, "amalia")
    assert tasks.report(UID, spec, status) is None
    deadline = time.monotonic() + 5
    # The canary never answers (never released), so only a cancellation ends the run; it lands
    # once aiohttp has let go of its connections.
    while evaluation_tasks_alive():
        assert time.monotonic() < deadline, evaluation_tasks_alive()
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("key", "reader", "error"),
    [
        ("finance-v1.yaml", config_maps, "golden set not loaded: ConfigMap amalia/sets has no key"),
        ("mini-v1.yaml", lambda *_: "items: [",
         "golden set not loaded: ConfigMap amalia/sets key mini-v1.yaml: not valid YAML"),
        ("mini-v1.yaml", lambda *_: 1 / 0, "the evaluation failed: ZeroDivisionError"),
    ],
    ids=["missing-key", "malformed-set", "bug"],
)  # fmt: skip
async def test_tasks_report_inconclusive_result_when_run_cannot_start(
    ingress: Ingress, key: str, reader: Any, error: str
) -> None:
    tasks = EvaluationTasks(reader)
    spec, status = at_evaluation(ingress.url, key)
    tasks.sync(UID, spec, status, "amalia")
    report = await until_report(tasks, spec, status, lambda r: r.result is not None)
    assert report.result is not None and report.golden_set is None
    assert report.result.errors[0].startswith(error), report.result.errors
    assert judge(report.result, 0.05, 0.0).verdict == "Inconclusive"
    assert ingress.requests == []

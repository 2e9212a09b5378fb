"""The evaluation run against a real Ray Serve with the two demo variants.

The demo checkpoints are tiny random models, so they fail nearly every golden-set item: these tests
prove the mechanics (pinning by model name, seeded reruns giving the same scores, counting, time
bounds, a canary that cannot answer vs an ingress that cannot be reached), not answer quality.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

from amalia_operator.evaluation import EvaluationResult, GoldenSet, judge, load_golden_sets
from amalia_operator.evaluation.runner import EvaluationRun, ask

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
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    with running_serve(demo_app_config(sft, dpo, free_port())) as serve:
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

"""The verdict on an evaluation: thresholds, and what makes a run inconclusive rather than a pass."""

from __future__ import annotations

import subprocess
import sys

import pytest

from amalia_operator.evaluation import judge
from amalia_operator.evaluation.result import Attempt, EvaluationResult, ItemResult, summarise


def attempt(passed: bool, answered: bool = True) -> Attempt:
    detail = "ok" if passed else "wrong" if answered else "HTTP 503: variant unavailable"
    return Attempt(answered=answered, passed=passed, latency_s=0.5, detail=detail)


def run(
    stable: list[bool],
    canary: list[bool],
    *,
    canary_answered: list[bool] | None = None,
    stable_answered: list[bool] | None = None,
    errors: tuple[str, ...] = (),
    planned: int | None = None,
) -> EvaluationResult:
    canary_answered = canary_answered or [True] * len(canary)
    stable_answered = stable_answered or [True] * len(stable)
    items = [
        ItemResult(
            key=f"core/item-{n}",
            category="factos" if n % 2 else "variedade",
            stable=attempt(s, sa),
            canary=attempt(c, ca),
        )
        for n, (s, c, sa, ca) in enumerate(
            zip(stable, canary, stable_answered, canary_answered, strict=True)
        )
    ]
    return summarise("amalia-sft", "amalia-dpo", items, planned or len(items), 12.5, list(errors))


def test_summarise_scores_each_variant_overall_and_per_category_when_items_scored() -> None:
    result = run([True, True, True, False], [True, False, True, False])
    assert (result.stable.score, result.stable.passed, result.stable.total) == (0.75, 3, 4)
    assert result.canary.score == 0.5
    assert result.canary.by_category == {"factos": 0.0, "variedade": 1.0}
    assert result.stable.by_category == {"factos": 0.5, "variedade": 1.0}
    assert result.regressions == ["core/item-1"]
    assert result.canary.mean_latency_s == 0.5


def test_judge_passes_when_canary_is_within_tolerance_of_stable() -> None:
    verdict = judge(run([True] * 20, [True] * 19 + [False]), tolerance=0.05, floor=0.5)
    assert verdict.verdict == "Passed"
    assert verdict.threshold == pytest.approx(0.95)
    assert "scored 0.950 (19/20), threshold 0.950" in verdict.reason


def test_judge_passes_when_canary_beats_stable() -> None:
    assert judge(run([False, True], [True, True]), tolerance=0.0, floor=0.0).verdict == "Passed"


def test_judge_fails_and_names_regressions_first_when_canary_is_below_tolerance() -> None:
    stable = [True] * 8 + [False, False]
    canary = [True] * 5 + [False] * 5
    verdict = judge(run(stable, canary), tolerance=0.1, floor=0.0)
    assert verdict.verdict == "Failed"
    assert verdict.threshold == pytest.approx(0.7)
    assert "canary amalia-dpo scored 0.500 (5/10), threshold 0.700" in verdict.reason
    assert "stable amalia-sft 0.800 minus tolerance 0.1, floor 0" in verdict.reason
    assert verdict.reason.endswith(
        "failing: core/item-5, core/item-6, core/item-7, core/item-8, core/item-9"
    )


def test_judge_fails_when_canary_matches_stable_but_is_below_floor() -> None:
    verdict = judge(run([True, False, False, False], [True, False, False, False]), 0.1, 0.5)
    assert verdict.verdict == "Failed"
    assert verdict.threshold == 0.5
    assert "failing: core/item-1, core/item-2, core/item-3" in verdict.reason


def test_judge_counts_unanswered_canary_items_as_failures_when_canary_cannot_answer() -> None:
    result = run([True] * 7, [False] * 7, canary_answered=[False] * 7)
    verdict = judge(result, tolerance=0.05, floor=0.0)
    assert verdict.verdict == "Failed"
    assert result.canary.unanswered == 7
    assert "and 2 more; 7 without an answer" in verdict.reason


def test_judge_is_inconclusive_when_stable_could_not_answer() -> None:
    result = run([True, False], [True, True], stable_answered=[True, False])
    verdict = judge(result, tolerance=0.05, floor=0.0)
    assert verdict.verdict == "Inconclusive"
    assert "stable amalia-sft could not answer 1 of 2 items (core/item-1)" in verdict.reason


def test_judge_is_inconclusive_not_passed_when_evaluator_failed() -> None:
    errors = ("ingress unreachable: Cannot connect to host 127.0.0.1:9 (4 requests)",)
    verdict = judge(run([True], [True], errors=errors), tolerance=0.05, floor=0.0)
    assert verdict.verdict == "Inconclusive"
    assert verdict.reason == f"evaluation inconclusive: {errors[0]}"


def test_judge_is_inconclusive_when_fewer_items_were_asked_than_planned() -> None:
    verdict = judge(run([True], [True], planned=3), tolerance=0.05, floor=0.0)
    assert verdict.verdict == "Inconclusive"
    assert "1 of 3 items were asked" in verdict.reason


def test_judge_is_inconclusive_when_nothing_was_asked() -> None:
    assert judge(run([], [], planned=0), tolerance=0.0, floor=0.0).verdict == "Inconclusive"


@pytest.mark.parametrize(("tolerance", "floor"), [(-0.1, 0.5), (0.1, 1.5)])
def test_judge_refuses_thresholds_when_outside_unit_interval(
    tolerance: float, floor: float
) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        judge(run([True], [True]), tolerance, floor)


@pytest.mark.parametrize(
    "module",
    [
        "amalia_operator.evaluation",
        "amalia_operator.evaluation.judge",
        "amalia_operator.evaluation.checks",
        "amalia_operator.evaluation.goldenset",
        "amalia_operator.evaluation.attempts",
        "amalia_operator.rollout",
    ],
)
def test_evaluation_pure_modules_import_no_http_or_kubernetes_when_loaded(module: str) -> None:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(out.stdout.split())
    loaded = {name.split(".")[0] for name in modules}
    assert not {"aiohttp", "kopf", "kubernetes", "ray", "torch"} & loaded
    assert "amalia_serve" not in loaded  # the lexicon comes from amalia_variety (tests/unit/test_layering.py)

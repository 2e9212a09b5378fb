"""The typed result of one evaluation run, and the pure arithmetic that builds it from answers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pydantic import Field

from amalia_operator.models import WireModel


class Attempt(WireModel):
    """One variant's answer to one item. `answered` is False when the variant gave no usable
    answer (a non-2xx status, a timeout, a body without a message); such an item fails."""

    answered: bool
    passed: bool
    latency_s: float
    detail: str = Field(..., description="The check's reason, or why there is no answer.")
    text: str = ""


class ItemResult(WireModel):
    key: str = Field(..., description="`<golden set>/<item id>`.")
    category: str
    stable: Attempt
    canary: Attempt


class VariantScore(WireModel):
    variant: str
    score: float = Field(..., description="Fraction of items passed, 0..1.")
    passed: int
    total: int
    unanswered: int
    by_category: dict[str, float]
    mean_latency_s: float | None


class EvaluationResult(WireModel):
    stable: VariantScore
    canary: VariantScore
    regressions: list[str] = Field(
        ..., description="Items the stable passed and the canary failed, in golden-set order."
    )
    items: list[ItemResult]
    planned: int = Field(..., description="Items in the golden sets; `items` may hold fewer.")
    duration_s: float
    errors: list[str] = Field(
        ..., description="Evaluator errors: with any, the run says nothing about the canary."
    )

    def canary_failures(self) -> list[str]:
        """Every item the canary failed, regressions first."""
        rest = [i.key for i in self.items if not i.canary.passed and i.key not in self.regressions]
        return self.regressions + rest


def variant_score(variant: str, attempts: Sequence[tuple[str, Attempt]]) -> VariantScore:
    """Scores of one variant from its (category, attempt) pairs."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    for category, attempt in attempts:
        by_category[category].append(attempt.passed)
    passed = sum(a.passed for _, a in attempts)
    latencies = [a.latency_s for _, a in attempts]
    return VariantScore(
        variant=variant,
        score=passed / len(attempts) if attempts else 0.0,
        passed=passed,
        total=len(attempts),
        unanswered=sum(not a.answered for _, a in attempts),
        by_category={c: sum(r) / len(r) for c, r in sorted(by_category.items())},
        mean_latency_s=sum(latencies) / len(latencies) if latencies else None,
    )


def summarise(
    stable: str,
    canary: str,
    items: Sequence[ItemResult],
    planned: int,
    duration_s: float,
    errors: Sequence[str],
) -> EvaluationResult:
    return EvaluationResult(
        stable=variant_score(stable, [(i.category, i.stable) for i in items]),
        canary=variant_score(canary, [(i.category, i.canary) for i in items]),
        regressions=[i.key for i in items if i.stable.passed and not i.canary.passed],
        items=list(items),
        planned=planned,
        duration_s=duration_s,
        errors=list(errors),
    )

"""The verdict on an evaluation run: pure, so the state machine can call it and a test can pin it.

The canary passes when its score is at least the stable's minus `tolerance` and at least `floor`.
Everything that is not evidence about the canary is Inconclusive, never a pass: an evaluator error
(ingress unreachable, a golden set that does not load, the time budget spent before every item was
asked) or a stable that could not answer (no baseline to compare with). A canary that could not
answer is evidence: those items fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amalia_operator.evaluation.result import EvaluationResult

Verdict = Literal["Passed", "Failed", "Inconclusive"]
# Item ids named in a reason; the rest are counted ("and 7 more").
SHOWN_ITEMS = 5
# Scores are fractions of item counts; this keeps 0.85 - 0.05 from landing a hair above 0.8.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str
    threshold: float | None = None


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_ITEMS])
    return shown + (f" and {len(keys) - SHOWN_ITEMS} more" if len(keys) > SHOWN_ITEMS else "")


def judge(result: EvaluationResult, tolerance: float, floor: float) -> Judgement:
    if not (0.0 <= tolerance <= 1.0 and 0.0 <= floor <= 1.0):
        raise ValueError(f"tolerance {tolerance} and floor {floor} must lie in [0, 1]")
    if result.errors:
        return Judgement("Inconclusive", "evaluation inconclusive: " + "; ".join(result.errors))
    if not result.items or len(result.items) < result.planned:
        return Judgement(
            "Inconclusive",
            f"evaluation inconclusive: {len(result.items)} of {result.planned} items were asked",
        )
    stable, canary = result.stable, result.canary
    if stable.unanswered:
        unanswered = [i.key for i in result.items if not i.stable.answered]
        return Judgement(
            "Inconclusive",
            f"evaluation inconclusive: stable {stable.variant} could not answer "
            f"{stable.unanswered} of {stable.total} items ({_names(unanswered)}), so there is "
            "no baseline",
        )
    threshold = max(stable.score - tolerance, floor)
    summary = (
        f"canary {canary.variant} scored {canary.score:.3f} ({canary.passed}/{canary.total}), "
        f"threshold {threshold:.3f} (stable {stable.variant} {stable.score:.3f} minus tolerance "
        f"{tolerance:g}, floor {floor:g})"
    )
    if canary.score + _EPSILON >= threshold:
        return Judgement("Passed", summary, threshold)
    failing = result.canary_failures()
    detail = f"; failing: {_names(failing)}" if failing else ""
    if canary.unanswered:
        detail += f"; {canary.unanswered} without an answer"
    return Judgement("Failed", summary + detail, threshold)

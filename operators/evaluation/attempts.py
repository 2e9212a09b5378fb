"""The evaluation step's attempts, pure: when a run starts, what a finished or missing run means,
when to try again, and the verdict recorded in status.

The run itself goes on in the background (evaluation/tasks.py) while the rollout's timer keeps
ticking; each tick passes what this operator process knows about the run (`EvaluationReport`, or
None when it knows of no such run) and this module decides. A run is named by the step, the attempt
and its start time in `status.evaluation`; an operator that restarted finds no run of that name in
itself and counts the attempt as inconclusive (interrupted) rather than resuming it: answers are not
kept in status (a run holds hundreds of them), and with greedy, seeded requests a new run asks the
same questions and gets the same answers, so a restart costs one run's time, never its verdict.

Outcomes of an attempt: Passed (next step), Failed (roll back), Inconclusive (an evaluator error, a
stable without answers, a run cut short): tried again `EVALUATION_RETRY_DELAY_S` later, up to
`inconclusiveLimit` times; one more halts the step until a person promotes or aborts, the policy of
an inconclusive analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from amalia_operator.constants import EVALUATION_GRACE_S, EVALUATION_RETRY_DELAY_S
from amalia_operator.evaluation.judge import Judgement, judge
from amalia_operator.evaluation.result import EvaluationResult, VariantScore
from amalia_operator.models import (
    EvaluationProgress,
    EvaluationScore,
    EvaluationStep,
    EvaluationSummary,
    GoldenSetInfo,
    RolloutSpec,
    RolloutStatus,
    parse_time,
    rfc3339,
)

# Items named in status.lastEvaluation.regressions; the rest are counted.
LISTED_REGRESSIONS = 20


@dataclass(frozen=True)
class RunKey:
    """Names one run: the step, the attempt, and when the attempt started."""

    step_index: int
    attempt: int
    started_at: str


@dataclass(frozen=True)
class EvaluationReport:
    """What this operator process knows of the run that status.evaluation names: its progress
    while in flight; the result (and the golden set it asked, when that loaded) once done."""

    answered: int = 0
    planned: int = 0
    result: EvaluationResult | None = None
    golden_set: GoldenSetInfo | None = None


Next = Literal["wait", "pass", "fail", "halt"]


@dataclass(frozen=True)
class Outcome:
    next: Next
    message: str
    summary: EvaluationSummary | None = None


def current_progress(status: RolloutStatus) -> EvaluationProgress | None:
    progress = status.evaluation
    return progress if progress is not None and progress.step_index == status.step_index else None


def run_key(spec: RolloutSpec, status: RolloutStatus) -> RunKey | None:
    """The run that should be in flight now, if any: the current step is an evaluation whose
    attempt has started and not finished."""
    index = status.step_index
    if status.stage != "Stepping" or index >= len(spec.steps):
        return None
    progress = current_progress(status)
    if spec.steps[index].evaluation is None or progress is None or progress.halted:
        return None
    if progress.started_at is None:
        return None
    return RunKey(index, progress.attempt, progress.started_at)


def advance_attempt(
    step: EvaluationStep,
    progress: EvaluationProgress,
    report: EvaluationReport | None,
    now: datetime,
) -> Outcome:
    """One tick of the evaluation step at `progress.step_index` (not halted); updates `progress`."""
    index, attempt = progress.step_index, progress.attempt
    where = f"evaluation at step {index}"
    if progress.started_at is None:
        if progress.next_attempt_at is not None and now < parse_time(progress.next_attempt_at):
            return Outcome("wait", f"{where}: attempt {attempt} at {progress.next_attempt_at}")
        progress.started_at, progress.next_attempt_at = rfc3339(now), None
        progress.answered = progress.planned = 0
        return Outcome("wait", f"{where}: attempt {attempt} started")
    started = parse_time(progress.started_at)
    if report is None:
        reason = "interrupted: the operator restarted while the run was in flight"
        return _inconclusive(step, progress, reason, _bare_summary(progress, reason, now), now)
    if report.result is None:
        if now >= started + step.timeout_td + timedelta(seconds=EVALUATION_GRACE_S):
            reason = f"the run was still going {step.timeout} after it started (timeout)"
            return _inconclusive(step, progress, reason, _bare_summary(progress, reason, now), now)
        progress.answered, progress.planned = report.answered, report.planned
        return Outcome(
            "wait",
            f"{where}: attempt {attempt} running since {progress.started_at}, "
            f"{report.answered}/{report.planned} requests answered",
        )
    progress.answered, progress.planned = report.answered, report.planned
    judgement = judge(report.result, step.tolerance, step.min_score)
    summary = summarise(progress, report.result, report.golden_set, judgement, now)
    progress.started_at = None
    if judgement.verdict == "Passed":
        return Outcome("pass", f"{where} passed: {judgement.reason}", summary)
    if judgement.verdict == "Failed":
        return Outcome("fail", f"{where} failed: {judgement.reason}", summary)
    return _inconclusive(step, progress, judgement.reason, summary, now)


def _inconclusive(
    step: EvaluationStep,
    progress: EvaluationProgress,
    reason: str,
    summary: EvaluationSummary,
    now: datetime,
) -> Outcome:
    progress.inconclusive += 1
    progress.started_at = None
    where, limit = f"evaluation at step {progress.step_index}", step.inconclusive_limit
    if progress.inconclusive > limit:
        progress.halted = True
        return Outcome(
            "halt",
            f"{where} inconclusive {progress.inconclusive} time(s), limit {limit}: {reason}; "
            "waiting for a person: promote accepts this step, abort rolls back",
            summary,
        )
    progress.attempt += 1
    progress.next_attempt_at = rfc3339(now + timedelta(seconds=EVALUATION_RETRY_DELAY_S))
    return Outcome(
        "wait",
        f"{where} inconclusive ({progress.inconclusive}/{limit} tolerated): {reason}; "
        f"attempt {progress.attempt} at {progress.next_attempt_at}",
        summary,
    )


def _score(score: VariantScore) -> EvaluationScore:
    return EvaluationScore(
        variant=score.variant,
        score=round(score.score, 6),
        passed=score.passed,
        total=score.total,
        unanswered=score.unanswered,
    )


def summarise(
    progress: EvaluationProgress,
    result: EvaluationResult,
    golden_set: GoldenSetInfo | None,
    judgement: Judgement,
    now: datetime,
) -> EvaluationSummary:
    """The verdict and its evidence, small enough for status: scores, threshold, the first
    LISTED_REGRESSIONS items that went from pass to fail, and how long the run took."""
    asked = bool(result.items)
    return EvaluationSummary(
        step_index=progress.step_index,
        attempt=progress.attempt,
        verdict=judgement.verdict,
        reason=judgement.reason,
        time=rfc3339(now),
        duration_seconds=round(result.duration_s, 3),
        golden_set=golden_set,
        stable=_score(result.stable) if asked else None,
        canary=_score(result.canary) if asked else None,
        threshold=None if judgement.threshold is None else round(judgement.threshold, 6),
        regressions=result.regressions[:LISTED_REGRESSIONS],
        regression_count=len(result.regressions),
    )


def _bare_summary(progress: EvaluationProgress, reason: str, now: datetime) -> EvaluationSummary:
    """An attempt that ended without a result (interrupted, or hung past its timeout)."""
    started = parse_time(progress.started_at or rfc3339(now))
    return EvaluationSummary(
        step_index=progress.step_index,
        attempt=progress.attempt,
        verdict="Inconclusive",
        reason=f"evaluation inconclusive: {reason}",
        time=rfc3339(now),
        duration_seconds=(now - started).total_seconds(),
    )

"""Ask every golden-set item of the stable and the canary through the ingress, and score the answers.

Each request pins its variant by `model` (the variant's name: the ingress routes a variant name to
that variant whatever its weight) and is greedy and seeded, so a rerun asks the same questions the
same way. Requests run at most `maxConcurrency` at a time, each bounded by `requestTimeoutS`, the
whole run by `budgetS`, and a run whose golden sets need more than `maxRequests` requests is not
started at all.

Who is to blame when there is no answer:
- the variant, when the ingress answers for it with a non-2xx status, does not answer in time, or
  sends a body without a message: that item fails for that variant;
- the evaluator, when the ingress cannot be reached at all, answers with a variant other than the
  one asked for, or the budget runs out, or a golden set does not load: the run is inconclusive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field, model_validator

from amalia_operator.evaluation.goldenset import (
    DEFAULT_DIRS,
    GoldenSet,
    GoldenSetError,
    Item,
    load_golden_sets,
)
from amalia_operator.evaluation.result import Attempt, EvaluationResult, ItemResult, summarise
from amalia_operator.models import VARIANT_NAME_PATTERN, WireModel

logger = logging.getLogger(__name__)

# An error body's message is cut to this many characters in an item's detail.
_MESSAGE_CHARS = 200


class EvaluationRun(WireModel):
    """One evaluation: which ingress, which two variants, which golden sets, and its bounds."""

    base_url: str = Field(
        ..., min_length=1, description="The OpenAI ingress, e.g. http://svc:8000."
    )
    stable: str = Field(..., pattern=VARIANT_NAME_PATTERN)
    canary: str = Field(..., pattern=VARIANT_NAME_PATTERN)
    golden_sets: list[str] = Field(..., min_length=1, description="Golden-set names.")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    request_timeout_s: float = Field(60.0, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)
    budget_s: float = Field(600.0, gt=0, description="The whole run, all requests included.")
    max_requests: int | None = Field(
        None, ge=2, description="Refuse golden sets that need more requests (2 per item)."
    )

    @model_validator(mode="after")
    def _distinct(self) -> EvaluationRun:
        if self.stable == self.canary:
            raise ValueError("stable and canary must differ")
        return self


@dataclass
class Progress:
    """Requests of a run answered so far (both variants together), for whoever watches it."""

    answered: int = 0
    planned: int = 0


@dataclass(frozen=True)
class _Reply:
    """One request's outcome: the answer text, or why the variant gave none, or an evaluator
    error (the ingress, not the variant, failed)."""

    latency_s: float
    text: str | None = None
    problem: str = ""
    evaluator_error: str | None = None


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    text = raw.decode("utf-8", "replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return " ".join(str(message).split())[:_MESSAGE_CHARS]


def _answer_text(body: Any) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    variant: str,
    payload: dict[str, Any],
    timeout_s: float,
) -> _Reply:
    started = time.monotonic()

    def took() -> float:
        return time.monotonic() - started

    try:
        async with session.post(url, json=payload) as response:
            raw = await response.read()
            status = response.status
    except aiohttp.ClientConnectorError as exc:
        return _Reply(took(), evaluator_error=f"ingress unreachable: {exc}")
    except TimeoutError:
        return _Reply(took(), problem=f"no answer within {timeout_s:g}s")
    except aiohttp.ClientError as exc:
        return _Reply(took(), problem=f"{type(exc).__name__}: {exc}")
    latency = took()
    if not 200 <= status < 300:
        return _Reply(latency, problem=f"HTTP {status}: {_error_message(raw)}")
    try:
        body = json.loads(raw)
    except ValueError:
        return _Reply(latency, problem=f"HTTP {status} with a body that is not JSON")
    served_by = body.get("model") if isinstance(body, dict) else None
    if served_by != variant:
        return _Reply(
            latency,
            evaluator_error=f"asked {variant} by model name but {served_by!r} answered: "
            "the ingress does not pin variants",
        )
    text = _answer_text(body)
    if text is None:
        return _Reply(latency, problem=f"HTTP {status} without choices[0].message.content")
    return _Reply(latency, text=text)


def _attempt(item: Item, reply: _Reply) -> Attempt:
    if reply.text is None:
        return Attempt(
            answered=False, passed=False, latency_s=reply.latency_s, detail=reply.problem
        )
    checked = item.check.score(reply.text)
    return Attempt(
        answered=True,
        passed=checked.passed,
        latency_s=reply.latency_s,
        detail=checked.detail,
        text=reply.text,
    )


async def ask(
    run: EvaluationRun, golden_sets: Sequence[GoldenSet], progress: Progress | None = None
) -> EvaluationResult:
    """Asks every item of `golden_sets` of both variants and scores the answers; `progress`
    counts the answers as they come."""
    started = time.monotonic()
    plan = [(golden, item) for golden in golden_sets for item in golden.items]
    progress = progress or Progress()
    progress.answered, progress.planned = 0, 2 * len(plan)
    if run.max_requests is not None and progress.planned > run.max_requests:
        error = (
            f"the golden sets need {progress.planned} requests ({len(plan)} items, 2 each), "
            f"more than maxRequests {run.max_requests}"
        )
        return summarise(run.stable, run.canary, [], len(plan), 0.0, [error])
    url = run.base_url.rstrip("/") + "/v1/chat/completions"
    gate = asyncio.Semaphore(run.max_concurrency)
    timeout = aiohttp.ClientTimeout(total=run.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=run.max_concurrency)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(golden: GoldenSet, item: Item, variant: str) -> _Reply:
            payload = {
                "model": variant,
                "messages": golden.chat(item),
                "temperature": 0.0,
                "seed": run.seed,
                "max_tokens": golden.max_tokens_for(item),
            }
            async with gate:  # the latency clock starts once the request may go
                reply = await _post(session, url, variant, payload, run.request_timeout_s)
            progress.answered += 1
            return reply

        # Stable and canary of one item side by side, so a budget that runs out leaves both
        # variants equally far; the semaphore wakes waiters in this order.
        tasks = [
            (asyncio.create_task(one(g, i, run.stable)), asyncio.create_task(one(g, i, run.canary)))
            for g, i in plan
        ]
        everything = [t for pair in tasks for t in pair]
        _, pending = await asyncio.wait(everything, timeout=run.budget_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    items: list[ItemResult] = []
    errors: Counter[str] = Counter()
    for (golden, item), (stable_task, canary_task) in zip(plan, tasks, strict=True):
        if stable_task.cancelled() or canary_task.cancelled():
            continue
        stable, canary = stable_task.result(), canary_task.result()
        blame = [r.evaluator_error for r in (stable, canary) if r.evaluator_error]
        errors.update(blame)
        if not blame:
            key = f"{golden.name}/{item.id}"
            items.append(
                ItemResult(
                    key=key,
                    category=item.category,
                    stable=_attempt(item, stable),
                    canary=_attempt(item, canary),
                )
            )
    messages = [f"{m} ({n} requests)" if n > 1 else m for m, n in errors.items()]
    if pending:
        messages.append(
            f"the time budget of {run.budget_s:g}s ran out with {len(pending)} of "
            f"{len(everything)} requests unanswered"
        )
    result = summarise(
        run.stable, run.canary, items, len(plan), time.monotonic() - started, messages
    )
    logger.info(
        "evaluation of %s against %s: %.3f vs %.3f over %d/%d items in %.1fs; errors: %s",
        run.canary, run.stable, result.canary.score, result.stable.score, len(items), len(plan),
        result.duration_s, messages or "none",
    )  # fmt: skip
    return result


async def evaluate(run: EvaluationRun, dirs: Sequence[Path] = DEFAULT_DIRS) -> EvaluationResult:
    """`ask` with the golden sets looked up by name; a set that does not load makes the run
    inconclusive (an error in the result) rather than raising."""
    started = time.monotonic()
    try:
        golden_sets = load_golden_sets(run.golden_sets, dirs)
    except GoldenSetError as exc:
        logger.error("evaluation of %s not started: %s", run.canary, exc)
        return summarise(run.stable, run.canary, [], 0, time.monotonic() - started, [str(exc)])
    return await ask(run, golden_sets)

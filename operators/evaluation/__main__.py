"""`python -m amalia_operator.evaluation check FILE... | run --base-url URL --stable A --canary B`

`check` validates golden-set files before they go into a ConfigMap (the operator would refuse them
at the evaluation step, and the rollout would be inconclusive). `run` asks a live ingress the way
the evaluation step does and prints both scores and the verdict, to choose a tolerance and a floor
on your own models before a rollout relies on them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from amalia_operator.constants import DEFAULT_MIN_SCORE, DEFAULT_TOLERANCE
from amalia_operator.evaluation.goldenset import (
    DEFAULT_DIRS,
    GoldenSetError,
    find_golden_sets,
    load_golden_set,
)
from amalia_operator.evaluation.judge import judge
from amalia_operator.evaluation.result import EvaluationResult, VariantScore
from amalia_operator.evaluation.runner import EvaluationRun, evaluate

# Exit codes of `run`, one per verdict.
EXIT_CODES = {"Passed": 0, "Failed": 1, "Inconclusive": 2}


def _check(paths: list[Path], out: TextIO) -> int:
    failed = 0
    for path in paths:
        try:
            golden = load_golden_set(path)
        except GoldenSetError as exc:
            failed += 1
            out.write(f"error: {exc}\n")
            continue
        out.write(f"ok: {path}: {golden.name}, {len(golden.items)} items\n")
    return 1 if failed else 0


def _score_line(score: VariantScore) -> str:
    categories = ", ".join(f"{c} {s:.2f}" for c, s in score.by_category.items())
    unanswered = f", {score.unanswered} unanswered" if score.unanswered else ""
    return (
        f"{score.variant}: {score.score:.3f} ({score.passed}/{score.total}{unanswered}) "
        f"[{categories}]"
    )


def _report(result: EvaluationResult, tolerance: float, floor: float, out: TextIO) -> int:
    verdict = judge(result, tolerance, floor)
    out.write(f"stable {_score_line(result.stable)}\ncanary {_score_line(result.canary)}\n")
    out.write(f"pass to fail: {', '.join(result.regressions) or 'none'}\n")
    out.write(f"duration: {result.duration_s:.1f}s\n{verdict.verdict}: {verdict.reason}\n")
    return EXIT_CODES[verdict.verdict]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m amalia_operator.evaluation")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate golden-set files")
    check.add_argument("files", nargs="+", type=Path)
    run = sub.add_parser("run", help="evaluate a canary against the stable through an ingress")
    run.add_argument("--base-url", required=True, help="the OpenAI ingress, e.g. http://svc:8000")
    run.add_argument("--stable", required=True)
    run.add_argument("--canary", required=True)
    run.add_argument(
        "--golden-set", action="append", dest="golden_sets", help="repeatable; default: all found"
    )
    run.add_argument(
        "--dir", action="append", type=Path, dest="dirs", help="more folders with golden sets"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--request-timeout-s", type=float, default=60.0)
    run.add_argument("--max-concurrency", type=int, default=4)
    run.add_argument("--budget-s", type=float, default=600.0)
    run.add_argument(
        "--max-requests", type=int, default=None, help="refuse sets that need more (2 per item)"
    )
    run.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    run.add_argument("--floor", type=float, default=DEFAULT_MIN_SCORE)
    run.add_argument("--json", action="store_true", help="print the whole result as JSON too")
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args.files, out)
    dirs = [*DEFAULT_DIRS, *(args.dirs or [])]
    try:
        names = args.golden_sets or sorted(find_golden_sets(dirs))
    except GoldenSetError as exc:
        out.write(f"error: {exc}\n")
        return EXIT_CODES["Inconclusive"]
    settings = EvaluationRun(
        base_url=args.base_url,
        stable=args.stable,
        canary=args.canary,
        golden_sets=names,
        seed=args.seed,
        request_timeout_s=args.request_timeout_s,
        max_concurrency=args.max_concurrency,
        budget_s=args.budget_s,
        max_requests=args.max_requests,
    )
    result = asyncio.run(evaluate(settings, dirs))
    if args.json:
        out.write(result.model_dump_json(by_alias=True, indent=2) + "\n")
    return _report(result, args.tolerance, args.floor, out)


if __name__ == "__main__":
    sys.exit(main())

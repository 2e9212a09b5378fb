"""`rollout status|promote|abort|retry NAME [-n NS]`: look at and steer a ModelRollout.

Actions are requests, not commands: the CLI sets the `serving.amalia.pt/action` annotation and the
operator carries it out on its next tick (and removes the annotation), exactly as `kubectl annotate`
would. Reached as `amalia-operator rollout ...` (operators/__main__.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from amalia_operator.constants import ACTION_ANNOTATION, GROUP, PLURAL, VERSION
from amalia_operator.kube import MERGE_PATCH, custom_objects_api
from amalia_operator.models import EvaluationScore, EvaluationSummary, RolloutStatus, Step
from amalia_operator.rollout import ACTIONS, describe_step

BAR_WIDTH = 20


def weight_bar(weight: int) -> str:
    filled = round(BAR_WIDTH * max(0, min(100, weight)) / 100)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {weight}%"


def format_status(obj: dict[str, Any]) -> str:
    """Human summary: phase, step, canary weight as a bar, the whole traffic split, shadow traffic,
    last analysis, the evaluation running and the last one finished, conditions."""
    spec = obj.get("spec") or {}
    status = RolloutStatus.model_validate(obj.get("status") or {})
    steps = spec.get("steps") or []
    meta = obj.get("metadata") or {}
    stable = (spec.get("stable") or {}).get("name", "?")
    lines = [
        f"Name:       {meta.get('namespace', '')}/{meta.get('name', '')}",
        f"Stable:     {stable}",
        f"Canary:     {(spec.get('canary') or {}).get('name', '?')}",
        f"Phase:      {status.phase}",
        f"Step:       {_step_line(status, steps)}",
        f"Weight:     {weight_bar(status.canary_weight)} of {stable}'s share",
    ]
    if status.weights:
        lines.append(f"Traffic:    {_split_text(status.weights)}")
    if status.shadow is not None:
        canary = status.canary_name or (spec.get("canary") or {}).get("name", "?")
        lines.append(
            f"Shadow:     {status.shadow.percent:g}% of the requests copied to {canary} "
            f"(at most {status.shadow.max_in_flight} in flight; answers never returned)"
        )
    lines.append(f"Message:    {status.message or '-'}")
    if status.observed_generation != meta.get("generation"):
        lines.append(
            f"(status describes generation {status.observed_generation}, "
            f"object is at {meta.get('generation')}: the operator has not caught up)"
        )
    last = status.last_analysis
    if last is not None:
        lines.append(f"Analysis:   {last.outcome} at {last.time}")
        lines.extend(f"  - {r.outcome:<12} {r.describe()}" for r in last.results)
    running = status.evaluation
    if running is not None and running.started_at is not None and status.stage == "Stepping":
        lines.append(
            f"Evaluating: step {running.step_index}, attempt {running.attempt} since "
            f"{running.started_at}: {running.answered}/{running.planned} requests answered"
        )
    if status.last_evaluation is not None:
        lines.extend(_evaluation_lines(status.last_evaluation))
    for cond in status.conditions:
        lines.append(
            f"Condition:  {cond.type}={cond.status} {cond.reason}"
            + (f": {cond.message}" if cond.message else "")
        )
    return "\n".join(lines)


def _evaluation_lines(last: EvaluationSummary) -> list[str]:
    head = (
        f"Evaluation: {last.verdict} at {last.time} (step {last.step_index}, attempt "
        f"{last.attempt}, {last.duration_seconds:.1f}s)"
    )
    lines = [head]
    golden = last.golden_set
    if golden is not None:
        lines.append(
            f"  - golden set {golden.name} ({golden.items} items, {golden.source}, "
            f"digest {golden.digest})"
        )
    for role, score in (("stable", last.stable), ("canary", last.canary)):
        if score is not None:
            lines.append(f"  - {role} {_score_text(score)}")
    if last.threshold is not None:
        lines.append(f"  - threshold {last.threshold:.3f}")
    if last.regression_count:
        more = last.regression_count - len(last.regressions)
        listed = ", ".join(last.regressions) + (f" and {more} more" if more else "")
        lines.append(f"  - pass to fail ({last.regression_count}): {listed}")
    lines.append(f"  - {last.reason}")
    return lines


def _score_text(score: EvaluationScore) -> str:
    unanswered = f", {score.unanswered} unanswered" if score.unanswered else ""
    return f"{score.variant} {score.score:.3f} ({score.passed}/{score.total}{unanswered})"


def _step_line(status: RolloutStatus, steps: list[dict[str, Any]]) -> str:
    """Where the rollout is; a rollout that stopped says so instead of showing a running step."""
    index = min(status.step_index, len(steps))
    here = f"{index}/{len(steps)}"
    text = f" ({describe_step(Step.model_validate(steps[index]))})" if index < len(steps) else ""
    if status.stage in ("RollingBack", "RolledBack", "Failed"):
        how = "aborted" if status.aborted_at else status.stage.lower()
        return f"stopped at {here}{text}: {how}"
    if status.stage in ("Promoting", "Promoted"):
        return f"{here} (all steps done)"  # a promotion in full also ends at len(steps)
    if status.stage == "Deploying":
        return f"{here} (waiting for the canary to be healthy)"
    return here + text


def _split_text(weights: dict[str, int]) -> str:
    total = sum(weights.values()) or 1
    return ", ".join(f"{name} {w} ({100 * w / total:.3g}%)" for name, w in weights.items())


def _default_namespace() -> str:
    try:
        _, context = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            os.getenv("KUBECONFIG")
        )
        return str(context["context"].get("namespace") or "default")
    except (config.ConfigException, KeyError, TypeError):
        return "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amalia-operator rollout", description="Inspect or steer a ModelRollout."
    )
    parser.add_argument("command", choices=["status", *ACTIONS])
    parser.add_argument("name", help="ModelRollout name")
    parser.add_argument("-n", "--namespace", default=None, help="Namespace (default: kubeconfig's)")
    return parser


def main(
    argv: list[str] | None = None,
    out: TextIO = sys.stdout,
    api: client.CustomObjectsApi | None = None,
) -> int:
    args = build_parser().parse_args(argv)
    api = api or custom_objects_api()
    namespace = args.namespace or _default_namespace()
    try:
        if args.command == "status":
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name)
            print(format_status(cast(dict[str, Any], obj)), file=out)
        else:
            body = {"metadata": {"annotations": {ACTION_ANNOTATION: args.command}}}
            api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, args.name, body, _content_type=MERGE_PATCH
            )
            print(
                f"modelrollout {namespace}/{args.name}: {args.command} requested "
                f"(the operator acts on its next tick)",
                file=out,
            )
    except ApiException as exc:
        print(f"error: {exc.status} {exc.reason}: {namespace}/{args.name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

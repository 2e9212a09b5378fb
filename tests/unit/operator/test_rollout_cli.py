"""`rollout status|promote|abort|retry`: the text a person reads and the request the CLI sends."""

from __future__ import annotations

import io
from typing import Any

import pytest

from amalia_operator import cli

OBJ: dict[str, Any] = {
    "metadata": {"name": "sft-to-dpo", "namespace": "amalia", "generation": 2},
    "spec": {
        "stable": {"name": "amalia-sft"},
        "canary": {"name": "amalia-dpo"},
        "steps": [{"setWeight": 25}, {"pause": {}}, {"analysis": {}}],
    },
    "status": {
        "observedGeneration": 2,
        "phase": "Paused",
        "stage": "Stepping",
        "stepIndex": 1,
        "canaryWeight": 25,
        "weights": {"amalia-sft": 68, "amalia-base": 10, "amalia-dpo": 22},
        "message": "paused at step 1: waiting for promote",
        "lastAnalysis": {
            "outcome": "Successful",
            "time": "2026-11-26T12:00:00Z",
            "results": [
                {"metric": "error-rate", "outcome": "Successful", "value": 0.002, "max": 0.01}
            ],
        },
        "conditions": [
            {
                "type": "Progressing",
                "status": "Unknown",
                "reason": "Paused",
                "lastTransitionTime": "2026-11-26T12:00:00Z",
            }
        ],
    },
}


class FakeApi:
    def __init__(self, obj: dict[str, Any] = OBJ) -> None:
        self.obj = obj
        self.patches: list[tuple[Any, ...]] = []

    def get_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
        assert args == ("serving.amalia.pt", "v1alpha1", "amalia", "modelrollouts", "sft-to-dpo")
        return self.obj

    def patch_namespaced_custom_object(self, *args: Any, _content_type: str) -> None:
        self.patches.append((*args, _content_type))


@pytest.mark.parametrize(
    ("weight", "bar"),
    [
        (0, "[....................] 0%"),
        (25, "[#####...............] 25%"),
        (100, "[####################] 100%"),
    ],
)
def test_weight_bar_fills_in_proportion_when_weight_given(weight: int, bar: str) -> None:
    assert cli.weight_bar(weight) == bar


def test_status_shows_phase_step_bar_and_last_analysis_when_paused() -> None:
    out = io.StringIO()
    assert cli.main(["status", "sft-to-dpo", "-n", "amalia"], out=out, api=FakeApi()) == 0  # type: ignore[arg-type]
    text = out.getvalue()
    assert "Phase:      Paused" in text
    assert "Step:       1/3 (pause until promoted)" in text
    assert "Weight:     [#####...............] 25% of amalia-sft's share" in text
    # The whole split, every variant: the one the rollout leaves alone too.
    assert "Traffic:    amalia-sft 68 (68%), amalia-base 10 (10%), amalia-dpo 22 (22%)" in text
    assert "error-rate=0.002 (threshold <= 0.01)" in text
    assert "Condition:  Progressing=Unknown Paused" in text


def test_status_shows_step_as_stopped_not_running_when_aborted() -> None:
    status = {
        **OBJ["status"],
        "stage": "RolledBack",
        "phase": "RolledBack",
        "stepIndex": 2,
        "abortedAt": "2026-11-26T12:05:00Z",
    }
    out = io.StringIO()
    api = FakeApi({**OBJ, "status": status})
    assert cli.main(["status", "sft-to-dpo", "-n", "amalia"], out=out, api=api) == 0  # type: ignore[arg-type]
    assert "Step:       stopped at 2/3 (analysis): aborted" in out.getvalue()


@pytest.mark.parametrize("action", ["promote", "abort", "retry"])
def test_action_sets_annotation_with_merge_patch_when_requested(action: str) -> None:
    api = FakeApi()
    out = io.StringIO()
    assert cli.main([action, "sft-to-dpo", "-n", "amalia"], out=out, api=api) == 0  # type: ignore[arg-type]
    assert api.patches == [
        (
            "serving.amalia.pt",
            "v1alpha1",
            "amalia",
            "modelrollouts",
            "sft-to-dpo",
            {"metadata": {"annotations": {"serving.amalia.pt/action": action}}},
            "application/merge-patch+json",
        )
    ]
    assert f"{action} requested" in out.getvalue()


def test_status_shows_shadow_and_evaluations_when_rollout_has_them() -> None:
    steps = [{"shadow": {"percent": 12.5}}, {"evaluation": {}}, {"pause": {}}]
    status = {
        **OBJ["status"],
        "stepIndex": 1,
        "stage": "Stepping",
        "shadow": {"percent": 12.5, "maxInFlight": 4},
        "evaluation": {
            "stepIndex": 1, "attempt": 2, "startedAt": "2026-11-26T12:05:00Z",
            "answered": 40, "planned": 198,
        },
        "lastEvaluation": {
            "stepIndex": 1, "attempt": 1, "verdict": "Inconclusive",
            "reason": "evaluation inconclusive: ingress unreachable: refused",
            "time": "2026-11-26T12:04:00Z", "durationSeconds": 0.4,
            "goldenSet": {"name": "pt-pt-core-v1", "source": "shipped", "items": 99,
                          "digest": "4be1c0d2a9f3"},
            "stable": {"variant": "amalia-sft", "score": 0.85, "passed": 85, "total": 99,
                       "unanswered": 0},
            "canary": {"variant": "amalia-dpo", "score": 0.7, "passed": 70, "total": 99,
                       "unanswered": 3},
            "threshold": 0.8,
            "regressions": ["pt-pt-core-v1/autocarro", "pt-pt-core-v1/comboio"],
            "regressionCount": 17,
        },
    }  # fmt: skip
    obj = {**OBJ, "spec": {**OBJ["spec"], "steps": steps}, "status": status}
    text = cli.format_status(obj)
    assert "Step:       1/3 (evaluation on pt-pt-core-v1)" in text
    assert (
        "Shadow:     12.5% of the requests copied to amalia-dpo (at most 4 in flight; "
        "answers never returned)"
    ) in text
    assert (
        "Evaluating: step 1, attempt 2 since 2026-11-26T12:05:00Z: 40/198 requests answered"
    ) in text
    assert "Evaluation: Inconclusive at 2026-11-26T12:04:00Z (step 1, attempt 1, 0.4s)" in text
    assert "  - golden set pt-pt-core-v1 (99 items, shipped, digest 4be1c0d2a9f3)" in text
    assert "  - stable amalia-sft 0.850 (85/99)" in text
    assert "  - canary amalia-dpo 0.700 (70/99, 3 unanswered)" in text
    assert "  - threshold 0.800" in text
    assert (
        "  - pass to fail (17): pt-pt-core-v1/autocarro, pt-pt-core-v1/comboio and 15 more"
    ) in text
    assert "  - evaluation inconclusive: ingress unreachable: refused" in text

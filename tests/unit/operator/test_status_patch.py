"""Status is written with merge patches; what a new status no longer has must be removed."""

from __future__ import annotations

from amalia_operator.patches import merge_patch


def test_merge_patch_nulls_keys_removed_at_any_depth_when_status_shrinks() -> None:
    old = {
        "phase": "Progressing",
        "weights": {"amalia-sft": 0, "amalia-dpo": 10, "amalia-new": 90},
        "analysis": {"stepIndex": 2, "outageSince": "2026-11-26T12:00:00Z", "failures": 0},
        "abortedAt": "2026-11-26T12:01:00Z",
    }
    new = {
        "phase": "Promoted",
        "weights": {"amalia-dpo": 10, "amalia-new": 90},
        "analysis": {"stepIndex": 2, "failures": 0},
    }
    assert merge_patch(old, new) == {
        "phase": "Promoted",
        "weights": {"amalia-sft": None},
        "analysis": {"outageSince": None},
        "abortedAt": None,
    }


def test_merge_patch_replaces_lists_and_adds_new_objects_whole_when_they_change() -> None:
    old = {"conditions": [{"type": "Ready", "status": "False"}]}
    new = {
        "conditions": [{"type": "Ready", "status": "True"}],
        "lastAnalysis": {"outcome": "Failed"},
    }
    assert merge_patch(old, new) == new
    assert merge_patch(new, new) == {}

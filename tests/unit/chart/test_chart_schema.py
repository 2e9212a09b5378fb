"""values.schema.json refuses bad values with a message that names the offending key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from chart_helpers import CI_VALUES, run_helm, template_args

BAD_VALUES = sorted((CI_VALUES / "bad").glob("*.yaml"))


def expected_message(path: Path, helm: str) -> str:
    match = re.search(rf"^# {helm}: (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"{path.name} lacks a '# {helm}: <message>' line"
    return match.group(1)


def test_bad_values_set_covers_the_required_refusals() -> None:
    names = {p.stem for p in BAD_VALUES}
    assert {
        "unknown-key",
        "negative-weight",
        "variant-without-model-path",
        "fractional-gpus",
        # One Serve application per variant: variant names are application names too.
        "variant-named-like-front-app",
        "duplicate-variant-names",
        "all-weights-zero",
        # GPU worker pods must be able to follow every variant to max_replicas.
        "worker-groups-below-max-replicas",
        "idle-timeout-without-autoscaler-v2",
        "unknown-autoscaling-key",
    } <= names


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda p: p.stem)
def test_chart_refuses_values_with_clear_message_when_values_are_bad(helm: str, bad: Path) -> None:
    result = run_helm(helm, *template_args(bad))
    assert result.returncode != 0, f"{bad.name} was accepted"
    assert expected_message(bad, helm) in result.stderr, result.stderr


def test_chart_refuses_replicas_with_autoscaling_when_both_set(helm: str) -> None:
    sets = (
        "variants[0].name=amalia-sft",
        "variants[0].modelPath=/m",
        "variants[0].gpus=1",
        "variants[0].replicas=2",
        "variants[0].autoscaling.max_replicas=3",
    )
    result = run_helm(helm, *template_args(None, sets))
    assert result.returncode != 0
    assert "variants" in result.stderr and "0" in result.stderr, result.stderr

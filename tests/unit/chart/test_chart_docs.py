"""Every value is documented: a `# --` comment in values.yaml and a row in the README table."""

from __future__ import annotations

import re
from typing import Any

import yaml
from chart_helpers import CHART

# Dict values documented as a whole (their keys are Kubernetes or user data, not chart settings).
OPAQUE = {
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "rayStartParams",
    "weights",
    "labels",
    "annotations",
    "resourceAttributes",
    "podSecurityContext",
    "securityContext",
    "upgradeStrategy",
}


def documented_keys(text: str) -> set[str]:
    """Dotted keys whose line (or the block right above it) carries a `# --` comment."""
    keys, stack, pending = set(), [], False
    for line in text.splitlines():
        if line.lstrip().startswith("# --"):
            pending = True
            continue
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        if pending:
            keys.add(".".join(stack))
        pending = False
    return keys


def leaf_keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in OPAQUE:
            out |= leaf_keys(value, path + ".")
        else:
            out.add(path)
    return out


def test_every_value_has_a_helm_docs_comment_when_defined() -> None:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    missing = leaf_keys(yaml.safe_load(text)) - documented_keys(text)
    assert not missing, f"values without a '# --' comment: {sorted(missing)}"


def test_readme_values_table_lists_every_value_when_documented() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values = leaf_keys(yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")))
    missing = {key for key in values if f"| `{key}` |" not in readme}
    assert not missing, f"README.md values table lacks {sorted(missing)}"

"""The chart grants the operator exactly amalia_operator.rbac.RULES: nothing more, nothing less."""

from __future__ import annotations

from typing import Any

import pytest
from chart_helpers import by_kind, render

from amalia_operator.rbac import RULES

Grant = tuple[str, str, str]


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


@pytest.mark.parametrize("namespaced", [True, False])
def test_operator_rules_equal_operator_constant_when_rendered(helm: str, namespaced: bool) -> None:
    objects = render(helm, sets=(f"operator.namespaced={str(namespaced).lower()}",))
    roles = by_kind(objects, "Role")
    cluster_roles = by_kind(objects, "ClusterRole")
    assert len(roles) == (1 if namespaced else 0) and len(cluster_roles) == 1
    granted = [grants(r["rules"]) for r in roles + cluster_roles]
    assert set().union(*granted) == grants(RULES)
    assert sum(len(g) for g in granted) == len(grants(RULES))  # no grant given twice
    if namespaced:
        (role,) = roles
        assert all(
            r not in {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
            for _, r, _ in grants(role["rules"])
        )


def test_operator_bindings_name_its_service_account_when_rendered() -> None:
    objects = render("helm3")
    (account,) = by_kind(objects, "ServiceAccount")
    deployment = by_kind(objects, "Deployment")[0]
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )
    for binding in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "amalia"}
        ]

"""The chart fails early on a cluster without KubeRay, but `helm template` still works offline."""

from __future__ import annotations

from chart_helpers import render, run_helm, template_args

KUBERAY_MESSAGE = "install the KubeRay operator >= 1.3 first"
# What a real API server advertises and helm template's built-in list lacks.
CLUSTER = ("--api-versions", "apiregistration.k8s.io/v1")
RAY = ("--api-versions", "ray.io/v1/RayService")


def test_chart_refuses_install_when_cluster_lacks_rayservice_api(helm: str) -> None:
    result = run_helm(helm, *template_args(None, extra=CLUSTER))
    assert result.returncode != 0
    assert KUBERAY_MESSAGE in result.stderr, result.stderr


def test_chart_installs_when_cluster_serves_rayservice_api(helm: str) -> None:
    assert render(helm, extra=CLUSTER + RAY)


def test_chart_templates_offline_when_no_cluster_is_reachable(helm: str) -> None:
    assert render(helm)


def test_chart_checks_offline_too_when_capability_check_is_always(helm: str) -> None:
    result = run_helm(helm, *template_args(None, ("kuberay.capabilityCheck=always",)))
    assert result.returncode != 0 and KUBERAY_MESSAGE in result.stderr
    assert render(helm, sets=("kuberay.capabilityCheck=always",), extra=RAY)


def test_chart_skips_check_when_capability_check_is_never(helm: str) -> None:
    assert render(helm, sets=("kuberay.capabilityCheck=never",), extra=CLUSTER)

"""GPU worker pods follow the variants' replicas: worker group sizes derived from the variants,
autoscaler v2, idle timeouts, MIG slices counted as GPUs by the Ray autoscaler's own reading of the
RayCluster, and variant autoscaling that Ray Serve builds into the engine-load policy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chart_helpers import VALUES_FILES, one, render, serve_config
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.serve.config import AutoscalingConfig

from amalia_serve.autoscaling import ENGINE_LOAD_POLICY
from amalia_serve.config import VariantConfig


def cluster(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "RayService")["spec"]["rayClusterConfig"]
    return spec


def groups(objects: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """groupName -> (replicas, minReplicas, maxReplicas)."""
    return {
        g["groupName"]: (g["replicas"], g["minReplicas"], g["maxReplicas"])
        for g in cluster(objects)["workerGroupSpecs"]
    }


def node_types(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """What the Ray autoscaler (KubeRay node provider) makes of the RayCluster KubeRay creates."""
    ray_cluster = {"metadata": {"name": "amalia", "namespace": "amalia"}, "spec": cluster(objects)}
    config: dict[str, Any] = _derive_autoscaling_config_from_ray_cr(ray_cluster)
    return config


def variant(name: str, gpus: int, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    scaling = {"min_replicas": min_replicas, "max_replicas": max_replicas}
    return {"name": name, "modelPath": f"/models/{name}", "gpus": gpus, "autoscaling": scaling}


def sized(variants: list[dict[str, Any]], worker_groups: list[dict[str, Any]]) -> tuple[str, ...]:
    """helm arguments that replace the values file's variants and worker groups."""
    return (
        "--set-json",
        f"variants={json.dumps(variants)}",
        "--set-json",
        f"workerGroups={json.dumps(worker_groups)}",
    )


GPU_GROUP = {"name": "gpu", "gpusPerWorker": 1, "gpuResourceName": "nvidia.com/gpu"}


# === sizes derived from the variants ===


def test_worker_group_holds_every_variant_at_its_bounds_when_sizes_left_out() -> None:
    variants = [variant("amalia-sft", 2, 1, 3), variant("amalia-dpo", 1, 0, 2)]
    objects = render("helm3", extra=sized(variants, [GPU_GROUP]))
    # min: 1 x 2 GPUs + 0 x 1; max: 3 x 2 + 2 x 1 = 8 GPUs, one per pod.
    assert groups(objects) == {"gpu": (2, 2, 8)}


def test_worker_group_rounds_pods_up_when_workers_have_several_gpus() -> None:
    four_gpus = {**GPU_GROUP, "gpusPerWorker": 4}
    objects = render("helm3", extra=sized([variant("amalia-sft", 1, 1, 5)], [four_gpus]))
    assert groups(objects) == {"gpu": (1, 1, 2)}


def test_worker_groups_keep_no_warm_pods_when_several_derive_their_minimum() -> None:
    mig = {"name": "mig", "gpusPerWorker": 1, "gpuResourceName": "nvidia.com/mig-3g.40gb"}
    objects = render("helm3", extra=sized([variant("amalia-sft", 1, 1, 3)], [GPU_GROUP, mig]))
    assert groups(objects) == {"gpu": (0, 0, 3), "mig": (0, 0, 3)}


def test_worker_group_keeps_explicit_sizes_when_given() -> None:
    objects = render("helm3", VALUES_FILES["production-gpu"])
    assert groups(objects) == {"h100": (2, 2, 6), "a100-mig": (0, 0, 4)}


# === what the Ray autoscaler reads ===


def test_ray_autoscaler_counts_mig_slices_as_gpus_when_rendered() -> None:
    types = node_types(render("helm3", VALUES_FILES["production-gpu"]))["available_node_types"]
    assert types["a100-mig"]["resources"]["GPU"] == 1
    assert types["h100"]["resources"]["GPU"] == 1
    assert types["headgroup"]["resources"]["GPU"] == 0
    assert (types["a100-mig"]["min_workers"], types["a100-mig"]["max_workers"]) == (0, 4)


def test_ray_autoscaler_reads_idle_timeouts_when_rendered() -> None:
    config = node_types(render("helm3", VALUES_FILES["production-gpu"]))
    assert config["idle_timeout_minutes"] == 10.0
    assert config["available_node_types"]["a100-mig"]["idle_timeout_s"] == 300.0
    assert "idle_timeout_s" not in config["available_node_types"]["h100"]


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_autoscaler_v2_is_on_when_in_tree_autoscaling(values: str) -> None:
    spec = cluster(render("helm3", VALUES_FILES[values]))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    # KubeRay refuses autoscaler v2 with any other restart policy, and with the env var set by hand.
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod.get("restartPolicy", "Never") == "Never"
        env = [e["name"] for c in pod["containers"] for e in c.get("env", [])]
        assert "RAY_enable_autoscaler_v2" not in env


# === variant autoscaling as Serve builds it ===


@pytest.mark.parametrize("values", ["default", "production-gpu", "manifests"])
def test_variant_autoscaling_builds_the_engine_load_policy_in_serve(values: str) -> None:
    config = serve_config(render("helm3", VALUES_FILES[values]))
    for app in config["applications"][1:]:
        options = VariantConfig.model_validate(app["args"]).deployment.serve_options()
        serve = AutoscalingConfig(**options["autoscaling_config"])
        assert serve.policy.policy_function == ENGINE_LOAD_POLICY
        assert serve.max_replicas >= serve.min_replicas

"""The rendered serveConfigV2 is a Ray Serve config in the production layout that Ray and
amalia_serve both accept: a front application without variants plus one application per variant."""

from __future__ import annotations

from typing import Any

import pytest
from chart_helpers import VALUES_FILES, render, serve_config
from ray.serve.schema import ServeDeploySchema

from amalia_serve.config import AmaliaServingArgs, RoutingConfig, VariantConfig
from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME

FRONT_IMPORT = "amalia_serve.app:build_app"
VARIANT_IMPORT = "amalia_serve.app:build_variant_app"


def split_apps(config: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    front, *variants = config["applications"]
    return front, variants


def variant_configs(config: dict[str, Any]) -> list[VariantConfig]:
    return [VariantConfig.model_validate(app["args"]) for app in split_apps(config)[1]]


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_serve_config_validates_with_ray_and_amalia_when_rendered(values: str) -> None:
    config = serve_config(render("helm3", VALUES_FILES[values]))
    ServeDeploySchema.model_validate(config)
    front, variants = split_apps(config)
    assert (front["name"], front["import_path"], front["route_prefix"]) == (
        "amalia",
        FRONT_IMPORT,
        "/",
    )
    assert AmaliaServingArgs.model_validate(front["args"]).variants == []
    assert "variants" not in front["args"]  # a variant in the front app would restart with it
    (live,) = front["deployments"]
    assert live["name"] == INGRESS_DEPLOYMENT_NAME
    weights = RoutingConfig.model_validate(live["user_config"]).weights
    assert variants
    for app in variants:
        variant = VariantConfig.model_validate(app["args"])
        # The ingress reaches a variant as deployment <name> of application <name>.
        assert app["name"] == variant.name
        assert (app["import_path"], app["route_prefix"]) == (VARIANT_IMPORT, None)
    # Every variant is addressable (the ingress knows variants by the names in its weights).
    assert list(weights) == sorted(app["name"] for app in variants)


def test_serve_config_carries_weights_and_gpus_when_two_variants() -> None:
    config = serve_config(render("helm3", VALUES_FILES["production-gpu"]))
    front, _ = split_apps(config)
    assert front["deployments"][0]["user_config"] == {
        "weights": {"amalia-sft": 90, "amalia-dpo": 10}
    }
    variants = variant_configs(config)
    assert [v.name for v in variants] == ["amalia-sft", "amalia-dpo"]
    for variant in variants:
        assert variant.deployment.ray_actor_options["num_gpus"] == 1
        assert variant.deployment.autoscaling_config is not None
        assert variant.engine.max_model_len == 8192


def test_serve_config_logs_json_so_log_lines_carry_trace_ids() -> None:
    config = serve_config(render("helm3", VALUES_FILES["production-gpu"]))
    schema = ServeDeploySchema.model_validate(config)
    assert schema.logging_config is not None and schema.logging_config.encoding == "JSON"


def test_serve_config_uses_fixed_replicas_when_no_autoscaling() -> None:
    (variant,) = variant_configs(serve_config(render("helm3", VALUES_FILES["minimal"])))
    assert variant.deployment.num_replicas == 1 and variant.deployment.autoscaling_config is None


def variant_sets(*names: str) -> tuple[str, ...]:
    """`--set`s for variants with fixed replicas (a `--set` list replaces the values file's)."""
    return tuple(
        f"variants[{i}].{key}={value}"
        for i, name in enumerate(names)
        for key, value in (
            ("name", name),
            ("modelPath", f"/m/{name}"),
            ("gpus", 1),
            ("replicas", 1),
        )
    )


def test_serve_config_sends_all_traffic_to_first_variant_when_weights_empty() -> None:
    front, _ = split_apps(
        serve_config(render("helm3", sets=variant_sets("amalia-sft", "amalia-dpo")))
    )
    assert front["deployments"][0]["user_config"]["weights"] == {"amalia-sft": 100, "amalia-dpo": 0}


def test_variant_apps_keep_their_args_when_another_variant_is_added() -> None:
    """Serve's code version hashes an application's args: equal args mean no restart."""
    one = serve_config(render("helm3", sets=variant_sets("amalia-sft")))
    two = serve_config(render("helm3", sets=variant_sets("amalia-sft", "amalia-dpo")))
    (sft_before,) = split_apps(one)[1]
    sft_after, dpo = split_apps(two)[1]
    assert sft_after == sft_before and dpo["name"] == "amalia-dpo"
    assert split_apps(one)[0]["args"] == split_apps(two)[0]["args"]

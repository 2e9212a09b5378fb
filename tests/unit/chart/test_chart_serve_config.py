"""The rendered serveConfigV2 is a Ray Serve config that Ray and amalia_serve both accept."""

from __future__ import annotations

import pytest
from chart_helpers import VALUES_FILES, render, serve_config
from ray.serve.schema import ServeDeploySchema

from amalia_serve.config import AmaliaServingArgs, RoutingConfig
from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_serve_config_validates_with_ray_and_amalia_when_rendered(values: str) -> None:
    config = serve_config(render("helm3", VALUES_FILES[values]))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "amalia_serve.app:build_app"
    args = AmaliaServingArgs.model_validate(app["args"])
    (live,) = app["deployments"]
    assert live["name"] == INGRESS_DEPLOYMENT_NAME
    weights = RoutingConfig.model_validate(live["user_config"]).weights
    assert set(weights) <= set(args.variant_names)


def test_serve_config_carries_weights_and_gpus_when_two_variants() -> None:
    config = serve_config(render("helm3", VALUES_FILES["production-gpu"]))
    (app,) = config["applications"]
    assert app["deployments"][0]["user_config"] == {"weights": {"amalia-sft": 90, "amalia-dpo": 10}}
    args = AmaliaServingArgs.model_validate(app["args"])
    assert args.variant_names == ["amalia-sft", "amalia-dpo"]
    for variant in args.variants:
        assert variant.deployment.ray_actor_options["num_gpus"] == 1
        assert variant.deployment.autoscaling_config is not None
        assert variant.engine.max_model_len == 8192


def test_serve_config_uses_fixed_replicas_when_no_autoscaling() -> None:
    (app,) = serve_config(render("helm3", VALUES_FILES["minimal"]))["applications"]
    (variant,) = AmaliaServingArgs.model_validate(app["args"]).variants
    assert variant.deployment.num_replicas == 1 and variant.deployment.autoscaling_config is None

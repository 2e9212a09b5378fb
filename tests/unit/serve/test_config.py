"""Serving args are validated once, at the edge, with messages that name the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from amalia_serve.config import AmaliaServingArgs, RoutingConfig


def args(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "variants": [{"name": "amalia-sft", "model_path": "/m/sft"}, {"name": "amalia-dpo", "model_path": "/m/dpo"}],
        "routing": {"weights": {"amalia-sft": 90, "amalia-dpo": 10}},
    }
    base.update(overrides)
    return base


def test_serving_args_accept_two_variants_with_weights() -> None:
    parsed = AmaliaServingArgs.model_validate(args())
    assert parsed.variant_names == ["amalia-sft", "amalia-dpo"]
    assert parsed.variants[0].engine.dtype == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variants": [{"name": "a", "model_path": "/x"}, {"name": "a", "model_path": "/y"}], "routing": {}},
         "duplicate variant names"),
        ({"routing": {"weights": {"amalia-sft": -1, "amalia-dpo": 10}}}, "must be >= 0"),
        ({"routing": {"weights": {"amalia-sft": 0, "amalia-dpo": 0}}}, "at least one weight"),
        ({"routing": {"weights": {"amalia-xx": 10}}}, "unknown variants"),
        ({"variants": [{"name": "amalia-sft"}]}, "model_path"),
        ({"variants": [{"name": "Bad_Name", "model_path": "/x"}], "routing": {}}, "pattern"),
        ({"model_alias": "amalia-sft"}, "must differ"),
        ({"varients": []}, "Extra inputs are not permitted"),
        ({"variants": [{"name": "a", "model_path": "/x", "deployment": {"num_replicas": 1,
                        "autoscaling_config": {"max_replicas": 2}}}], "routing": {}}, "not both"),
        ({"variants": [{"name": "a", "model_path": "/x",
                        "deployment": {"ray_actor_options": {"num_gpus": -1}}}], "routing": {}}, "num_gpus"),
        ({"routing": {"weights": {"amalia-sft": 100}, "shadow": {"variant": "amalia-dpo", "percent": 5}}},
         r"routing.shadow.variant 'amalia-dpo' is not a variant; variants are \['amalia-sft'\]"),
    ],
)
def test_serving_args_refused_with_clear_message_when_invalid(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AmaliaServingArgs.model_validate(args(**overrides))


# ---- bounded queues -----------------------------------------------------------------------------------------


def test_every_deployment_queue_is_bounded_by_its_ongoing_requests_when_not_set() -> None:
    parsed = AmaliaServingArgs.model_validate(args())
    assert parsed.ingress.deployment.serve_options()["max_queued_requests"] == 256
    variant = parsed.variants[0].deployment
    assert variant.serve_options()["max_queued_requests"] == variant.max_ongoing_requests == 64


@pytest.mark.parametrize(("queued", "bound"), [(10, 10), (-1, -1)])
def test_deployment_queue_bound_is_what_the_config_says_when_set(queued: int, bound: int) -> None:
    variant = {"name": "a", "model_path": "/x", "deployment": {"max_queued_requests": queued}}
    parsed = AmaliaServingArgs.model_validate(args(variants=[variant], routing={}))
    assert parsed.variants[0].deployment.serve_options()["max_queued_requests"] == bound


# ---- shadow traffic -----------------------------------------------------------------------------------------


def test_routing_config_takes_a_shadow_block_with_its_default_in_flight_bound_when_given() -> None:
    routing = RoutingConfig.model_validate(
        {"weights": {"amalia-sft": 100, "amalia-dpo": 0}, "shadow": {"variant": "amalia-dpo", "percent": 5}}
    )
    assert routing.shadow is not None
    assert (routing.shadow.variant, routing.shadow.percent, routing.shadow.max_in_flight) == ("amalia-dpo", 5.0, 4)
    assert RoutingConfig.model_validate({"weights": {}, "shadow": None}).shadow is None


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ({"variant": "amalia-dpo", "percent": 100.5}, "less than or equal to 100"),
        ({"variant": "amalia-dpo", "percent": -1}, "greater than or equal to 0"),
        ({"variant": "amalia-dpo", "percent": True}, "valid number"),
        ({"variant": "amalia-dpo", "percent": "5"}, "valid number"),
        ({"variant": "amalia-dpo"}, "percent\n  Field required"),
        ({"variant": "amalia-dpo", "percent": 5, "max_in_flight": 0}, "greater than or equal to 1"),
        ({"variant": "amalia-dpo", "percent": 5, "max_in_flight": 2.0}, "valid integer"),
        ({"variant": "Amalia DPO", "percent": 5}, "pattern"),
        ({"variant": "amalia-dpo", "percent": 5, "precent": 5}, "Extra inputs are not permitted"),
    ],
)
def test_shadow_block_is_refused_naming_the_field_when_invalid(shadow: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RoutingConfig.model_validate({"weights": {"amalia-sft": 100}, "shadow": shadow})

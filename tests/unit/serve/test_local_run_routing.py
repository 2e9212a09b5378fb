"""Live routing edits of a local Serve config: a change of one key keeps the others."""

from __future__ import annotations

from typing import Any

from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME
from amalia_serve.local_run import with_ingress_routing

SHADOW = {"variant": "amalia-dpo", "percent": 5.0, "max_in_flight": 4}


def app(user_config: dict[str, Any] | None) -> dict[str, Any]:
    ingress: dict[str, Any] = {"name": INGRESS_DEPLOYMENT_NAME}
    if user_config is not None:
        ingress["user_config"] = user_config
    return {"name": "amalia", "deployments": [{"name": "other"}, ingress]}


def ingress_user_config(config: dict[str, Any]) -> dict[str, Any]:
    (ingress,) = [d for d in config["deployments"] if d["name"] == INGRESS_DEPLOYMENT_NAME]
    return dict(ingress["user_config"])


def test_new_weights_keep_the_shadow_block_when_the_ingress_has_one() -> None:
    before = app({"weights": {"amalia-sft": 100}, "shadow": SHADOW})
    after = with_ingress_routing(before, weights={"amalia-sft": 90, "amalia-dpo": 10})
    assert ingress_user_config(after) == {"weights": {"amalia-sft": 90, "amalia-dpo": 10}, "shadow": SHADOW}
    assert ingress_user_config(before)["weights"] == {"amalia-sft": 100}  # the input is left alone


def test_shadow_is_set_and_cleared_without_touching_weights_when_changed_alone() -> None:
    on = with_ingress_routing(app({"weights": {"amalia-sft": 100}}), shadow=SHADOW)
    assert ingress_user_config(on) == {"weights": {"amalia-sft": 100}, "shadow": SHADOW}
    off = with_ingress_routing(on, shadow=None)
    assert ingress_user_config(off) == {"weights": {"amalia-sft": 100}, "shadow": None}


def test_ingress_entry_is_created_when_the_app_has_none() -> None:
    config = with_ingress_routing({"name": "amalia"}, weights={"amalia-sft": 1})
    assert config["deployments"] == [
        {"name": INGRESS_DEPLOYMENT_NAME, "user_config": {"weights": {"amalia-sft": 1}}}
    ]

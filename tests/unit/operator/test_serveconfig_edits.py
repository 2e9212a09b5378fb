"""serveConfigV2 edits in the production layout: the right nodes change, every other byte stays."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from amalia_operator import kube, serveconfig
from amalia_operator.constants import INGRESS_DEPLOYMENT_NAME, VARIANT_IMPORT_PATH
from amalia_operator.models import CanaryVariant, ShadowStatus
from amalia_operator.rollout import ServeEdit

HEADER = """\
# Rendered by helm; hand edits below are kept.
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: 8000
applications:
"""
OTHER_APP = """\
- name: embeddings
  import_path: "emb.app:build"   # quoted on purpose
  route_prefix: /emb
  args: {model: /models/e5, dims: [384, 768], note: 'single quotes'}
"""
FRONT_APP = """\
- name: amalia
  route_prefix: /
  import_path: amalia_serve.app:build_app
  args:
    model_alias: amalia
    routing:
      weights:
        amalia-sft: 100
  deployments:
  - name: AmaliaIngress
    num_replicas: 2   # two ingress replicas
    user_config:
      weights: {amalia-sft: 100}
"""
SFT_APP = """\
- name: amalia-sft
  route_prefix: null
  import_path: amalia_serve.app:build_variant_app
  runtime_env:
    env_vars: {HF_HUB_OFFLINE: "1"}
  args:
    name: amalia-sft
    model_path: /models/AMALIA-9B-SFT
    engine:
      dtype: bfloat16
      max_num_seqs: 32
    deployment:
      autoscaling_config: {min_replicas: 1, max_replicas: 4}
      ray_actor_options: {num_gpus: 1, num_cpus: 4}
"""
CONFIG = HEADER + OTHER_APP + FRONT_APP + SFT_APP
STABLE = "amalia-sft"
CANARY = CanaryVariant.model_validate(
    {
        "name": "amalia-dpo",
        "modelPath": "/models/AMALIA-9B-DPO",
        "engine": {"max_num_seqs": 16},
        "deployment": {"autoscaling_config": {"max_replicas": 2}},
    }
)


def edit(text: str, percent: int, add: bool = False, remove: tuple[str, ...] = ()) -> str:
    change = ServeEdit(STABLE, CANARY.name, percent, add, remove)
    return serveconfig.apply_edit(text, "amalia", change, CANARY)


def apps(text: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in yaml.safe_load(text)["applications"]}


def test_duplicated_serve_names_match_serve_package_when_compared() -> None:
    from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME as SERVE_NAME

    assert INGRESS_DEPLOYMENT_NAME == SERVE_NAME
    module, _, function = VARIANT_IMPORT_PATH.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_observe_lists_variant_applications_and_front_weights_when_production_layout() -> None:
    view = serveconfig.observe(CONFIG, "amalia")
    assert view.variants == (STABLE,)  # neither the front app nor `embeddings`
    assert view.weights == {STABLE: 100}


def test_add_canary_appends_application_from_stable_args_with_overrides_when_deploying() -> None:
    out = edit(CONFIG, 0, add=True)
    assert list(apps(out)) == ["embeddings", "amalia", STABLE, "amalia-dpo"]
    assert apps(out)["amalia-dpo"] == {
        "name": "amalia-dpo",
        "route_prefix": None,
        "import_path": VARIANT_IMPORT_PATH,
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}},
        "args": {
            "name": "amalia-dpo",
            "model_path": "/models/AMALIA-9B-DPO",
            "engine": {"dtype": "bfloat16", "max_num_seqs": 16},
            "deployment": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
                "ray_actor_options": {"num_gpus": 1, "num_cpus": 4},
            },
        },
    }
    # The canary's application and its weight 0 arrive in the same config.
    assert serveconfig.observe(out, "amalia") == serveconfig.AppView(
        (STABLE, "amalia-dpo"), {STABLE: 100, "amalia-dpo": 0}
    )


def test_canary_application_validates_as_serve_variant_when_added() -> None:
    from ray.serve.schema import ServeDeploySchema

    from amalia_serve.config import VariantConfig

    out = edit(CONFIG, 0, add=True)
    ServeDeploySchema.model_validate(yaml.safe_load(out))
    VariantConfig.model_validate(apps(out)["amalia-dpo"]["args"])


def test_edits_keep_untouched_bytes_when_canary_added_and_weights_moved() -> None:
    added = edit(CONFIG, 0, add=True)
    out = edit(added, 25)
    # The stable's application is byte-for-byte the same: Serve sees equal args, nothing restarts.
    assert out.startswith(
        HEADER
        + OTHER_APP
        + FRONT_APP.replace("{amalia-sft: 100}", "{amalia-sft: 75, amalia-dpo: 25}")
        + SFT_APP
    )
    assert "    num_replicas: 2   # two ingress replicas\n" in out
    assert "    routing:\n      weights:\n        amalia-sft: 100\n" in out  # front args untouched


def test_edits_restore_original_bytes_when_canary_added_then_removed() -> None:
    with_canary = edit(CONFIG, 0, add=True)
    assert with_canary != CONFIG
    unweighted = edit(with_canary, 0, remove=("amalia-dpo",))
    # Weight first: the ingress stops naming the canary while its application still exists.
    assert "amalia-dpo" in apps(unweighted)
    assert serveconfig.observe(unweighted, "amalia").weights == {STABLE: 100}
    assert edit(unweighted, 0, remove=("amalia-dpo",)) == CONFIG


def test_remove_variant_drops_weight_then_application_when_promoted() -> None:
    with_canary = edit(CONFIG, 100, add=True)
    unweighted = edit(with_canary, 100, remove=(STABLE,))
    assert STABLE in apps(unweighted)
    # args.routing.weights (the ingress's start-up weights) no longer name the removed variant.
    assert apps(unweighted)["amalia"]["args"]["routing"] == {"weights": {"amalia-dpo": 100}}
    out = edit(unweighted, 100, remove=(STABLE,))
    assert list(apps(out)) == ["embeddings", "amalia", "amalia-dpo"]
    assert serveconfig.observe(out, "amalia") == serveconfig.AppView(
        ("amalia-dpo",), {"amalia-dpo": 100}
    )
    assert out.startswith(HEADER + OTHER_APP)


def test_remove_leaves_other_applications_when_name_is_not_a_variant() -> None:
    assert serveconfig.remove_variant_app(CONFIG, "embeddings") == CONFIG
    assert serveconfig.remove_variant_app(CONFIG, "amalia") == CONFIG


def test_apply_edit_returns_same_text_when_nothing_to_change() -> None:
    once = edit(CONFIG, 0, add=True)
    assert edit(once, 0, add=True) is once


def test_edits_keep_other_variants_weights_when_rollout_moves_its_share() -> None:
    three = CONFIG.replace(
        "weights: {amalia-sft: 100}", "weights: {amalia-sft: 90, amalia-base: 10}"
    )
    out = edit(three, 50, add=True)
    assert serveconfig.observe(out, "amalia").weights == {
        STABLE: 45,
        "amalia-base": 10,
        "amalia-dpo": 45,
    }


@pytest.mark.parametrize(
    ("ingress_part", "expected_tail"),
    [
        (
            "",
            (
                "  deployments:\n  - name: AmaliaIngress\n    user_config:\n      weights:\n"
                "        amalia-sft: 90\n        amalia-dpo: 10\n"
            ),
        ),
        (
            "  deployments:\n  - name: other-dep\n    num_replicas: 1\n",
            "  - name: other-dep\n    num_replicas: 1\n  - name: AmaliaIngress\n    user_config:\n",
        ),
        (
            "  deployments:\n  - name: AmaliaIngress\n    num_replicas: 3\n",
            "    num_replicas: 3\n    user_config:\n      weights:\n        amalia-sft: 90\n",
        ),
    ],
)
def test_set_weights_creates_missing_keys_when_ingress_config_absent(
    ingress_part: str, expected_tail: str
) -> None:
    base = FRONT_APP[: FRONT_APP.index("  deployments:")]
    text = HEADER + base + ingress_part + OTHER_APP
    out = serveconfig.set_weights(text, "amalia", {STABLE: 90, "amalia-dpo": 10})
    assert expected_tail in out
    assert out.startswith(HEADER + base + ingress_part.rstrip("\n"))
    assert out.endswith(OTHER_APP)
    assert serveconfig.observe(out, "amalia").weights == {STABLE: 90, "amalia-dpo": 10}
    assert [a["name"] for a in yaml.safe_load(out)["applications"]] == ["amalia", "embeddings"]


def test_edits_raise_when_layout_is_not_production() -> None:
    with pytest.raises(serveconfig.ServeConfigError, match="no application named 'nope'"):
        serveconfig.observe(CONFIG, "nope")
    with pytest.raises(serveconfig.ServeConfigError, match="stable variant 'ghost'"):
        serveconfig.canary_app(CONFIG, CANARY, "ghost")
    single_app = CONFIG.replace(
        "    model_alias: amalia\n",
        "    model_alias: amalia\n    variants:\n    - {name: amalia-sft, model_path: /m}\n",
    )
    with pytest.raises(serveconfig.ServeConfigError, match="one application per variant"):
        serveconfig.observe(single_app, "amalia")


def rayservice(statuses: dict[str, Any]) -> dict[str, Any]:
    canary = edit(CONFIG, 0, add=True)
    return {
        "spec": {"serveConfigV2": canary},
        "status": {"activeServiceStatus": {"applicationStatuses": statuses}},
    }


def app_status(app: str, deployment: str, name: str = "amalia-dpo") -> dict[str, Any]:
    return {name: {"status": app, "serveDeploymentStatuses": {name: {"status": deployment}}}}


@pytest.mark.parametrize(
    ("statuses", "health"),
    [
        (app_status("RUNNING", "HEALTHY"), "HEALTHY"),
        (app_status("DEPLOYING", "HEALTHY"), "DEPLOYING"),
        (app_status("DEPLOYING", "UPDATING"), "UPDATING"),
        (app_status("DEPLOY_FAILED", "UNHEALTHY"), "DEPLOY_FAILED"),
        (app_status("DEPLOYING", "DEPLOY_FAILED"), "DEPLOY_FAILED"),
        # The canary deployment inside another application does not count.
        ({"amalia": app_status("RUNNING", "HEALTHY")["amalia-dpo"]}, None),
        ({}, None),
    ],
)
def test_observe_reads_canary_health_from_its_own_application_when_kuberay_reports(
    statuses: dict[str, Any], health: str | None
) -> None:
    observed = kube.observe(rayservice(statuses), "amalia")
    assert observed is not None and observed.variants == (STABLE, "amalia-dpo")
    assert observed.deployment_status.get("amalia-dpo") == health


# === shadow traffic (the ingress's user_config.shadow) ===
SHADOW = ShadowStatus(percent=12.5, max_in_flight=2)


def shadowed(text: str, percent: int = 0, shadow: ShadowStatus | None = SHADOW) -> str:
    change = ServeEdit(STABLE, CANARY.name, percent, shadow=shadow)
    return serveconfig.apply_edit(text, "amalia", change, CANARY)


def ingress_user_config(text: str) -> dict[str, Any]:
    (ingress,) = apps(text)["amalia"]["deployments"]
    user_config: dict[str, Any] = ingress["user_config"]
    return user_config


def test_shadow_is_written_into_ingress_user_config_beside_weights_when_set() -> None:
    with_canary = edit(CONFIG, 0, add=True)
    out = shadowed(with_canary)
    assert ingress_user_config(out) == {
        "weights": {STABLE: 100, "amalia-dpo": 0},
        # The serving side's contract: the canary's application name, a float percent, an int.
        "shadow": {"variant": "amalia-dpo", "percent": 12.5, "max_in_flight": 2},
    }
    assert serveconfig.observe(out, "amalia").shadow == ingress_user_config(out)["shadow"]
    # Only the user_config changed: the ingress reconfigures, nothing restarts.
    assert (
        out.replace(
            "\n      shadow:\n        variant: amalia-dpo\n        percent: 12.5\n        max_in_flight: 2",
            "",
        )
        == with_canary
    )
    assert shadowed(out) == out  # idempotent
    again = shadowed(out, 30, ShadowStatus(percent=5.0, max_in_flight=4))
    assert ingress_user_config(again)["shadow"] == {
        "variant": "amalia-dpo", "percent": 5.0, "max_in_flight": 4
    }  # fmt: skip
    assert ingress_user_config(again)["weights"] == {STABLE: 70, "amalia-dpo": 30}


def test_shadow_is_removed_and_bytes_restored_when_rollout_turns_it_off() -> None:
    with_canary = edit(CONFIG, 0, add=True)
    assert shadowed(shadowed(with_canary), shadow=None) == with_canary


@pytest.mark.parametrize("flow", [True, False], ids=["flow-user-config", "block-user-config"])
def test_shadow_edit_keeps_user_config_style_when_set_and_cleared(flow: bool) -> None:
    text = CONFIG.replace(
        "    user_config:\n      weights: {amalia-sft: 100}\n",
        "    user_config: {weights: {amalia-sft: 100}}\n",
    ) if flow else CONFIG  # fmt: skip
    assert (text != CONFIG) is flow
    with_canary = edit(text, 0, add=True)
    out = shadowed(with_canary)
    assert ingress_user_config(out)["shadow"]["variant"] == "amalia-dpo"
    assert serveconfig.observe(shadowed(out, shadow=None), "amalia").shadow is None


def test_clearing_leaves_a_shadow_to_another_variant_alone_when_rollout_does_not_own_it() -> None:
    theirs = {"variant": "amalia-base", "percent": 50.0, "max_in_flight": 4}
    with_canary = edit(CONFIG, 0, add=True)
    text = serveconfig.set_shadow(with_canary, "amalia", theirs)
    assert ingress_user_config(shadowed(text, shadow=None))["shadow"] == theirs
    # The rollout's own shadow replaces it: there is one shadow slot per ingress.
    assert ingress_user_config(shadowed(text))["shadow"]["variant"] == "amalia-dpo"
    # Removing the canary (a rollback's cleanup) drops a shadow to it with the weight.
    mine = shadowed(with_canary)
    gone = edit(edit(mine, 0, remove=("amalia-dpo",)), 0, remove=("amalia-dpo",))
    assert gone == CONFIG

"""serveConfigV2 edits: the right nodes change, and every other byte stays as it was."""

from __future__ import annotations

import pytest
import yaml

from amalia_operator import serveconfig
from amalia_operator.constants import INGRESS_DEPLOYMENT_NAME
from amalia_operator.models import CanaryVariant
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
AMALIA_APP = """\
- name: amalia
  route_prefix: /
  import_path: amalia_serve.app:build_app
  runtime_env:
    env_vars: {HF_HUB_OFFLINE: "1"}
  args:
    model_alias: amalia
    variants:
      - name: amalia-sft
        model_path: /models/AMALIA-9B-SFT
        engine:
          dtype: bfloat16
          max_batch_size: 32
        deployment:
          autoscaling_config: {min_replicas: 1, max_replicas: 4}
          ray_actor_options: {num_gpus: 1, num_cpus: 4}
    routing:
      weights:
        amalia-sft: 100
  deployments:
  - name: AmaliaIngress
    num_replicas: 2   # two ingress replicas
    user_config:
      weights: {amalia-sft: 100}
"""
CONFIG = HEADER + OTHER_APP + AMALIA_APP
STABLE = "amalia-sft"
CANARY = CanaryVariant.model_validate(
    {
        "name": "amalia-dpo",
        "modelPath": "/models/AMALIA-9B-DPO",
        "engine": {"max_batch_size": 16},
        "deployment": {"autoscaling_config": {"max_replicas": 2}},
    }
)


def edit(text: str, weights: dict[str, int], add: bool = False, remove: str | None = None) -> str:
    return serveconfig.apply_edit(text, "amalia", ServeEdit(weights, add, remove), CANARY, STABLE)


def app(text: str) -> dict[str, object]:
    apps = yaml.safe_load(text)["applications"]
    return next(a for a in apps if a["name"] == "amalia")


def test_ingress_name_matches_serve_package_when_duplicated() -> None:
    from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME as SERVE_NAME

    assert INGRESS_DEPLOYMENT_NAME == SERVE_NAME


def test_add_variant_copies_stable_settings_with_overrides_when_canary_added() -> None:
    out = edit(CONFIG, {STABLE: 100, "amalia-dpo": 0}, add=True)
    variants = app(out)["args"]["variants"]  # type: ignore[index]
    assert [v["name"] for v in variants] == [STABLE, "amalia-dpo"]
    assert variants[1] == {
        "name": "amalia-dpo",
        "model_path": "/models/AMALIA-9B-DPO",
        "engine": {"dtype": "bfloat16", "max_batch_size": 16},
        "deployment": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
            "ray_actor_options": {"num_gpus": 1, "num_cpus": 4},
        },
    }
    assert serveconfig.observe(out, "amalia").weights == {STABLE: 100, "amalia-dpo": 0}


def test_edits_keep_untouched_bytes_when_canary_added_and_weights_moved() -> None:
    out = edit(
        edit(CONFIG, {STABLE: 100, "amalia-dpo": 0}, add=True), {STABLE: 75, "amalia-dpo": 25}
    )
    assert out.startswith(HEADER + OTHER_APP)
    # Everything up to the end of the stable variant, and the ingress's other keys, are unchanged.
    stable_block = AMALIA_APP[: AMALIA_APP.index("    routing:")]
    assert out[len(HEADER + OTHER_APP) :].startswith(stable_block)
    assert "    num_replicas: 2   # two ingress replicas\n" in out
    assert "      weights: {amalia-sft: 75, amalia-dpo: 25}\n" in out  # flow style kept
    assert "    routing:\n      weights:\n        amalia-sft: 100\n" in out  # args untouched


def test_edits_restore_original_bytes_when_canary_added_then_removed() -> None:
    with_canary = edit(CONFIG, {STABLE: 100, "amalia-dpo": 0}, add=True)
    assert with_canary != CONFIG
    assert edit(with_canary, {STABLE: 100}, remove="amalia-dpo") == CONFIG


def test_remove_variant_drops_it_from_variants_and_routing_when_promoted() -> None:
    with_canary = edit(CONFIG, {STABLE: 0, "amalia-dpo": 100}, add=True)
    out = edit(with_canary, {"amalia-dpo": 100}, remove=STABLE)
    amalia = app(out)
    assert [v["name"] for v in amalia["args"]["variants"]] == ["amalia-dpo"]  # type: ignore[index]
    assert amalia["args"]["routing"] == {"weights": {"amalia-dpo": 100}}  # type: ignore[index]
    assert serveconfig.observe(out, "amalia").weights == {"amalia-dpo": 100}
    assert out.startswith(HEADER + OTHER_APP)


def test_apply_edit_returns_same_text_when_nothing_to_change() -> None:
    once = edit(CONFIG, {STABLE: 100, "amalia-dpo": 0}, add=True)
    assert edit(once, {STABLE: 100, "amalia-dpo": 0}, add=True) is once
    assert edit(CONFIG, {STABLE: 100}) is CONFIG


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
    base = AMALIA_APP[: AMALIA_APP.index("  deployments:")]
    text = HEADER + base + ingress_part + OTHER_APP
    out = serveconfig.set_weights(text, "amalia", {STABLE: 90, "amalia-dpo": 10})
    assert expected_tail in out
    assert out.startswith(HEADER + base + ingress_part.rstrip("\n"))
    assert out.endswith(OTHER_APP)
    assert serveconfig.observe(out, "amalia").weights == {STABLE: 90, "amalia-dpo": 10}
    assert [a["name"] for a in yaml.safe_load(out)["applications"]] == ["amalia", "embeddings"]


def test_edits_raise_when_application_missing() -> None:
    with pytest.raises(serveconfig.ServeConfigError, match="no application named 'nope'"):
        serveconfig.observe(CONFIG, "nope")
    with pytest.raises(serveconfig.ServeConfigError, match="stable variant 'ghost'"):
        serveconfig.canary_entry(CONFIG, "amalia", CANARY, "ghost")

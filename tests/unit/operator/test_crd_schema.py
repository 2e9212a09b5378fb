"""The ModelRollout CRD: structural, current on disk, and refusing bad objects like an API server.

An API server validates a custom object in two passes: the OpenAPI schema, then every CEL rule in
`x-kubernetes-validations` with `self` bound to the node it sits on. We do both here: jsonschema
over the openAPIV3Schema (its x-kubernetes-* keywords carry no JSON Schema meaning) and celpy
evaluating each rule, so a rule that is present but wrong fails a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from modelrollout_cases import BAD, GOOD, Case

from amalia_operator import crd, rbac
from amalia_operator.models import RolloutSpec

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = crd.open_api_schema()
EXAMPLE = ROOT / "examples" / "modelrollout-sft-to-dpo.yaml"


def schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    if "items" in schema:
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}{{}}")


def cel_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """Evaluates every CEL rule on the nodes present in `value`, as the API server does."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(typed(schema, value))}):
            errors.append(rule["message"])
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += cel_errors(sub, value[name])
    if isinstance(value, list) and "items" in schema:
        for item in value:
            errors += cel_errors(schema["items"], item)
    return errors


def typed(schema: dict[str, Any], value: Any) -> Any:
    """JSON numbers under `type: number` are doubles in Kubernetes CEL, even when written as 2."""
    if schema.get("type") == "number" and isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: typed(props.get(k, {}), v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(schema.get("items", {}), v) for v in value]
    return value


def refusals(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    schema_errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)
    ]
    return schema_errors or cel_errors(SCHEMA, obj)


# === the files on disk ===
def test_crd_files_are_current_when_generated_from_crd_py() -> None:
    for name, text in crd.rendered().items():
        assert (crd.CRD_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run `python -m amalia_operator.crd`"
        )
    for name, text in rbac.rendered().items():
        assert (rbac.DEPLOY_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run `python -m amalia_operator.rbac`"
        )


def test_crd_declares_status_subresource_and_printer_columns() -> None:
    doc = yaml.safe_load((crd.CRD_DIR / f"{crd.CRD_NAME}.yaml").read_text(encoding="utf-8"))
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Canary weight", "Step", "Age"]
    assert version["schema"]["openAPIV3Schema"] == SCHEMA


# === structural schema rules (apiextensions: "Specifying a structural schema") ===
@pytest.mark.parametrize(
    "source",
    [SCHEMA]
    + [
        d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for d in (crd.peering_crd("Cluster"), crd.peering_crd("Namespaced"))
    ],
)
def test_crd_schema_is_structural_when_walked(source: dict[str, Any]) -> None:
    forbidden = {
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "dependencies",
        "additionalItems",
        "patternProperties",
    }
    for path, node in schema_nodes(source):
        free = node.get("x-kubernetes-preserve-unknown-fields") is True
        assert "type" in node, f"{path or '<root>'} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not forbidden & node.keys(), f"{path} uses {forbidden & node.keys()}"
        assert "nullable" not in node or node["type"] != "", path
        if node["type"] == "array":
            assert "items" in node, f"{path} is an array without items"
        if node["type"] == "object" and not free and path not in ("", ".metadata"):
            assert "properties" in node or "additionalProperties" in node, (
                f"{path} is an empty object"
            )
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), (
                f"{path} map keys not required"
            )
    metadata = source.get("properties", {}).get("metadata")
    assert metadata in (None, {"type": "object"}), "metadata may only restrict name/generateName"


def test_crd_cel_rules_compile_when_parsed() -> None:
    env = celpy.Environment()
    rules = [
        r["rule"]
        for _, node in schema_nodes(SCHEMA)
        for r in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 5
    for rule in rules:
        env.compile(rule)


# === accepted and refused objects ===
def test_crd_accepts_object_when_well_formed() -> None:
    assert refusals(GOOD) == []
    RolloutSpec.model_validate(GOOD["spec"])


def test_crd_accepts_example_when_validated() -> None:
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert refusals(example) == []
    RolloutSpec.model_validate(example["spec"])


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_crd_refuses_object_when_invalid(case: Case) -> None:
    found = refusals(case.obj)
    assert any(case.offline in f for f in found), found


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_spec_model_refuses_object_when_crd_does(case: Case) -> None:
    """The operator's typed view agrees with the CRD (guards against a CRD older than the code)."""
    with pytest.raises(ValueError):
        RolloutSpec.model_validate(case.obj["spec"])

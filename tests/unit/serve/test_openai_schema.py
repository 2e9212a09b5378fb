"""The request bodies the ingress reads itself are still described in its OpenAPI schema."""

from __future__ import annotations

import json
from typing import Any

import pytest

from amalia_serve.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    openapi_request_body,
)


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_openapi_body_describes_the_request_model_without_references_when_it_nests_models(model: Any) -> None:
    body = openapi_request_body(model)["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] is True
    assert set(model.model_fields) == set(schema["properties"])
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema

"""The request bodies the ingress reads itself are still described in its OpenAPI schema."""

from __future__ import annotations

import json
from typing import Any

import pytest

from amalia_serve.openai_schema import (
    CHAT_EXAMPLE,
    COMPLETION_EXAMPLE,
    ChatCompletionRequest,
    CompletionRequest,
    openapi_request_body,
)


@pytest.mark.parametrize(("model", "example"), [(ChatCompletionRequest, CHAT_EXAMPLE),
                                              (CompletionRequest, COMPLETION_EXAMPLE)])  # fmt: skip
def test_openapi_body_describes_the_request_model_without_references_when_it_nests_models(
    model: Any, example: dict[str, Any]
) -> None:
    body = openapi_request_body(model, example)["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] is True
    assert set(model.model_fields) == set(schema["properties"])
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    model.model_validate(body["content"]["application/json"]["example"])  # the example is a valid request


@pytest.mark.parametrize("stop", ["", ["fim", ""]])
def test_empty_stop_string_refused_naming_stop(stop: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"model": "amalia", "prompt": "x", "stop": stop})
    assert refused.value.errors()[0]["loc"] == ("stop",)

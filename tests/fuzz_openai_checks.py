"""Schemathesis hooks and checks for the OpenAI API, loaded by `schemathesis run` through SCHEMATHESIS_HOOKS
(tests/integration/test_fuzz_openapi_serve.py).

`served_model_or_not`: a generated body's `model` is random text, which only ever meets the 404 for an unknown
model; each body is also tried with a served model name, so the fuzzed sampling fields reach the engine.

`openai_error_shape`: every error response has OpenAI's JSON shape, and a 429 or 503 says when to retry.
`posts_reach_the_engine`: each POST operation was answered 200 at least once, so the fuzzer built valid
bodies from the schema and reached the engine, rather than only bouncing off validation.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from hypothesis import strategies as st

ERROR_KEYS = {"message", "type", "param", "code"}
SERVED_MODELS = ["amalia", "amalia-sft", "amalia-dpo"]


@schemathesis.hook("flatmap_body")
def served_model_or_not(context: Any, body: Any) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return st.just(body)
    return st.one_of(st.just(body), st.sampled_from(SERVED_MODELS).map(lambda model: {**body, "model": model}))


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), f"error with content-type {content_type!r}"
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, f"not OpenAI's error shape: {body!r}"
    assert isinstance(error["message"], str) and error["message"], f"empty error message: {body!r}"
    assert isinstance(error["type"], str) and error["type"], f"no error type: {body!r}"
    if response.status_code in (429, 503):
        assert "retry-after" in {k.lower() for k in response.headers}, "429/503 without Retry-After"


@schemathesis.check
class posts_reach_the_engine:  # lower case: the check is named after the class on the CLI
    def __init__(self) -> None:
        self.tested: set[str] = set()
        self.served: set[str] = set()

    def after_response(self, ctx: Any, response: Any, case: Any) -> None:
        if case.operation.method.upper() == "POST":
            self.tested.add(case.operation.label)
            if response.status_code == 200:
                self.served.add(case.operation.label)

    def after_run(self, ctx: Any) -> None:
        missing = sorted(self.tested - self.served)
        assert not missing, f"never answered 200: {missing}"

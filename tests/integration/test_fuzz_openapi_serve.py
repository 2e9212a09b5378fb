"""Schemathesis against the ingress's own /openapi.json on a real local Ray Serve (127.0.0.1): examples, coverage
and fuzzing phases, bounded in cases per operation and in time. No response may be a server error (>= 500), every
error has OpenAI's shape and a 429/503 says when to retry (tests/fuzz_openai_checks.py), and both POST operations
must have been answered 200, which shows the fuzzer built bodies from the schema.

The variants' context is 256 tokens, so whatever max_tokens the fuzzer picks, a generation ends in about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TESTS = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = 30  # per operation in the examples and coverage phases; fuzzing repeats until MAX_TIME_S
MAX_TIME_S = 45
SEED = 1


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    config = demo_app_config(sft, dpo, free_port(), max_model_len=256)
    # /readyz waits on variants busy with fuzzed generations: give them time, a slow answer is not a failure.
    config["applications"][0]["args"]["ingress"] = {"ready_timeout_s": 15}
    with running_serve(config) as running:
        yield running


def test_openapi_schema_describes_both_request_bodies(served: RunningServe) -> None:
    paths = httpx.get(f"{served.base_url}/openapi.json", timeout=30).json()["paths"]
    for path, required in (("/v1/chat/completions", {"model", "messages"}), ("/v1/completions", {"model", "prompt"})):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["required"]) == required
        assert {"max_tokens", "stream", "stop", "temperature"} <= set(schema["properties"])


def test_fuzzed_requests_get_no_server_error_and_only_openai_shaped_errors(
    served: RunningServe, tmp_path: Path
) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{served.base_url}/openapi.json",
        "--checks", "not_a_server_error,openai_error_shape,posts_reach_the_engine",
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--max-time", str(MAX_TIME_S), "--request-timeout", "60", "--workers", "2",
        "--generation-database", "none", "--no-color", "--suppress-health-check", "all",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_openai_checks",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # Its working directory takes what it writes (.hypothesis/, schemathesis-report/).
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=MAX_TIME_S + 120,
                         check=False)  # fmt: skip
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]

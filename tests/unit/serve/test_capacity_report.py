"""`amalia-serve plan`: what it prints agrees with the arithmetic, and the blocks it suggests are usable."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from amalia_serve.capacity import AMALIA_9B_CONFIG, GPUS, PRESETS, EngineSettings, suggest
from amalia_serve.cli import main


def plan(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(plan(capsys, "--json", *argv))
    return report


def test_plan_json_reports_the_suggested_fit_when_card_and_users_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = plan_json(
        capsys,
        "--gpu",
        "H100-80GB",
        "--quantization",
        "fp8",
        "--kv-cache-dtype",
        "fp8",
        "--users",
        "200",
    )
    expected = suggest(
        PRESETS["amalia-9b"],
        GPUS["H100-80GB"],
        EngineSettings(quantization="fp8_per_tensor", kv_cache_dtype="fp8"),
    )
    got = report["plan"]
    assert (got["weight_bytes"], got["kv_tokens"], got["concurrency"]) == (
        expected.weight_bytes,
        expected.kv_tokens,
        expected.concurrency,
    )
    assert got["replicas"] == math.ceil(200 / expected.concurrency) == got["gpus"]
    assert got["engine"] == {
        "max_model_len": 32768,
        "max_num_seqs": expected.max_num_seqs,
        "max_num_batched_tokens": 8192,
        "gpu_memory_utilization": 0.9,
        "quantization": "fp8_per_tensor",
        "kv_cache_dtype": "fp8",
    }
    (variant,) = got["chart_values"]["variants"]
    (group,) = got["chart_values"]["workerGroups"]
    assert (variant["checkpoint"], variant["replicas"], variant["engine"]) == (
        "amalia-9b",
        got["replicas"],
        got["engine"],
    )
    assert (group["gpu"], group["gpuResourceName"], group["maxReplicas"]) == (
        "H100-80GB",
        "nvidia.com/gpu",
        got["replicas"],
    )
    assert report["model"]["params"] == 9_152_319_488


def test_plan_text_prints_plan_engine_block_and_chart_values_when_card_fits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = plan(capsys, "--gpu", "L40S", "--context", "8192", "--users", "50")
    assert "Parameters 9,152,319,488" in out
    # 8,480 blocks of 16 tokens after weights and reserve (16 sequences' sampler) hold 16 x 8192.
    assert "full 8192-token conversations at once: 16 per replica" in out
    assert "for 50 users: 4 replicas = 4 GPUs" in out
    assert "engine:\n  max_model_len: 8192\n  max_num_seqs: 16\n" in out
    assert "workerGroups:\n- name: gpu\n  gpu: L40S\n" in out


def test_plan_compares_every_card_when_no_card_given(capsys: pytest.CaptureFixture[str]) -> None:
    rows = plan(capsys, "--context", "8192").splitlines()
    for name in GPUS:
        (row,) = [r for r in rows if r.startswith(f"{name} ")]
        assert ("does not fit" in row) == name.endswith(
            ("1g.10gb", "1g.18gb", "1g.20gb", "2g.20gb")
        )


def test_plan_lists_problems_and_no_engine_block_when_weights_overflow_the_slice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = plan(capsys, "--gpu", "H100-80GB:1g.10gb")
    assert "Does not fit:\n  - bf16 weights take 17.05 GiB per GPU" in out
    assert "engine:" not in out


def test_plan_points_at_an_offline_checkpoint_when_int4_asked_of_a_16bit_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = plan_json(
        capsys, "--gpu", "1g.18gb", "--quantization", "int4", "--kv-cache-dtype", "fp8"
    )
    got = report["plan"]
    assert got["how"] == "checkpoint quantized offline to int4"
    assert got["engine"]["quantization"] is None
    assert got["chart_values"]["variants"][0]["checkpoint"] == "amalia-9b-int4"
    assert got["chart_values"]["workerGroups"][0]["gpuResourceName"] == "nvidia.com/mig-1g.18gb"
    assert got["chart_values"]["workerGroups"][0]["gpu"] == "H200"


def test_plan_marks_checkpoint_custom_and_card_unchecked_when_given_by_path_and_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(AMALIA_9B_CONFIG))
    report = plan_json(capsys, "--config", str(tmp_path), "--gpu-memory-gib", "24")
    values = report["plan"]["chart_values"]
    assert values["variants"][0]["checkpoint"] == "custom"
    assert "gpu" not in values["workerGroups"][0]
    assert report["gpu"]["support"]["fp8"] == "unknown"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu", "T4"], "amalia-serve plan: unknown GPU 'T4'"),
        (["--users", "0"], "--users must be >= 1"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--config", "/nonexistent"], "neither a built-in checkpoint"),
    ],
)
def test_plan_exits_with_one_line_reason_when_input_is_bad(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", *argv])
    assert message in str(exited.value.code)

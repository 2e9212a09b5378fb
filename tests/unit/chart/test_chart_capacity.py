"""The chart refuses what `amalia-serve plan` says cannot start, with the planner's own numbers.

templates/_capacity.tpl repeats the planner's arithmetic over files/capacity.yaml (generated from
amalia_serve.capacity; test_chart_generated proves it current), so the two are compared case by
case. Engine keys the chart schema does not list yet (vLLM's kv_cache_dtype, quantization, ... come
with the vLLM EngineConfig) are rendered with --skip-schema-validation: these tests are about the
template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import CI_VALUES, ROOT, run_helm, serve_config, template_args

from amalia_serve.capacity import (
    GPUS,
    PRESETS,
    EngineSettings,
    WeightFormat,
    fit,
    quantization_conflict,
)
from amalia_serve.capacity_report import chart_values, plan_fit

SKIP_SCHEMA = ("--skip-schema-validation",)

# (card, checkpoint, engine block): fits and refusals of each kind, on whole cards and MIG slices.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    # Weights overflow the slice, in bf16 and in fp8; int4 with an fp8 KV cache at 8k fits.
    ("H100-80GB:1g.10gb", "amalia-9b", {}),
    ("H100-80GB:1g.10gb", "amalia-9b", {"quantization": "fp8_per_tensor"}),
    ("H100-80GB:1g.10gb", "amalia-9b-int4", {"kv_cache_dtype": "fp8", "max_model_len": 8192}),
    # fp8 weights fit, one 32k sequence of 16-bit KV does not; of fp8 KV it does (either spelling).
    ("H200:1g.18gb", "amalia-9b", {"quantization": "fp8_per_tensor"}),
    ("H200:1g.18gb", "amalia-9b", {"quantization": "fp8_per_tensor", "kv_cache_dtype": "fp8"}),
    ("H200:1g.18gb", "amalia-9b", {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
    # Weights fit, one 32k sequence does not; split over two slices it does.
    ("H100-80GB:1g.20gb", "amalia-9b", {}),
    ("H100-80GB:1g.20gb", "amalia-9b", {"tensor_parallel_size": 2}),
    # A small budget; a bigger reserve; an offline int8 checkpoint; the largest card.
    ("L40S", "amalia-9b", {"gpu_memory_utilization": 0.4}),
    ("L40S", "amalia-9b", {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}),
    ("A100-80GB:3g.40gb", "amalia-9b-int8", {}),
    ("H200", "amalia-9b", {}),
]  # fmt: skip


def values_for(card: str, checkpoint: str, engine: dict[str, Any]) -> dict[str, Any]:
    name, _, profile = card.partition(":")
    gpus = int(engine.get("tensor_parallel_size", 1))
    resource = f"nvidia.com/mig-{profile}" if profile else "nvidia.com/gpu"
    variant = {"name": "amalia-sft", "modelPath": "/models/x", "gpus": gpus, "replicas": 1,
               "checkpoint": checkpoint, "engine": engine}  # fmt: skip
    group = {"name": "gpu", "minReplicas": 1, "maxReplicas": 1, "gpusPerWorker": gpus, "gpu": name,
             "gpuResourceName": resource}  # fmt: skip
    return {"variants": [variant], "workerGroups": [group]}


def helm_with(helm: str, tmp_path: Path, values: dict[str, Any]) -> Any:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return run_helm(helm, *template_args(path, extra=SKIP_SCHEMA))


@pytest.mark.parametrize(("card", "checkpoint", "engine"), CASES, ids=lambda c: str(c))
def test_chart_refuses_exactly_what_the_planner_refuses_with_its_numbers_when_card_known(
    helm: str, tmp_path: Path, card: str, checkpoint: str, engine: dict[str, Any]
) -> None:
    planned = fit(PRESETS[checkpoint], GPUS[card], EngineSettings(**engine))
    result = helm_with(helm, tmp_path, values_for(card, checkpoint, engine))
    assert (result.returncode == 0) == planned.fits, result.stderr
    if not planned.fits:
        assert f"variant amalia-sft cannot start on worker group gpu ({card}): " in result.stderr
        assert planned.problems[0] in result.stderr, (planned.problems, result.stderr)


@pytest.mark.parametrize(
    ("card", "weights", "kv_cache_dtype", "context"),
    [("H100-80GB", "fp8", "fp8", 32768), ("L40S", "bf16", "auto", 8192),
     ("H200:1g.18gb", "int4", "fp8", 32768), ("A100-80GB:3g.40gb", "int8", "auto", 16384)],
)  # fmt: skip
def test_chart_accepts_the_values_the_planner_suggests_when_pasted(
    helm: str, tmp_path: Path, card: str, weights: WeightFormat, kv_cache_dtype: str, context: int
) -> None:
    model = PRESETS["amalia-9b"]
    settings = EngineSettings(max_model_len=context, kv_cache_dtype=kv_cache_dtype)
    planned = plan_fit(model, GPUS[card], weights, settings)
    values = chart_values(model, planned, replicas=2)
    result = helm_with(helm, tmp_path, values)
    assert result.returncode == 0, result.stderr
    (rayservice,) = [
        d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayService"
    ]
    (app,) = [a for a in serve_config([rayservice])["applications"] if a["name"] == "amalia-sft"]
    assert app["args"]["engine"] == values["variants"][0]["engine"]


def test_chart_sizes_a_mig_group_without_card_as_the_smallest_slice_of_its_profile(
    helm: str, tmp_path: Path
) -> None:
    # At 0.61 of its memory an H100's 3g.40gb slice (39.50 GiB) holds one 32k sequence, an A100's
    # (39.25) not.
    settings = EngineSettings(gpu_memory_utilization=0.61)
    assert fit(PRESETS["amalia-9b"], GPUS["H100-80GB:3g.40gb"], settings).fits
    planned = fit(PRESETS["amalia-9b"], GPUS["A100-80GB:3g.40gb"], settings)
    values = values_for("H100-80GB:3g.40gb", "amalia-9b", {"gpu_memory_utilization": 0.61})
    assert helm_with(helm, tmp_path, values).returncode == 0
    del values["workerGroups"][0]["gpu"]
    result = helm_with(helm, tmp_path, values)
    assert "worker group gpu (A100-80GB:3g.40gb)" in result.stderr
    assert planned.problems[0] in result.stderr


def unchecked(kind: str) -> dict[str, Any]:
    """Values the check refuses (bf16 weights on a 9.75 GiB slice), made unchecked by `kind`."""
    values = values_for("H100-80GB:1g.10gb", "amalia-9b", {})
    variant, group = values["variants"][0], values["workerGroups"][0]
    if kind == "check-off":
        values["capacity"] = {"enforce": False}
    elif kind == "custom-checkpoint":
        variant["checkpoint"] = "custom"
    elif kind == "card-unknown":
        del group["gpu"]
        group["gpuResourceName"] = "nvidia.com/gpu"
    elif kind == "group-cannot-host-replica":
        # Ray never places a 2-GPU replica on the 1-GPU slice group, only on the H100 pair: the slice is not
        # checked against it.
        variant["gpus"] = 2
        variant["engine"] = {"tensor_parallel_size": 2}
        values["workerGroups"].append({"name": "pairs", "gpusPerWorker": 2, "gpu": "H100-80GB",
                                       "gpuResourceName": "nvidia.com/gpu"})  # fmt: skip
    return values


@pytest.mark.parametrize(
    "kind", ["check-off", "custom-checkpoint", "card-unknown", "group-cannot-host-replica"]
)
def test_chart_skips_the_fit_check_when_off_custom_unknown_card_or_group_cannot_host(
    helm: str, tmp_path: Path, kind: str
) -> None:
    assert (
        helm_with(helm, tmp_path, values_for("H100-80GB:1g.10gb", "amalia-9b", {})).returncode != 0
    )
    result = helm_with(helm, tmp_path, unchecked(kind))
    assert result.returncode == 0, result.stderr


def test_capacity_doc_quotes_the_refusal_helm_prints_when_weights_exceed_a_slice(helm: str) -> None:
    doc = (ROOT / "docs" / "capacity.md").read_text(encoding="utf-8")
    quoted = doc.split("```text\nError: ", 1)[1].split("\n```", 1)[0].replace("\n", " ")
    result = run_helm(helm, *template_args(CI_VALUES / "bad" / "capacity-weights-exceed-gpu.yaml"))
    assert f"Error: {quoted}" in result.stderr, result.stderr


@pytest.mark.parametrize("checkpoint", ["amalia-9b", "amalia-9b-fp8", "amalia-9b-int4"])
@pytest.mark.parametrize("quantization", ["fp8", "fp8_per_tensor", "gptq", "compressed-tensors"])
def test_chart_refuses_a_quantization_its_checkpoint_contradicts_as_the_planner_does(
    helm: str, tmp_path: Path, checkpoint: str, quantization: str
) -> None:
    conflict = quantization_conflict(PRESETS[checkpoint], quantization)
    result = helm_with(helm, tmp_path, values_for("H200", checkpoint, {"quantization": quantization}))
    assert (result.returncode == 0) == (conflict is None), result.stderr
    if conflict:
        assert f"variant amalia-sft: {conflict}" in result.stderr, result.stderr

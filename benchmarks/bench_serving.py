"""Serving benchmark: amalia-serve over HTTP next to bare `vllm serve` (same engine args), the naive `generate`
server, and Ray Serve's own no-op floor, in one run on the realistic CPU checkpoint (SmolLM2-135M-Instruct,
built by `make bench` with `amalia-serve demo-models .models --realistic`).

Measured, with the same streaming client (benchmarks/load.py) against every server:
- output tokens/s and TTFT p50/p99 at each concurrency level, amalia-serve (ingress -> variant) and bare vLLM;
- the naive server at 1 and at the top level;
- TTFT of the 3rd turn of conversations sharing a ~1,000-token system prompt, prefix caching on and off;
- p50 of a no-op request through Ray Serve's HTTP proxy -> FastAPI ingress -> handle -> deployment;
- amalia-serve again behind Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, the proxy Ray's KubeRay
  high-throughput guide recommends), with its own floor.

Each server runs in a child process of its own (a Serve proxy mode is fixed when Ray starts). Prints a table as it
goes, writes a PNG plot (throughput and TTFT vs concurrency) under benchmarks/results/, and ends with one JSON line
holding every number and the goals' verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.load import LevelResult, http_p50_ms, run_level, third_turn_ttft_ms
from benchmarks.servers import apply_core_split, bare_vllm, noop_app, split_cores

NAIVE_ENGINE = "benchmarks.naive_engine:NaiveGenerateEngine"
# Goals of the engine issue (CPU part), checked on the JSON keys below.
GOALS: dict[str, tuple[str, float]] = {
    "vs_vllm_serve": (">=", 0.9),
    "concurrency_speedup": (">=", 6.0),
    "vs_naive": (">=", 10.0),
    "prefix_ttft_ratio": ("<=", 0.5),
}


def engine_block(args: argparse.Namespace, prefix_caching: bool = True) -> dict[str, Any]:
    return {
        "max_num_seqs": max(args.levels),
        "max_model_len": 2048,
        "kv_cache_memory_bytes": args.kv_cache_gib << 30,
        "enable_prefix_caching": prefix_caching,
        # Bare vLLM sends the chats as they are: no default system prompt, so both prefill the same tokens.
        "system_prompt": None,
    }


def serve_config(args: argparse.Namespace, port: int, baselines: bool = True) -> dict[str, Any]:
    from amalia_serve.local_run import local_serve_config, variant_app_config

    def variant(
        name: str, engine: dict[str, Any], env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        deployment = {
            "num_replicas": 1,
            "max_ongoing_requests": 256,
            "ray_actor_options": {"num_cpus": 1},
        }
        app = variant_app_config(name, args.model, engine, deployment)
        return {**app, "runtime_env": {"env_vars": env}} if env else app

    naive_env = {"AMALIA_ENGINE_CLS": NAIVE_ENGINE, "PYTHONPATH": str(ROOT)}
    variants = [variant("smollm2", engine_block(args))]
    if baselines:
        variants += [
            variant("smollm2-noprefix", engine_block(args, prefix_caching=False)),
            variant("naive", {"max_model_len": 2048}, naive_env),
        ]
    front = {"ingress": {"deployment": {"num_replicas": 1, "max_ongoing_requests": 512,
                                        "ray_actor_options": {"num_cpus": 0}}}}  # fmt: skip
    weights = {app["name"]: int(app["name"] == "smollm2") for app in variants}
    return local_serve_config(port, weights, variants, front)


def long_system_prompt(model: str, tokens: int = 1000) -> str:
    """Portuguese text of about `tokens` tokens in the model's tokenizer."""
    from importlib import resources

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lines = (
        resources.files("amalia_serve")
        .joinpath("demo_corpus/pt.txt")
        .read_text(encoding="utf-8")
        .splitlines()
    )
    text, i = "És um assistente do Estado português. Contexto:\n", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += lines[i % len(lines)] + "\n"
        i += 1
    return text


class Progress:
    """A progress bar over every request of the run, and a table row per measured level."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
        self.rows: list[str] = []

    def tick(self) -> None:
        self.bar.update(1)

    def row(self, server: str, level: LevelResult) -> None:
        line = (f"{server:<14} {level.concurrency:>7} {level.requests:>8} {level.tok_s:>10.1f} "
                f"{level.ttft_p50_ms:>11.1f} {level.ttft_p99_ms:>11.1f}")  # fmt: skip
        if not self.rows:
            self.bar.write(f"{'server':<14} {'streams':>7} {'requests':>8} {'out tok/s':>10} "
                           f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11}")  # fmt: skip
        self.rows.append(line)
        self.bar.write(line)


def sweep(
    url: str,
    model: str,
    levels: list[int],
    args: argparse.Namespace,
    progress: Progress,
    server: str,
) -> dict[int, LevelResult]:
    results = {}
    asyncio.run(run_level(url, model, 1, 2, 8))  # warm-up: first compiled shapes, first prefill
    for level in levels:
        result = asyncio.run(run_level(url, model, level, level * args.rounds, args.max_tokens,
                                       on_done=progress.tick))  # fmt: skip
        progress.row(server, result)
        results[level] = result
    return results


def measure_amalia(args: argparse.Namespace, progress: Progress, baselines: bool) -> dict[str, Any]:
    import ray
    from ray import serve
    from serve_harness import free_port

    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start_local_ray(
        num_cpus=8, dashboard=False, log_to_driver=False
    )  # the table, not the replicas' logs
    try:
        config = serve_config(args, port, baselines)
        deploy_config(config)
        wait_until_running([app["name"] for app in config["applications"]], timeout_s=900)
        serve.run(noop_app(), name="noop", route_prefix="/floor")
        measured: dict[str, Any] = {
            "floor": asyncio.run(http_p50_ms(url, "/floor/noop", args.latency_samples))
        }
        label = "amalia-serve" if baselines else "amalia+haproxy"
        measured["ours"] = sweep(url, "smollm2", args.levels, args, progress, label)
        if baselines:
            naive = {}
            for level in (1, max(args.levels)):
                naive[level] = asyncio.run(run_level(url, "naive", level, level, args.max_tokens,
                                                     on_done=progress.tick))  # fmt: skip
                progress.row("naive", naive[level])
            system_prompt = long_system_prompt(args.model)
            measured["naive"] = naive
            measured["prefix_on"] = asyncio.run(
                third_turn_ttft_ms(url, "smollm2", system_prompt, args.prefix_users)
            )
            measured["prefix_off"] = asyncio.run(
                third_turn_ttft_ms(url, "smollm2-noprefix", system_prompt, args.prefix_users)
            )
        return measured
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_bare_vllm(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from serve_harness import free_port

    from amalia_serve.config import EngineConfig

    config = EngineConfig.model_validate(engine_block(args))
    with bare_vllm(
        config, args.model, "smollm2", free_port(), Path(args.out) / "vllm-serve.log"
    ) as url:
        return {"ours": sweep(url, "smollm2", args.levels, args, progress, "vllm serve")}


# The parts of a run, each in its own process: (environment it needs, what it measures).
PARTS: dict[
    str, tuple[dict[str, str], Callable[[argparse.Namespace, Progress], dict[str, Any]]]
] = {
    "amalia": ({}, lambda args, progress: measure_amalia(args, progress, baselines=True)),
    "amalia-haproxy": (
        {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
        lambda args, progress: measure_amalia(args, progress, baselines=False),
    ),
    "vllm": ({}, measure_bare_vllm),
}


def run_part(name: str, args: argparse.Namespace) -> int:
    """Child process: measure one part, write its numbers as JSON to --part-out."""
    requests = sum(level * args.rounds for level in args.levels) + (1 + max(args.levels)) * (
        name == "amalia"
    )
    split = split_cores()
    if split is not None:
        apply_core_split(split)
    progress = Progress(requests)
    measured = PARTS[name][1](args, progress)
    progress.bar.close()

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return dataclasses.asdict(value) if isinstance(value, LevelResult) else value

    Path(args.part_out).write_text(json.dumps(plain(measured)))
    return 0


def spawn_part(name: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    out = Path(args.out) / f"part-{name}.json"
    env = {**os.environ, **PARTS[name][0]}
    subprocess.run(
        [sys.executable, __file__, *argv, "--part", name, "--part-out", str(out)],
        env=env,
        check=True,
    )

    def levels(raw: dict[str, Any]) -> dict[int, LevelResult]:
        return {
            int(k): LevelResult(**{**v, "ttfts_s": tuple(v["ttfts_s"])}) for k, v in raw.items()
        }

    measured: dict[str, Any] = json.loads(out.read_text())
    for key in ("ours", "naive"):
        if key in measured:
            measured[key] = levels(measured[key])
    return measured


def plot(path: Path, series: dict[str, dict[int, LevelResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in series.items():
        xs = sorted(levels)
        tput.plot(xs, [levels[x].tok_s for x in xs], marker="o", label=name)
        ttft.plot(xs, [levels[x].ttft_p50_ms for x in xs], marker="o", label=name)
    ttft.set_yscale("log")  # the naive server's queueing dwarfs the others
    for ax, label in ((tput, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("amalia-serve vs bare vLLM vs naive generate (SmolLM2-135M, vLLM CPU build)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    compare: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
    }
    out = {key: compare[op](results[key], bound) for key, (op, bound) in GOALS.items()}
    out["vs_vllm_serve_haproxy"] = compare[GOALS["vs_vllm_serve"][0]](results["vs_vllm_serve_haproxy"],
                                                                       GOALS["vs_vllm_serve"][1])  # fmt: skip
    for suffix in ("", "_haproxy"):
        overhead, floor = (
            results[f"ttft_overhead_ms_p50{suffix}"],
            results[f"serve_floor_ms_p50{suffix}"],
        )
        out[f"ttft_overhead_ms_p50{suffix}"] = overhead <= floor + 5
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / ".models" / "smollm2-135m-instruct"))
    parser.add_argument(
        "--levels", default="1,2,4,8,16", help="concurrency levels (comma-separated)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--latency-samples", type=int, default=60)
    parser.add_argument("--prefix-users", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    args.levels = sorted({int(x) for x in args.levels.split(",")})
    if args.part:
        return run_part(args.part, args)
    if not (Path(args.model) / "config.json").exists():
        print(
            f"{args.model} missing: run `make bench` (it builds the realistic checkpoint)",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    amalia = spawn_part("amalia", args, argv)
    haproxy = spawn_part("amalia-haproxy", args, argv)
    vllm = spawn_part("vllm", args, argv)["ours"]

    top = max(args.levels)
    ours, naive, ours_ha = amalia["ours"], amalia["naive"], haproxy["ours"]
    png = out_dir / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.png"
    plot(
        png,
        {
            "amalia-serve": ours,
            "amalia-serve, HAProxy": ours_ha,
            "vllm serve": vllm,
            "naive generate": naive,
        },
    )

    def per_level(
        levels: dict[int, LevelResult], value: Callable[[LevelResult], float]
    ) -> dict[int, float]:
        return {k: round(value(v), 1) for k, v in levels.items()}

    results: dict[str, Any] = {
        "model": Path(args.model).name,
        "cores": dict(zip(("frontends_and_ray", "vllm_workers"), split_cores() or ((), ()))),
        "cpus": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "levels": args.levels,
        "amalia_tok_s": per_level(ours, lambda r: r.tok_s),
        "amalia_haproxy_tok_s": per_level(ours_ha, lambda r: r.tok_s),
        "vllm_serve_tok_s": per_level(vllm, lambda r: r.tok_s),
        "naive_tok_s": per_level(naive, lambda r: r.tok_s),
        "amalia_ttft_ms_p50": per_level(ours, lambda r: r.ttft_p50_ms),
        "amalia_haproxy_ttft_ms_p50": per_level(ours_ha, lambda r: r.ttft_p50_ms),
        "vllm_serve_ttft_ms_p50": per_level(vllm, lambda r: r.ttft_p50_ms),
        "vs_vllm_serve": round(ours[top].tok_s / vllm[top].tok_s, 3),
        "vs_vllm_serve_haproxy": round(ours_ha[top].tok_s / vllm[top].tok_s, 3),
        "ttft_overhead_ms_p50": round(ours[1].ttft_p50_ms - vllm[1].ttft_p50_ms, 1),
        "ttft_overhead_ms_p50_haproxy": round(ours_ha[1].ttft_p50_ms - vllm[1].ttft_p50_ms, 1),
        "serve_floor_ms_p50": round(amalia["floor"], 1),
        "serve_floor_ms_p50_haproxy": round(haproxy["floor"], 1),
        "concurrency_speedup": round(ours[top].tok_s / ours[1].tok_s, 2),
        "vs_naive": round(ours[top].tok_s / naive[top].tok_s, 2),
        "prefix_ttft_ms": {
            "on": round(amalia["prefix_on"], 1),
            "off": round(amalia["prefix_off"], 1),
        },
        "prefix_ttft_ratio": round(amalia["prefix_on"] / amalia["prefix_off"], 3),
        "plot": str(png),
        "seconds": round(time.monotonic() - started),
    }
    results["goals_met"] = verdicts(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

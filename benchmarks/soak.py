"""Soak: minutes of mixed streaming and non-streaming load on a running amalia-serve, and how the memory of
its ingress and variant replicas grows after a warm-up.

Not a test: run it against a stack that is up (`make run`, or a port-forward with the script on the node
that hosts the replicas), for 30 minutes by default:

    python benchmarks/soak.py --minutes 30 [--url http://127.0.0.1:8000] [--api-key KEY]

Replicas are found by their process title, `ray::ServeReplica:<application>:<deployment>`, on this
machine; a replica's RSS includes the processes it started (an engine core, say). Growth compares the
median RSS of the first `--window-minutes` after the warm-up with the median of the last
`--window-minutes`. Every error is counted by status. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import record_chat

REPLICA_TITLE = "ray::ServeReplica:"
PROMPTS = [
    "Olá! Quem és tu?",
    "Fala-me de Lisboa em três frases.",
    "Escreve uma receita de pastéis de nata.",
    "Explica o que é um modelo de linguagem a uma criança de dez anos.",
    "Resume a história de Portugal no século XV.",
    "Lista cinco praias do Algarve e diz porquê visitar cada uma.",
    "Traduz para inglês: O tempo está ótimo para um passeio à beira-rio.",
    "Escreve um poema curto sobre o mar.",
]


@dataclass
class Load:
    """What the clients did; filled by the workers, read at the end."""

    outcomes: Counter[str] = field(default_factory=Counter)
    output_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)


def replica_title(proc: psutil.Process) -> str | None:
    """`ray::ServeReplica:amalia:AmaliaIngress` for a Serve replica's process, else None."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    title = cmdline[0].split()[0] if cmdline else ""
    if not title.startswith(REPLICA_TITLE):
        return None
    # While it runs a method Ray may append it (`...:AmaliaIngress.handle_request`); names hold no dot.
    head, _, deployment = title.rpartition(":")
    return f"{head}:{deployment.split('.')[0]}"


def sample_replicas(root_pid: int | None = None) -> dict[int, tuple[str, float]]:
    """Replica pid -> (title, RSS in MiB of the replica process and all its descendants).

    Only descendants of `root_pid` when given (the `amalia-serve run` process, when other Ray
    clusters share the machine).
    """
    found: dict[int, tuple[str, float]] = {}
    candidates = (
        psutil.Process(root_pid).children(recursive=True) if root_pid else psutil.process_iter()
    )
    for proc in candidates:
        title = replica_title(proc)
        if title is None:
            continue
        try:
            rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found[proc.pid] = (title, rss / 2**20)
    return found


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random, load: Load
) -> None:
    stream = rng.random() < args.stream_ratio
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(max(1, args.max_tokens // 4), args.max_tokens),
        "temperature": 0.8,
        "stream": stream,
    }
    started = time.monotonic()
    if stream:
        result = await record_chat(client, body["model"], body["messages"], body["max_tokens"],
                                   temperature=body["temperature"])  # fmt: skip
        if result.failure is not None:
            kind = result.status if result.failure == "http" else result.failure
            load.outcomes[f"stream {'error event' if kind == 'event' else kind}"] += 1
            return
        load.output_tokens += result.tokens
        load.outcomes["stream 200" if result.done else "stream cut short"] += 1
    else:
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            load.outcomes[f"json {type(exc).__name__}"] += 1
            return
        load.outcomes[f"json {response.status_code}"] += 1
        if response.status_code != 200:
            return
        load.output_tokens += response.json()["usage"]["completion_tokens"]
    load.latencies_s.append(time.monotonic() - started)


async def worker(
    client: httpx.AsyncClient, args: argparse.Namespace, seed: int, until: float, load: Load
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        await one_request(client, args, rng, load)


async def sampler(
    args: argparse.Namespace, started: float, until: float, samples: list[dict[str, Any]]
) -> None:
    while True:
        now = time.monotonic()
        samples.append({"t_s": now - started, "replicas": sample_replicas(args.root_pid)})
        if now >= until:
            return
        await asyncio.sleep(min(args.sample_every_s, max(0.0, until - now)))


def growth(
    samples: list[dict[str, Any]], warmup_s: float, window_s: float, end_s: float
) -> dict[str, Any]:
    """Per deployment (replica title): its replica processes and, for each that ran through both
    windows, the median RSS just after the warm-up and over the last window, and the growth in %.

    A deployment whose processes did not all last to the end lost replicas during the run (a crash,
    a failed health check): `replaced` counts them, and its growth then says little.
    """
    pids_of: dict[str, set[int]] = {}
    for sample in samples:
        for pid, (title, _) in sample["replicas"].items():
            pids_of.setdefault(title, set()).add(pid)
    report: dict[str, Any] = {}
    for title, pids in sorted(pids_of.items()):
        measured: dict[str, Any] = {}
        for pid in sorted(pids):
            series = [(s["t_s"], s["replicas"][pid][1]) for s in samples if pid in s["replicas"]]
            first = [rss for t, rss in series if warmup_s <= t <= warmup_s + window_s]
            last = [rss for t, rss in series if t >= end_s - window_s]
            if first and last:
                base, final = statistics.median(first), statistics.median(last)
                measured[str(pid)] = {
                    "after_warmup_mib": round(base, 1),
                    "final_mib": round(final, 1),
                    "growth_pct": round(100 * (final - base) / base, 2),
                }
        report[title] = {
            "processes": len(pids),
            "replaced": len(pids - set(samples[-1]["replicas"])),
            "growth_pct": max((m["growth_pct"] for m in measured.values()), default=None),
            "measured": measured,
        }
    return report


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    load = Load()
    samples: list[dict[str, Any]] = []
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.request_timeout_s
    ) as client:
        (await client.get("/v1/models")).raise_for_status()  # up, and the key (if any) is accepted
        if not sample_replicas(args.root_pid):
            raise SystemExit(
                f"no `{REPLICA_TITLE}...` process on this machine: run the soak beside the replicas"
            )
        started = time.monotonic()
        until = started + args.minutes * 60
        tasks = [worker(client, args, seed, until, load) for seed in range(args.concurrency)]
        await asyncio.gather(sampler(args, started, until, samples), *tasks)
        elapsed = time.monotonic() - started
    warmup_s, window_s = args.warmup_minutes * 60, args.window_minutes * 60
    replicas = growth(samples, warmup_s, window_s, samples[-1]["t_s"])
    growths = [r["growth_pct"] for r in replicas.values() if r["growth_pct"] is not None]
    steady = len(growths) == len(replicas) and not any(r["replaced"] for r in replicas.values())
    requests = sum(load.outcomes.values())
    ok = load.outcomes["json 200"] + load.outcomes["stream 200"]
    lat = sorted(load.latencies_s)
    return {
        "minutes": round(elapsed / 60, 2),
        "warmup_minutes": args.warmup_minutes,
        "window_minutes": args.window_minutes,
        "concurrency": args.concurrency,
        "requests": requests,
        "ok": ok,
        "errors": requests - ok,
        "outcomes": dict(load.outcomes),
        "output_tokens": load.output_tokens,
        "output_tok_s": round(load.output_tokens / elapsed, 1),
        "latency_s_p50": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_s_p99": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
        "samples": len(samples),
        "replicas": replicas,
        "max_growth_pct": max(growths) if growths else None,
        "limit_pct": args.limit_pct,
        # A verdict only for a steady run: every deployment measured, no replica replaced.
        "steady": steady,
        "growth_under_limit": steady and max(growths) < args.limit_pct,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="bearer key, when the ingress requires one")
    parser.add_argument("--model", default="amalia", help="model alias or variant name")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the whole run")
    parser.add_argument(
        "--warmup-minutes", type=float, default=5.0, help="not counted in the growth"
    )
    parser.add_argument(
        "--window-minutes", type=float, default=2.0, help="median window at both ends"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    parser.add_argument(
        "--stream-ratio", type=float, default=0.5, help="share of streaming requests"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--limit-pct", type=float, default=5.0, help="growth the verdict allows")
    parser.add_argument("--root-pid", type=int, default=None,
                        help="follow only replicas descended from this pid (e.g. `amalia-serve run`)")  # fmt: skip
    args = parser.parse_args()
    if args.warmup_minutes + 2 * args.window_minutes > args.minutes:
        parser.error("--minutes must hold the warm-up and two windows")
    result = asyncio.run(soak(args))
    for title, entry in result["replicas"].items():
        for pid, m in entry["measured"].items():
            print(f"{title:<44} pid {pid:>7}  {m['after_warmup_mib']:>8} -> {m['final_mib']:>8} MiB"
                  f"  {m['growth_pct']:>6} %")  # fmt: skip
        if entry["replaced"] or not entry["measured"]:
            print(
                f"{title:<44} {entry['processes']} processes, {entry['replaced']} replaced in the run"
            )
    print(
        f"{result['requests']} requests, {result['errors']} errors, {result['output_tok_s']} output tok/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

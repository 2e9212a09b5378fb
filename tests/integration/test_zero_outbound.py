"""No part of the stack tries to connect outside the machine: `amalia-serve run` with the repository's
`configs/local.yaml` (what `make run` starts) in a network namespace with only loopback, every process traced
with `strace -f` (connect, plus execve and clones to tell which program made each call), serving a chat; every
connect() goes to loopback or a unix socket.

One exception, and only from Ray's dashboard process: Ray 2.60's usage-statistics module looks up the cloud it
runs on (169.254.169.254:80 and a DNS query for metadata.google.internal) when the dashboard starts, even with
RAY_USAGE_STATS_ENABLED=0 (`UsageStatsHead.run` calls `get_cluster_config_to_report` before it checks the
setting), and no setting turns that off. The serving image skips it with the `~/ray_bootstrap_config.yaml` that
docker/serve.Dockerfile writes: the second run here puts that same file in HOME and allows no exception at all.
A local run cannot skip it without patching Ray or writing into the developer's home. Any other connection
outside loopback, from any process, fails both runs.

Needs root (unshare), strace and iproute2: CI runs as root, and `scripts/install-test-tools.sh` installs both.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "outbound_probe.py"

# strace's rendering of a socket address in connect(fd, {...}, len).
FAMILY = re.compile(r"connect\(\d+, \{sa_family=(AF_[A-Z0-9]+)(.*?)\}, \d+")
INET = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
INET6 = re.compile(r'sin6_port=htons\((\d+)\).*inet_pton\(AF_INET6, "([^"]+)"')


TID = re.compile(r"^(\d+)\s+(.*)$")
EXECVE = re.compile(r'execve\("[^"]*", \[(.*?)\]')
CLONE_CALL = re.compile(r"^(clone3?|fork|vfork)\((.*)")
RETURNED = re.compile(r"= (\d+)$")
# What Ray 2.60's dashboard does at start whatever the settings (see the module docstring).
RAY_DASHBOARD = "ray/dashboard/dashboard.py"
RAY_CLOUD_PROBE_PORTS = {"169.254.169.254": "80"}
DOCKERFILE = ROOT / "docker" / "serve.Dockerfile"
BOOTSTRAP_LINE = re.compile(r"^RUN printf '(.*)' > /home/ray/ray_bootstrap_config\.yaml$", re.MULTILINE)


def image_bootstrap_config() -> str:
    """The ~/ray_bootstrap_config.yaml the serving image writes (docker/serve.Dockerfile)."""
    match = BOOTSTRAP_LINE.search(DOCKERFILE.read_text(encoding="utf-8"))
    assert match is not None, f"{DOCKERFILE} no longer writes ~/ray_bootstrap_config.yaml"
    return match.group(1).replace("\\n", "\n")


def connect_targets(trace: str) -> list[str]:
    """`family address:port` of every connect() in an strace log (the unix path for AF_UNIX)."""
    return [target for _, target in connects_by_program(trace)]


def connects_by_program(trace: str) -> list[tuple[str, str]]:
    """(program, target) of every connect() in an `strace -f` log of connect, execve and the clones: the program
    is the argv of the process the calling thread belongs to, as its last execve set it ('' if unseen)."""
    process_of: dict[int, int] = {}  # thread id -> id of its process (its first thread)
    argv_of: dict[int, str] = {}  # process id -> argv
    pending: dict[int, tuple[str, str]] = {}  # thread id -> (call, arguments) of an unfinished clone or execve
    # A new thread may log calls before its parent's clone() returns in the log (a busy machine reorders them), so
    # who made whom is read first: a thread first seen is then placed at once.
    made_by = _clone_parents(trace)
    found = []
    for line in trace.splitlines():
        match = TID.match(line)
        if match is None:
            continue
        tid, call = int(match.group(1)), match.group(2)
        if tid not in process_of and tid in made_by:
            parent, is_thread = made_by[tid]
            parent_process = process_of.setdefault(parent, parent)
            process_of[tid] = parent_process if is_thread else tid
            if not is_thread:
                argv_of.setdefault(tid, argv_of.get(parent_process, ""))
        process = process_of.setdefault(tid, tid)
        if call.startswith("<..."):  # "<... clone3 resumed>...": the rest of an unfinished call
            if tid not in pending:
                continue
            name, arguments = pending.pop(tid)
            call = f"{name}({arguments}{call.split('resumed>', 1)[1]}"
        elif call.endswith("<unfinished ...>"):
            head = CLONE_CALL.match(call) or (re.match(r"^(execve)\((.*)", call))
            if head is not None:
                pending[tid] = (head.group(1), head.group(2).removesuffix("<unfinished ...>"))
            if not call.startswith("connect("):
                continue
        clone = CLONE_CALL.match(call)
        returned = RETURNED.search(call)
        if clone is not None and returned is not None:
            child = int(returned.group(1))
            if "CLONE_THREAD" in clone.group(2):
                process_of[child] = process
            elif child not in process_of:
                process_of[child] = child
                argv_of[child] = argv_of.get(process, "")
        elif call.startswith("execve(") and call.rstrip().endswith("= 0"):
            argv = EXECVE.search(call)
            argv_of[process] = argv.group(1) if argv else ""
        elif call.startswith("connect("):
            target = _connect_target(call)
            if target is not None:
                found.append((argv_of.get(process, ""), target))
    return found


def _clone_parents(trace: str) -> dict[int, tuple[int, bool]]:
    """Child id -> (the thread that cloned it, whether it is a thread), from every clone that returned."""
    parents: dict[int, tuple[int, bool]] = {}
    unfinished: dict[int, str] = {}  # thread id -> arguments of its unfinished clone
    for line in trace.splitlines():
        match = TID.match(line)
        if match is None:
            continue
        tid, call = int(match.group(1)), match.group(2)
        clone = CLONE_CALL.match(call)
        if clone is not None and call.endswith("<unfinished ...>"):
            unfinished[tid] = clone.group(2)
            continue
        if clone is not None:
            arguments = clone.group(2)
        elif call.startswith("<... clone") and tid in unfinished:
            arguments = unfinished.pop(tid) + call
        else:
            continue
        returned = RETURNED.search(call)
        if returned is not None:
            parents[int(returned.group(1))] = (tid, "CLONE_THREAD" in arguments)
    return parents


def _connect_target(call: str) -> str | None:
    match = FAMILY.search(call)
    if match is None:
        return None
    family, rest = match.groups()
    address = INET.search(rest) if family == "AF_INET" else INET6.search(rest) if family == "AF_INET6" else None
    if address is not None:
        port, host = address.groups()
        return f"{family} {host}:{port}"
    return f"{family} {rest.strip(', ')}"


def is_rays_cloud_probe(program: str, target: str) -> bool:
    """Ray's dashboard looking up its cloud: 169.254.169.254:80 or a DNS query."""
    host, _, port = target.partition(" ")[2].rpartition(":")
    return RAY_DASHBOARD in program and (RAY_CLOUD_PROBE_PORTS.get(host) == port or port == "53")


def is_local(target: str) -> bool:
    """Loopback, a unix socket, or AF_UNSPEC (which dissolves a UDP socket's association: no connection)."""
    family, _, address = target.partition(" ")
    if family in ("AF_UNIX", "AF_UNSPEC", "AF_NETLINK"):
        return True
    if family not in ("AF_INET", "AF_INET6"):
        return False
    host = address.rsplit(":", 1)[0]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_connect_targets_parse_every_family_strace_prints() -> None:
    trace = (
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1 '
        "ENETUNREACH (Network is unreachable)\n"
        '13 connect(7, {sa_family=AF_INET6, sin6_port=htons(8000), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, '
        '"::1", &sin6_addr), sin6_scope_id=0}, 28) = 0\n'
        '14 connect(3, {sa_family=AF_UNIX, sun_path="/tmp/ray/session/sockets/raylet"}, 110) = 0\n'
        '15 connect(9, {sa_family=AF_UNSPEC, sa_data="\\0\\0"}, 16) = 0\n'
        '16 connect(4, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
    )
    targets = connect_targets(trace)
    assert targets[0] == "AF_INET 169.254.169.254:80" and targets[1] == "AF_INET6 ::1:8000"
    assert [is_local(t) for t in targets] == [False, True, True, True, True]


def test_connects_are_attributed_to_the_program_of_their_process_across_threads_and_forks() -> None:
    dashboard = '"python3", "-u", "/venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py"'
    trace = (
        '10 execve("/venv/bin/python3", ["amalia-serve", "run"], 0x7ff /* 9 vars */) = 0\n'
        "10 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD, child_tidptr=0x7f) = 20\n"
        f'20 execve("/venv/bin/python3", [{dashboard}], 0x7ff /* 9 vars */ <unfinished ...>\n'
        "10 clone3({flags=CLONE_VM|CLONE_THREAD|CLONE_SIGHAND, child_tid=0x7f}, 88 <unfinished ...>\n"
        "20 <... execve resumed>) = 0\n"
        "10 <... clone3 resumed>) = 11\n"
        "20 clone3({flags=CLONE_VM|CLONE_FS|CLONE_THREAD|CLONE_SIGHAND}, 88) = 21\n"
        '21 connect(60, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1 '
        "ENETUNREACH (Network is unreachable)\n"
        '11 connect(7, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.53")}, 16) = -1 '
        "ENETUNREACH (Network is unreachable)\n"
    )  # fmt: skip
    (probe, program), (dns, server) = [(t, p) for p, t in connects_by_program(trace)]
    assert (probe, dns) == ("AF_INET 169.254.169.254:80", "AF_INET 10.0.0.53:53")
    assert is_rays_cloud_probe(program, probe)
    assert server == '"amalia-serve", "run"' and not is_rays_cloud_probe(server, dns)


def test_connect_of_a_thread_logged_before_its_clone_returns_is_attributed_to_its_process() -> None:
    trace = (
        '10 execve("/venv/bin/python3", ["amalia-serve", "run"], 0x7ff /* 9 vars */) = 0\n'
        "10 clone3({flags=CLONE_VM|CLONE_THREAD|CLONE_SIGHAND, child_tid=0x7f}, 88 <unfinished ...>\n"
        '11 connect(7, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
        "10 <... clone3 resumed>) = 11\n"
    )
    assert connects_by_program(trace) == [('"amalia-serve", "run"', "AF_INET 127.0.0.1:8000")]


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -n needs root (CI runs as root)")
@pytest.mark.skipif(not (shutil.which("strace") and shutil.which("ip") and shutil.which("unshare")),
                    reason="needs strace, iproute2 and util-linux: scripts/install-test-tools.sh")  # fmt: skip
@pytest.mark.parametrize("home", ["developer", "image"])
def test_make_run_stack_connects_only_to_loopback_when_serving_a_chat(
    demo_checkpoints: tuple[Path, Path], tmp_path: Path, home: str
) -> None:
    models = tmp_path / ".models"  # configs/local.yaml names its checkpoints relative to the working directory
    models.mkdir()
    for checkpoint in demo_checkpoints:
        (models / checkpoint.name).symlink_to(checkpoint)
    env = dict(os.environ)
    if home == "image":  # the HOME of the serving image's `ray` user, as far as Ray's dashboard reads it
        env["HOME"] = str(tmp_path / "home")
        Path(env["HOME"]).mkdir()
        (Path(env["HOME"]) / "ray_bootstrap_config.yaml").write_text(image_bootstrap_config(), encoding="utf-8")
    log = tmp_path / "connect.trace"
    probe = subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, str(PROBE), "--trace", str(log), "--config", str(ROOT / "configs" / "local.yaml"),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=420, check=False, env=env,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["chat_status"] == 200, result
    assert json.loads(result["chat_body"])["usage"]["completion_tokens"] >= 1

    calls = connects_by_program(log.read_text())
    assert any(t.startswith("AF_INET") for _, t in calls), "the trace saw no TCP connection: strace missed the stack"
    outside = sorted({(program, t) for program, t in calls if not is_local(t)})
    print(f"\n{len(calls)} connect() calls; outside loopback: {[(p[-120:], t) for p, t in outside]}")
    assert all(program for program, _ in calls), "a connect() from a process whose program the trace did not see"
    allowed = is_rays_cloud_probe if home == "developer" else (lambda program, target: False)
    unexpected = [(program, t) for program, t in outside if not allowed(program, t)]
    assert unexpected == [], f"connections attempted outside loopback: {unexpected}"

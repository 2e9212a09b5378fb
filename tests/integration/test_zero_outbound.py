"""No part of the stack tries to connect outside the machine: `amalia-serve run` with the repository's
`configs/local.yaml` (what `make run` starts) in a network namespace with only loopback, every process traced
with `strace -f -e trace=connect`, serving a chat; every connect() goes to loopback or a unix socket.

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "outbound_probe.py"

# strace's rendering of a socket address in connect(fd, {...}, len).
FAMILY = re.compile(r"connect\(\d+, \{sa_family=(AF_[A-Z0-9]+)(.*?)\}, \d+")
INET = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
INET6 = re.compile(r'sin6_port=htons\((\d+)\).*inet_pton\(AF_INET6, "([^"]+)"')


def connect_targets(trace: str) -> list[str]:
    """`family address:port` of every connect() in an strace log (the unix path for AF_UNIX)."""
    targets = []
    for line in trace.splitlines():
        match = FAMILY.search(line)
        if match is None:
            continue
        family, rest = match.groups()
        address = INET.search(rest) if family == "AF_INET" else INET6.search(rest) if family == "AF_INET6" else None
        if address is not None:
            port, host = address.groups()
            targets.append(f"{family} {host}:{port}")
        else:
            targets.append(f"{family} {rest.strip(', ')}")
    return targets


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


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -n needs root (CI runs as root)")
@pytest.mark.skipif(not (shutil.which("strace") and shutil.which("ip") and shutil.which("unshare")),
                    reason="needs strace, iproute2 and util-linux: scripts/install-test-tools.sh")  # fmt: skip
def test_make_run_stack_connects_only_to_loopback_when_serving_a_chat(
    demo_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    models = tmp_path / ".models"  # configs/local.yaml names its checkpoints relative to the working directory
    models.mkdir()
    for checkpoint in demo_checkpoints:
        (models / checkpoint.name).symlink_to(checkpoint)
    log = tmp_path / "connect.trace"
    probe = subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, str(PROBE), "--trace", str(log), "--config", str(ROOT / "configs" / "local.yaml"),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=840, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["chat_status"] == 200, result
    assert json.loads(result["chat_body"])["usage"]["completion_tokens"] >= 1

    targets = connect_targets(log.read_text())
    assert any(t.startswith("AF_INET") for t in targets), "the trace saw no TCP connection: strace missed the stack"
    outside = sorted({t for t in targets if not is_local(t)})
    print(f"\n{len(targets)} connect() calls, {len(outside)} distinct targets outside loopback: {outside}")
    assert outside == [], f"connections attempted outside loopback: {outside}"

"""vLLM's CPU worker gets AMX's tile state from Linux before its bf16 kernels run (SIGILL otherwise)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from amalia_serve.amx_permission import cpu_advertises_amx

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_amx_is_read_from_the_cpuinfo_flags_line_only() -> None:
    assert cpu_advertises_amx(SAPPHIRE_RAPIDS)
    assert not cpu_advertises_amx(EPYC)
    assert not cpu_advertises_amx("model name\t: amx_tile lookalike\n")
    assert not cpu_advertises_amx("")


def test_vllm_finds_the_permission_request_among_its_general_plugins() -> None:
    # vLLM loads this group in its front end, engine core and every worker process.
    values = {entry.value for entry in entry_points(group="vllm.general_plugins")}
    assert "amalia_serve.amx_permission:request_amx_permission" in values


def test_a_fresh_process_gets_amx_exactly_when_the_cpu_has_it() -> None:
    # A fresh interpreter: permission is per process, and this one may already hold it.
    script = (
        "from amalia_serve.amx_permission import amx_permitted, request_amx_permission\n"
        "before = amx_permitted()\n"
        "request_amx_permission()\n"
        "print(before, amx_permitted())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    has_amx = cpu_advertises_amx(Path("/proc/cpuinfo").read_text())
    assert result.stdout.split() == ["False", str(has_amx)], result.stderr

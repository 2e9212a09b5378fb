"""Ask Linux for the AMX tile state before vLLM's CPU kernels use it.

On x86 Linux a process must request AMX's large register state (arch_prctl ARCH_REQ_XCOMP_PERM) before its
first AMX instruction, or the kernel kills it with SIGILL. vLLM's CPU build picks its AMX attention and GEMM
kernels whenever the CPU advertises AMX and the dtype is bf16, but nothing in its model worker asks for the
permission, and a spawned process does not inherit it: on a Sapphire Rapids host the worker dies with exit code
-4 on its first forward pass. vLLM loads the `vllm.general_plugins` entry point in every process it starts
(front end, engine core, workers), so this module is registered there (pyproject.toml) and asks once per
process. Standard library only: it runs in each of those processes before the model loads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

# From the kernel's arch/x86/include/uapi/asm/prctl.h and asm/fpu/types.h.
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def cpu_advertises_amx(cpuinfo: str) -> bool:
    """Whether the first `flags` line of /proc/cpuinfo names AMX's tile feature."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "amx_tile" in line.split(":", 1)[-1].split()
    return False


def _arch_prctl(code: int, arg: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, code, arg) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def amx_permitted() -> bool:
    """Whether this process may already use AMX's tile data."""
    mask = ctypes.c_ulong(0)
    try:
        _arch_prctl(_ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
    except OSError:
        return False
    return bool(mask.value & (1 << _XFEATURE_XTILEDATA))


def request_amx_permission() -> None:
    """vLLM plugin entry point: grant this process AMX where the CPU has it; a no-op elsewhere."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if not cpu_advertises_amx(cpuinfo):
        return
    try:
        _arch_prctl(_ARCH_REQ_XCOMP_PERM, ctypes.c_ulong(_XFEATURE_XTILEDATA))
    except OSError as error:
        # vLLM will still choose its AMX kernels for bf16 and the worker will die with SIGILL: say why.
        logger.warning(
            "the CPU advertises AMX but the kernel refused it (%s); vLLM's bf16 CPU kernels will fail, "
            "serve this variant with engine.dtype: float32",
            error,
        )

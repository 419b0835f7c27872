"""Back the agent's memory with transparent huge pages, by restarting it with glibc's tunable.

Every decoded token reads all the weights (90 MB for SmolLM2 int4), so the agent is bound by
memory and, with 4 KiB pages, by TLB misses. With glibc's ``glibc.malloc.hugetlb=1`` (glibc
2.35+) malloc asks the kernel for transparent huge pages (``madvise``), which Debian and most
distributions enable on request; onnxruntime's weight buffers then sit in 2 MiB pages.
Measured on 2 cores: batch-1 decode through the agent 3-4 % faster, RSS unchanged
(benchmarks/README.md).

glibc reads tunables only when a process starts, so the agent command re-executes itself once
with the tunable added to ``GLIBC_TUNABLES``. ``EDGEGEN_HUGEPAGES=0`` turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path, PurePath
from typing import Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Options of `edgegen` itself (cli/main.py) that take a value: the value is not the command.
EDGEGEN_OPTIONS_WITH_VALUE = ("--log-level",)


def started_as_agent(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (``sys.argv``) runs the `edgegen agent` command: the program is the
    ``edgegen`` script or ``python -m cli.main``, and its first argument that is neither an
    option of edgegen's nor an option's value is ``agent``. Not a test runner that drives the
    CLI in-process (re-executing it would rerun the tests), nor ``agent`` as a value
    (``edgegen up --bundle agent``)."""
    if not argv or not _is_edgegen(argv[0]):
        return False
    args = iter(argv[1:])
    for arg in args:
        if arg in EDGEGEN_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg == "agent"
    return False


def _is_edgegen(program: str) -> bool:
    """The console script, or cli/main.py (what ``sys.argv[0]`` is under ``-m cli.main``)."""
    path = PurePath(program)
    return path.name == "edgegen" or path.parts[-2:] == ("cli", "main.py")


def wanted() -> bool:
    """Whether this process should restart with the tunable: Linux, glibc >= 2.35, THP not
    disabled, not already set, not turned off."""
    if os.environ.get("EDGEGEN_HUGEPAGES", "1") == "0" or sys.platform != "linux":
        return False
    if TUNABLE.split("=")[0] in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _glibc_235():
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _glibc_235() -> bool:
    libc, version = platform.libc_ver()
    try:
        return libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def reexec_with_hugepages() -> None:
    """Replace this process with the same command line plus the tunable (no return), if wanted.
    Only for a process started as `edgegen agent` (see :func:`started_as_agent`)."""
    if not started_as_agent(sys.argv) or not wanted():
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})

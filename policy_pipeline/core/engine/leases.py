"""Per-policy leases: only the run holding a policy's lease works on it.

A run acquires every policy's lease as it starts, renews what it holds every third of the TTL
(its heartbeat: a crashed run's policies are free within the TTL), releases each policy as it
finishes with it, and retries the ones another run holds: it takes over at once the leases of
a holder known to be gone, and gives up on the rest after `LeasePolicy.wait_seconds`. Only the
writer thread uses this.

Serves all three workflow assets: a policy is leased for the whole of its way through a run,
whatever its steps.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policy_pipeline.core.engine.run_state import Logger, Track
from policy_pipeline.core.liveness import Holder
from policy_pipeline.core.store.state_store import StateStore


@dataclass(frozen=True)
class LeasePolicy:
    """A run renews its leases every third of the TTL, so a crashed run's policies are free
    within the TTL; a holder known to be gone (``holder_gone``) is taken over at once."""

    ttl_seconds: int = 30
    wait_seconds: float = 60.0


def holder_certainly_gone(owner: str) -> bool:
    """Whether a lease holder has certainly stopped (a finished run, a process gone)."""
    return Holder.parse(owner).certainly_dead()


class Leases:
    """One run's leases: those it holds, those it waits for, and when to renew or retry."""

    def __init__(
        self,
        store: StateStore,
        owner: str,
        policy: LeasePolicy,
        holder_gone: Callable[[str], bool],
        log: Logger,
    ) -> None:
        self.store = store
        self.owner = owner
        self.policy = policy
        self.holder_gone = holder_gone
        self.log = log
        self.held: set[str] = set()
        self.released: list[str] = []
        self.waiting: dict[str, Track] = {}  # for a lease another run holds
        self.deadline = 0.0
        self.retry_at = 0.0
        self.delay = 0.2
        self.renew_at = 0.0

    def acquire(self, names: Sequence[str], tracks: dict[str, Track]) -> list[Track]:
        """At the run's start: claim the policies' leases. Returns the tracks held; the others
        wait for their lease."""
        self.held = self.store.acquire_leases(names, self.owner, self.policy.ttl_seconds)
        now = time.monotonic()  # the timers count from the moment the leases were granted
        self.renew_at = now + self.policy.ttl_seconds / 3
        self.waiting = {n: t for n, t in tracks.items() if n not in self.held}
        self.deadline = now + self.policy.wait_seconds
        self.retry_at = now + self.delay
        return [t for n, t in tracks.items() if n in self.held]

    def retry_due(self, now: float) -> bool:
        return bool(self.waiting) and now >= self.retry_at

    def timer_due(self, now: float) -> bool:
        return self.retry_due(now) or (bool(self.held) and now >= self.renew_at)

    def next_timer(self) -> float:
        timers = [self.renew_at if self.held else math.inf]
        if self.waiting:
            timers.append(self.retry_at)
        return min(timers)

    def retry(
        self,
        enter: Callable[[list[Track]], None],
        give_up: Callable[[list[tuple[Track, str]]], None],
    ) -> None:
        """Policies another run holds: take over a finished run's leases, claim the free
        ones, and ``enter`` those; ``give_up`` on the rest after the lease wait."""
        store, owner, ttl = self.store, self.owner, self.policy.ttl_seconds
        waiting = sorted(self.waiting)
        holders = store.lease_holders(waiting)
        for previous in {holder for holder, _until in holders.values()}:
            # A run that has finished, or whose process is gone, holds nothing: take its
            # policies over at once.
            if previous != owner and self.holder_gone(previous):
                taken = [n for n, (holder, _u) in holders.items() if holder == previous]
                self.log.warning(f"taking over {len(taken)} leases of {previous}")
                store.take_over_leases(taken, owner, previous, ttl)
        got = store.acquire_leases(waiting, owner, ttl)
        self.held |= got
        late = [self.waiting.pop(name) for name in waiting if name in got]
        enter(late)
        now = time.monotonic()
        if now > self.deadline and self.waiting:
            holders = store.lease_holders(sorted(self.waiting))
            refused = []
            for name, track in sorted(self.waiting.items()):
                holder = holders.get(name)
                who = f"{holder[0]} (until {holder[1]})" if holder else "another run"
                refused.append((track, f"the policy is being processed by {who}; try again later"))
            give_up(refused)
            self.waiting.clear()
        self.delay = min(self.delay * 2, 5.0)
        self.retry_at = now + self.delay * (0.5 + random.random())

    def finished(self, name: str) -> None:
        """The run is done with this policy: another run may take it from the next write."""
        if name in self.held:
            self.released.append(name)

    def write(self, now: float) -> None:
        """In each batch of writes: release the finished policies, renew the rest when due."""
        if self.released:
            self.store.release_leases(self.released, self.owner)
            self.held.difference_update(self.released)
            self.released = []
        if self.held and now >= self.renew_at:
            self.store.renew_leases(sorted(self.held), self.owner, self.policy.ttl_seconds)
            self.renew_at = now + self.policy.ttl_seconds / 3

    def release_all(self) -> None:
        """At the run's end, whatever happened."""
        self.store.release_leases([*self.held], self.owner)

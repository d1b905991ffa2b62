"""Per-policy leases: only the run holding a policy's lease works on it.

A run acquires every policy's lease as it starts, renews what it holds every third of the TTL
(its heartbeat: a crashed run's policies are free within the TTL), releases each policy as it
finishes with it, and retries the ones another run holds: it takes over at once the leases of
a holder known to be gone, and gives up on the rest after `LeaseSettings.wait_seconds`.

Fencing: each held policy's track knows until when its lease is surely the run's own
(`Track.lease_until`: when the last confirming statement was sent, plus the TTL, minus a
safety margin). No call starts past it (`driver.py` parks the call until a renewal
confirms the lease again, or stops the policy when a renewal says it is gone), so a run whose
renewals cannot reach the warehouse stops calling the API before another run may take over.
Only the writer thread uses this class; it sets ``lease_until`` with the run's lock held.

Serves all three workflow assets: a policy is leased for the whole of its way through a run,
whatever its steps.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence

from policy_pipeline.core.engine.effects import Logger, Track
from policy_pipeline.core.settings import LeaseSettings
from policy_pipeline.core.store.state_store import StateStore


class Leases:
    """One run's leases: those it holds, those it waits for, and when to renew or retry."""

    def __init__(
        self,
        store: StateStore,
        owner: str,
        settings: LeaseSettings,
        holder_gone: Callable[[str], bool],
        log: Logger,
        changed: threading.Condition,
    ) -> None:
        self.store = store
        self.owner = owner
        self.settings = settings
        self.holder_gone = holder_gone
        self.log = log
        self.changed = changed  # the run's lock: the workers read ``Track.lease_until``
        self.tracks: dict[str, Track] = {}
        self.held: set[str] = set()
        self.released: list[str] = []
        self.waiting: dict[str, Track] = {}  # for a lease another run holds
        self.deadline = 0.0
        self.retry_at = 0.0
        self.delay = 0.2
        self.renew_at = math.inf

    def acquire(self, names: Sequence[str], tracks: dict[str, Track]) -> list[Track]:
        """At the run's start: claim the policies' leases. Returns the tracks held; the others
        wait for their lease."""
        self.tracks = dict(tracks)
        sent = time.monotonic()
        self.held = self.store.acquire_leases(names, self.owner, self.settings.ttl_seconds)
        self._confirmed(self.held, sent)
        now = time.monotonic()
        self.waiting = {n: t for n, t in tracks.items() if n not in self.held}
        self.deadline = now + self.settings.wait_seconds
        self.retry_at = now + self.delay
        return [t for n, t in tracks.items() if n in self.held]

    def _confirmed(self, names: set[str], sent: float) -> None:
        """The warehouse granted or renewed these leases with a statement sent at ``sent``:
        calls for them may start until the fence."""
        if not names:
            return
        until = sent + self.settings.fence_seconds
        with self.changed:
            for name in names:
                self.tracks[name].lease_until = until
        self.renew_at = min(self.renew_at, sent + self.settings.renew_seconds)

    def retry_due(self, now: float) -> bool:
        return bool(self.waiting) and now >= self.retry_at

    def renewal_due(self, now: float) -> bool:
        return bool(self.held) and now >= self.renew_at

    def timer_due(self, now: float) -> bool:
        return self.retry_due(now) or self.renewal_due(now)

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
        store, owner, ttl = self.store, self.owner, self.settings.ttl_seconds
        waiting = sorted(self.waiting)
        holders = store.lease_holders(waiting)
        for previous in {holder for holder, _until in holders.values()}:
            # A run that has finished, or whose process is gone, holds nothing: take its
            # policies over at once.
            if previous != owner and self.holder_gone(previous):
                taken = [n for n, (holder, _u) in holders.items() if holder == previous]
                self.log.warning(f"taking over {len(taken)} leases of {previous}")
                store.take_over_leases(taken, owner, previous, ttl)
        sent = time.monotonic()
        got = store.acquire_leases(waiting, owner, ttl)
        self.held |= got
        self._confirmed(got, sent)
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

    def renew(self) -> set[str]:
        """Renew every held lease; returns the ones the warehouse did not confirm (another run
        acquired them after a lapse): the run no longer holds them and stops working on those
        policies. Raises when the warehouse cannot be reached; the renewal stays due."""
        if not self.held:
            return set()
        sent = time.monotonic()
        confirmed = self.store.renew_leases(
            sorted(self.held), self.owner, self.settings.ttl_seconds
        )
        self.renew_at = math.inf
        lost = self.held - confirmed
        self.held = confirmed
        self._confirmed(confirmed, sent)
        if lost:
            with self.changed:
                for name in lost:
                    self.tracks[name].lease_until = 0.0
        return lost

    def release(self) -> None:
        """Release the policies the run has finished with: another run may take them."""
        if self.released:
            self.store.release_leases(self.released, self.owner)
            self.held.difference_update(self.released)
            self.released = []

    def release_all(self) -> None:
        """At the run's end, whatever happened."""
        self.store.release_leases([*self.held], self.owner)

"""The call workers of one engine run and the queue they take calls from.

At most ``max_concurrency`` API calls are in flight for the whole run: each worker takes whichever
call is due next, most urgent kind first (circuit > poll > create), makes it outside the lock,
and hands the answer to the rules of the step that asked for it. A call whose policy's lease is
past its fence (`Track.lease_until`, `leases.py`) does not start: it is parked until the
writer's next renewal confirms the lease (then it goes on) or says it is gone (then the run
stops that policy). The writer (the thread that called `PolicyWorkflow.run`) is in
`workflow.py`.

Serves all three workflow assets: ``create`` calls are ``policy_created``'s, ``poll`` calls
``policy_ready``'s, ``circuit`` calls ``circuit_breaker_activation``'s.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Mapping
from typing import Protocol

from policy_pipeline.core.engine.auditing import LeaseFenced
from policy_pipeline.core.engine.guard import ApiGuard
from policy_pipeline.core.engine.run_state import Track
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError

# The kinds of call, most urgent first (see `Scheduler._next_due`).
CALL_ORDER = ("circuit", "poll", "create")


class CallRules(Protocol):
    """A step's side of its kind of call."""

    def request(self, track: Track) -> ApiResponse:
        """Make the call (in a worker, without the lock held)."""
        ...

    def answer(self, track: Track, response: ApiResponse | PolicyApiError) -> None:
        """What the answer means (with the lock held)."""
        ...


class Scheduler:
    """The due calls by kind, the workers, and what they share with the writer: all of it
    under ``changed``, the condition the writer waits on too."""

    def __init__(
        self,
        changed: threading.Condition,
        stop: threading.Event,
        guard: ApiGuard | None,
        calls: Mapping[str, CallRules],
    ) -> None:
        self.changed = changed
        self.stop = stop
        self.guard = guard
        self.calls = calls  # kind of call -> the rules of the step that makes it
        # Per kind of call, the calls by due time: (when, seq, track).
        self.due: dict[str, list[tuple[float, int, Track]]] = {call: [] for call in CALL_ORDER}
        self.counter = itertools.count()
        self.in_flight = 0
        # Calls that may not start until a renewal confirms their policy's lease.
        self.parked: list[tuple[str, Track]] = []
        self.closed = False
        self.worker_error: BaseException | None = None

    def workers(self, count: int) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._work, name=f"policy-call-{i}", daemon=True)
            for i in range(count)
        ]

    def schedule(self, call: str, track: Track, delay: float = 0.0) -> None:
        """Called with ``changed`` held."""
        heapq.heappush(self.due[call], (time.monotonic() + delay, next(self.counter), track))
        self.changed.notify_all()  # the writer waits on the same condition

    def unpark(self, lost: set[str]) -> list[Track]:
        """After a renewal: the parked calls whose lease it confirmed are due now; returns the
        tracks of those whose lease is gone (the run stops them). Called with ``changed``
        held."""
        parked, self.parked = self.parked, []
        now = time.monotonic()
        stopped = []
        for call, track in parked:
            if track.name in lost:
                stopped.append(track)
            elif now < track.lease_until:
                self.schedule(call, track)
            else:
                self.parked.append((call, track))
        return stopped

    def close(self) -> None:
        """No call starts from now on; the workers return once their call is answered."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def _work(self) -> None:
        """One worker: make whichever call is due next, until the run closes."""
        try:
            while True:
                with self.changed:
                    while self.stop.is_set() or (next_call := self._next_due()) is None:
                        if self.closed:
                            return
                        waits = [queue[0][0] for queue in self.due.values() if queue]
                        self.changed.wait(
                            max(0.0, min(waits) - time.monotonic()) if waits else None
                        )
                    if self.closed:
                        return
                    call, track = next_call
                    self.in_flight += 1
                rules = self.calls[call]
                response = self._guarded(rules, track)
                with self.changed:
                    self.in_flight -= 1
                    if isinstance(response, LeaseFenced):
                        self.parked.append((call, track))  # its retries stopped at the fence
                    else:
                        rules.answer(track, response)
                    self.changed.notify_all()
        except BaseException as exc:  # a bug: fail the run rather than hang it
            with self.changed:
                self.worker_error = self.worker_error or exc
                self.changed.notify_all()

    def _next_due(self) -> tuple[str, Track] | None:
        """The most urgent call that is due: one that finishes a policy before one that moves
        it on, before one that starts a new policy. When the API's limit is the bottleneck,
        ready policies get their circuit breaker first and new ones wait their turn."""
        now = time.monotonic()
        for call in CALL_ORDER:
            queue = self.due[call]
            while queue and queue[0][0] <= now:
                track = heapq.heappop(queue)[2]
                if not track.steps:
                    continue  # stopped meanwhile (its lease was lost)
                if now < track.lease_until:
                    return call, track
                self.parked.append((call, track))
                self.changed.notify_all()  # the writer renews (or stops) parked policies
        return None

    def _guarded(self, rules: CallRules, track: Track) -> ApiResponse | PolicyApiError:
        try:
            if self.guard is not None:
                self.guard.before_call()  # raises GuardOpen (a PolicyApiError): no call made
            return rules.request(track)
        except PolicyApiError as exc:
            return exc

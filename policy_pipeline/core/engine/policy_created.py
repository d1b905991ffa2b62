"""The rules of the ``policy_created`` asset (step 1): create each policy at the Policy API.

Which policies need a create (and which are done, resumed or refused), the intent committed
before the call, the ``POST /createpolicy`` call with the execution's idempotency key, what its
answer means, and the conditional ``policy_created`` write that binds one policy_id to one
execution. The run (`workflow.py`) calls these; the workers (`scheduling.py`) call
`request` and `answer` for each ``"create"`` call.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from policy_pipeline.core.domain import (
    ACTIVE_STATUSES,
    STEP_CIRCUIT,
    STEP_CREATE,
    ExecutionStatus,
    PolicyDefinition,
)
from policy_pipeline.core.engine.run_state import (
    Created,
    Failure,
    RunContext,
    Track,
    excerpt,
    refusal,
)
from policy_pipeline.core.failpoints import failpoint
from policy_pipeline.core.policy_api_types import ApiResponse, PolicyApiError, json_value_kind
from policy_pipeline.core.store.schema import STATE
from policy_pipeline.core.store.state_store import MAX_DETAIL_CHARS, ExecutionRow

# A policy_id goes into a URL path and into the state table: an identifier, nothing else.
POLICY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Why an execution is retired (the ``reason`` of its ``retired`` audit event).
_SUPERSEDED = "superseded"
_DELETED = "catalog_file_deleted"


class PolicyCreatedStep:
    """Step 1 for every policy of one run."""

    call = "create"

    def __init__(
        self,
        run: RunContext,
        definitions: Mapping[str, PolicyDefinition],
        force_new: bool,
        recreate_failed: bool,
    ) -> None:
        self.run = run
        self.definitions = definitions
        self.force_new = force_new
        self.recreate_failed = recreate_failed
        self.bodies: dict[str, Any] = {}  # stored create bodies of resumed intents
        # Completed executions by policy and content hash, archived ones included.
        self.completed: dict[str, dict[str, ExecutionRow]] = {}
        # Executions to retire before their policy's new intent is written (by the writer, in
        # `write_intents`), and why (_SUPERSEDED or _DELETED).
        self.retiring: dict[str, tuple[ExecutionRow, str]] = {}

    def read(self, tracks: list[Track], current: dict[str, ExecutionRow]) -> None:
        """What `begin` needs to know beyond the current executions, read by the writer as
        the policies enter the run (without ``changed`` held)."""
        store = self.run.store
        if STEP_CREATE in self.run.steps and not self.force_new:
            for done in store.completed_executions([t.name for t in tracks]):
                if done.policy_content_hash is not None:
                    by_hash = self.completed.setdefault(done.policy_name, {})
                    by_hash.setdefault(done.policy_content_hash, done)
        if STEP_CREATE in self.run.steps:
            # A resumed intent re-sends exactly the body it stored.
            pending = [
                r.execution_id for r in current.values() if r.status is ExecutionStatus.PENDING
            ]
            self.bodies.update(store.policy_data(pending) if pending else {})

    # The methods below are called with ``changed`` held, except the writes and `request`.

    def begin(self, track: Track, claims: list[Track]) -> None:
        """Pass it at once if this content already completed; refuse a failed policy to an
        automatic retry; otherwise record an intent, or re-send a recorded one. An active
        execution of other content is superseded (`_supersede`); a policy no longer in the
        catalog goes on only from what its execution stored (`_without_definition`)."""
        run, step, row = self.run, track.steps[0], track.row
        definition = self.definitions.get(track.name)
        if definition is None:
            self._without_definition(track, claims)
            return
        digest = definition.content_hash()
        if (
            row is not None
            and row.status in ACTIVE_STATUSES
            and row.policy_content_hash is not None
            and row.policy_content_hash != digest
        ):
            self._supersede(track, row, digest, claims)
            return
        if (
            row is not None
            and row.status is ExecutionStatus.COMPLETED
            and not self.force_new
            and row.policy_content_hash == definition.content_hash()
        ):
            run.detail(f"policy '{track.name}': this content completed as {row.policy_id}")
            run.passed(track, "already completed for this content", claims)
        elif (
            (row is None or row.status is ExecutionStatus.COMPLETED)
            and not self.force_new
            and definition.content_hash() in self.completed.get(track.name, {})
        ):
            # Completed before, and archived since (or superseded by other content that
            # has now come back): still one policy per content.
            track.row = self.completed[track.name][definition.content_hash()]
            run.detail(
                f"policy '{track.name}': this content completed as {track.row.policy_id} (archived)"
            )
            run.passed(track, "already completed for this content (archived)", claims)
        elif (
            row is not None
            and row.status is ExecutionStatus.ERROR
            and not self.recreate_failed
            and not self.force_new
            and row.policy_content_hash == definition.content_hash()
        ):
            run.fail(
                track,
                step,
                refusal(row, "an automatic retry does not create a failed policy again"),
            )
        elif row is None or row.status not in ACTIVE_STATUSES:
            track.resumed = False
            run.writes.intents.append(track)
        elif row.status is ExecutionStatus.PENDING:
            # Intent recorded, create never confirmed: re-send it with the same key.
            track.body = self.bodies.get(row.execution_id)
            if isinstance(track.body, dict):
                run.schedule("create", track)
            else:
                problem = "stored policy_data is not a JSON object"
                run.writes.failed.append(Failure(track, problem, STEP_CREATE, False))
        else:
            run.detail(f"policy '{track.name}': resuming {row.execution_id} ({row.status})")
            run.passed(track, "resumed", claims)

    def _supersede(self, track: Track, row: ExecutionRow, digest: str, claims: list[Track]) -> None:
        """The catalog holds other content than the policy's active execution. One not yet
        ready is retired at once and the new content created in the same write
        (`write_intents`); a ready one (its circuit breaker may have started) is finished
        first, so that no ready policy is left half done, and the new content follows in
        this run."""
        run, name = self.run, track.name
        if row.status is not ExecutionStatus.POLICY_READY:
            self.retiring[name] = (row, _SUPERSEDED)
            track.resumed = False
            run.writes.intents.append(track)
            return
        change = _content_change(name, row, digest)
        if STEP_CIRCUIT not in run.steps:
            run.fail(
                track,
                STEP_CREATE,
                f"{change} while execution {row.execution_id} is policy_ready: its circuit "
                "breaker comes first (materialize circuit_breaker_activation), then the new "
                "content is created",
            )
            return
        run.warn(
            track,
            f"{change} after execution {row.execution_id} was ready: finishing it (its circuit "
            "breaker) first, then creating the new content in this run",
        )
        # The old execution goes through the steps after this one, then the policy goes
        # through every chosen step again, now with the new content.
        later = [s for s in run.steps if s != STEP_CREATE]
        track.steps = [STEP_CREATE, *later, *run.steps]
        run.passed(track, f"resumed to finish execution {row.execution_id} first", claims)

    def _completed(self, name: str, digest: str) -> ExecutionRow | None:
        """The completed execution of this content (archived ones included), unless the run
        forces a new execution."""
        return None if self.force_new else self.completed.get(name, {}).get(digest)

    def _without_definition(self, track: Track, claims: list[Track]) -> None:
        """A policy no longer in the catalog (its file was deleted): an execution already
        created goes on from what it stored (polling and the circuit breaker need no
        catalog); an intent whose create was never confirmed is retired; nothing is created."""
        run, row = self.run, track.row
        if row is not None and row.status in (
            ExecutionStatus.POLICY_CREATED,
            ExecutionStatus.POLICY_READY,
        ):
            run.detail(
                f"policy '{track.name}' is not in the catalog any more: execution "
                f"{row.execution_id} goes on from what it stored ({row.status})"
            )
            run.passed(track, "resumed (not in the catalog any more)", claims)
        elif row is not None and row.status is ExecutionStatus.PENDING:
            self.retiring[track.name] = (row, _DELETED)
            run.writes.intents.append(track)
        else:
            run.fail(track, STEP_CREATE, f"policy '{track.name}' is not in the catalog")

    def write_intents(self, tracks: list[Track]) -> None:
        """The original rule: the intent (a ``pending`` execution with its idempotency key) is
        committed before the create call. Executions being replaced are retired first, in
        the same batch, under the policy's lease."""
        run = self.run
        ids = {t.name: str(uuid.uuid4()) for t in tracks if t.name in self.definitions}
        retiring = [t for t in tracks if t.name in self.retiring]
        # One transaction: a crash between the retirement and the new intent leaves neither,
        # so the new content is never lost with the old execution retired.
        with run.store.transaction():
            retired = self._retire(retiring, ids) if retiring else set()
            creating = [
                t
                for t in tracks
                if t.name in ids and (t.name not in self.retiring or t.name in retired)
            ]
            for track in retiring:
                self.retiring.pop(track.name, None)
            if not creating:
                return
            started = run.store.start_executions(
                [self.definitions[t.name] for t in creating], [ids[t.name] for t in creating]
            )
        failpoint("after_intents")
        with run.changed:
            for track, row in zip(creating, started, strict=True):
                track.row = row
                track.body = self.definitions[track.name].payload()
                run.schedule("create", track)

    def _retire(self, tracks: list[Track], new_ids: Mapping[str, str]) -> set[str]:
        """Retire the executions these policies replace (their content changed, or their
        file was deleted, before they were ready); returns the names whose new content is
        to be created now. One that turned ready meanwhile (the progress sensor polled it)
        is finished first instead."""
        run = self.run
        entries: list[tuple[ExecutionRow, str, str, dict[str, Any]]] = []
        for track in tracks:
            row, why = self.retiring[track.name]
            detail: dict[str, Any] = {"reason": why, "content_hash": row.policy_content_hash}
            if why == _SUPERSEDED:
                digest = self.definitions[track.name].content_hash()
                # The new content may have completed before (an edit undone): still one
                # policy per content.
                done = self._completed(track.name, digest)
                carrier = done.execution_id if done is not None else new_ids[track.name]
                error = (
                    f"superseded: {_content_change(track.name, row, digest)} before it was "
                    f"ready; execution {carrier} carries the new content"
                )
                detail.update(new_content_hash=digest, new_execution_id=carrier)
            else:
                error = deleted_before_create(track.name)
            entries.append((row, STEP_CREATE, error, detail))
        after = run.store.retire(entries)
        retired: set[str] = set()
        with run.changed:
            for track, (row, _step, error, _detail) in zip(tracks, entries, strict=True):
                now = after.get(row.execution_id)
                moved = (
                    now is not None
                    and now.status is ExecutionStatus.ERROR
                    and not now.resumable
                    and now.error_message == error[:MAX_DETAIL_CHARS]
                )
                if moved:
                    track.row = now
                    run.log.warning(f"policy '{track.name}': execution {row.execution_id} {error}")
                    name = track.name
                    done = None
                    if name in self.definitions:
                        done = self._completed(name, self.definitions[name].content_hash())
                    if name not in self.definitions:
                        run.fail(
                            track, STEP_CREATE, f"policy '{name}' is not in the catalog: {error}"
                        )
                    elif done is not None:
                        track.row = done
                        run.passed(track, "already completed for this content", run.writes.claims)
                    else:
                        retired.add(name)
                elif (
                    now is not None
                    and now.status is ExecutionStatus.POLICY_READY
                    and track.name in self.definitions
                ):
                    track.row = now
                    digest = self.definitions[track.name].content_hash()
                    self._supersede(track, now, digest, run.writes.claims)
                elif now is None:
                    run.fail(
                        track, STEP_CREATE, f"state row of execution {row.execution_id} is gone"
                    )
                else:
                    track.row = now
                    run.fail(track, STEP_CREATE, refusal(now, "it changed while being retired"))
        return retired

    def request(self, track: Track) -> ApiResponse:
        assert track.row is not None and isinstance(track.body, dict)
        key = track.row.create_idempotency_key or ""
        response = self.run.api.create_policy(
            {**track.body, "execution_id": track.row.execution_id},
            key,
            track.attempt_recorder(self.run.store, self.run.guard),
        )
        failpoint("after_create_call")
        return response

    def answer(self, track: Track, response: ApiResponse | PolicyApiError) -> None:
        writes = self.run.writes
        if isinstance(response, PolicyApiError):
            writes.failed.append(Failure(track, str(response), STEP_CREATE, response.transient))
            return
        if not response.ok:
            problem = f"{response.describe()}: {excerpt(response)}"
            writes.failed.append(
                Failure(track, problem, STEP_CREATE, self.run.refused_credentials(response))
            )
            return
        policy_id = response.field("policy_id")
        if not isinstance(policy_id, str) or not policy_id.strip():
            writes.kept.setdefault("api_response", {})[track] = response.recorded_body
            # An unreadable body may hide a created policy: a later run re-sends the same
            # idempotency key and gets the original answer. JSON without the field is final.
            unreadable = response.data is None
            problem = _missing_field(response, "policy_id")
            writes.failed.append(Failure(track, problem, STEP_CREATE, unreadable))
            return
        invalid = _invalid_policy_id(policy_id)
        if invalid is not None:
            # Refused before it reaches a URL or the table; the whole answer stays in the
            # audit trail (the attempt's event) and in api_response.
            writes.kept.setdefault("api_response", {})[track] = response.recorded_body
            problem = f"{response.describe()} with {invalid}"
            writes.failed.append(Failure(track, problem, STEP_CREATE, False))
            return
        # When this run saw the create answer: the start of its grace for a 404 on the first
        # polls (an eventually consistent API may not show a new policy at once).
        track.created_answer_at = time.monotonic()
        writes.created.append(Created(track, policy_id, response.recorded_body))

    def write_created(self, created: list[Created], claims: list[Track]) -> None:
        # One policy_id per execution: within this batch the first keeps it; against the
        # table, the conditional update refuses a policy_id another execution holds.
        run = self.run
        first: dict[str, Track] = {}
        unique = [c for c in created if first.setdefault(c.policy_id, c.track) is c.track]
        after = run.store.mark_created([(c.track.execution, c.policy_id, c.body) for c in unique])
        failpoint("after_created")
        refused = {
            c.policy_id
            for c in created
            if after.get(c.track.execution.execution_id) is None
            or after[c.track.execution.execution_id].policy_id != c.policy_id
        }
        holders = run.store.policy_id_holders(sorted(refused)) if refused else {}
        with run.changed:
            for track, policy_id in ((c.track, c.policy_id) for c in created):
                assert track.row is not None
                # The original "verify database storage" before going on.
                stored = after.get(track.row.execution_id)
                others = [
                    (e, n) for e, n in holders.get(policy_id, []) if e != track.row.execution_id
                ]
                if first[policy_id] is not track:
                    others.append((first[policy_id].execution.execution_id, first[policy_id].name))
                if others and (stored is None or stored.policy_id != policy_id):
                    execution, name = others[0]
                    error = (
                        f"POST /createpolicy returned policy_id {policy_id}, which is already "
                        f"bound to execution {execution} (policy '{name}'): the Policy API "
                        "handed one policy_id to two creates (does it ignore Idempotency-Key?); "
                        "refused before any circuit breaker"
                    )
                    run.log.warning(f"policy '{track.name}': {error}")
                    run.writes.failed.append(Failure(track, error, STEP_CREATE, False))
                    continue
                if stored is None or stored.policy_id != policy_id:
                    run.fail(
                        track,
                        STEP_CREATE,
                        f"state row for execution {track.row.execution_id} does not hold "
                        f"policy_id {policy_id} after the write",
                    )
                    continue
                track.row = stored
                run.detail(f"policy '{track.name}': created {policy_id}")
                run.passed(track, f"created {policy_id}", claims)


def deleted_before_create(name: str) -> str:
    """Why an intent is retired whose policy's catalog file is gone (also `progress.py`)."""
    return (
        f"retired: the catalog file of policy '{name}' was deleted before the policy was "
        "created (its create was never confirmed); nothing is created for it"
    )


def _content_change(name: str, row: ExecutionRow, digest: str) -> str:
    old = (row.policy_content_hash or "?")[:12]
    return f"the catalog content of policy '{name}' changed (hash {old}… → {digest[:12]}…)"


def _invalid_policy_id(value: str) -> str | None:
    """Why a policy_id is not an identifier, or None."""
    if POLICY_ID_PATTERN.fullmatch(value) and ".." not in value:
        return None
    shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
    return (
        f"policy_id {shown} ({len(value)} characters), which is not an identifier: 1 to 128 "
        "letters, digits, '.', '_', ':' or '-', starting with a letter or digit, no '..'"
    )


def _missing_field(response: ApiResponse, name: str) -> str:
    """Why the answer holds no usable ``name`` (a non-empty string), saying what was there."""
    where = f"the response of {response.method} {response.path} (HTTP {response.http_status}"
    kept = f"raw response kept in {STATE.name}"
    if isinstance(response.data, dict) and name in response.data:
        value = response.data[name]
        kind = json_value_kind(value)
        wrong = kind if value is None or isinstance(value, str) else f"{kind}, not a string"
        return f"'{name}' is {wrong} in {where}); {kept}"
    if response.data is None:
        what = "an empty body" if not response.text.strip() else "a body that is not JSON"
    elif not isinstance(response.data, dict):
        what = f"a JSON {type(response.data).__name__}, not an object"
    else:
        what = "JSON without it"
    return f"field '{name}' missing from {where}, {what}); {kept}"

"""What a ``POST /createpolicy`` answer means (step 1, the ``policy_created`` asset), and the
wording of the step's outcomes that the run and the progress sensor share.

The step itself is `flow.create_policy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policy_pipeline.core.policy_api_types import ApiResponse, json_value_kind
from policy_pipeline.core.store.schema import STATE
from policy_pipeline.core.store.state_store import ExecutionRow

# A policy_id goes into a URL path and into the state table: an identifier, nothing else.
POLICY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class CreateReading:
    """`read_create`'s reading of a 2xx answer: the policy_id, or why there is none."""

    policy_id: str | None
    error: str | None = None
    resumable: bool = False  # no policy_id: whether a later run re-sends the same key


def read_create(response: ApiResponse) -> CreateReading:
    """The policy_id a 2xx create answer holds. An unreadable body may hide a created policy:
    a later run re-sends the same idempotency key and gets the original answer (resumable).
    JSON without the field, or a policy_id that is no identifier, is final; it is refused
    before it reaches a URL or the table (the whole answer stays in the audit trail and in
    ``api_response``)."""
    policy_id = response.field("policy_id")
    if not isinstance(policy_id, str) or not policy_id.strip():
        unreadable = response.data is None
        return CreateReading(None, _missing_field(response, "policy_id"), unreadable)
    invalid = _invalid_policy_id(policy_id)
    if invalid is not None:
        return CreateReading(None, f"{response.describe()} with {invalid}")
    return CreateReading(policy_id)


def deleted_before_create(name: str) -> str:
    """Why an intent is retired whose policy's catalog file is gone (also `progress.py`)."""
    return (
        f"retired: the catalog file of policy '{name}' was deleted before the policy was "
        "created (its create was never confirmed); nothing is created for it"
    )


def content_change(name: str, row: ExecutionRow, digest: str) -> str:
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

"""Bad input refused, nothing lost: hostile catalogs and malformed Policy API answers, driven
through the workflow itself over a real DuckDB state store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from policy_pipeline.core.catalog import CatalogError, load_catalog
from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.engine.workflow import PolicyWorkflow
from policy_pipeline.core.policy_api_types import ApiAttempt, ApiResponse, AttemptCallback
from policy_pipeline.core.settings import PollingSettings
from policy_pipeline.core.store.connection import WarehouseConnection
from policy_pipeline.core.store.dialect import SqlDialect
from policy_pipeline.core.store.state_store import MAX_DETAIL_CHARS, StateStore
from policy_pipeline_tests.conftest import RecordingLog

POLICY = PolicyDefinition(
    policy_name="bad-input", policy_type="t", description="d", priority="low", parameters={}
)


def _response(endpoint: str, method: str, path: str, status: int, text: str) -> ApiResponse:
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        data = None
    return ApiResponse(endpoint, method, path, status, text, data, 1.0, 1)


class ScriptedApi:
    """A Policy API whose answers the test writes, one function per endpoint."""

    def __init__(
        self,
        create: Callable[[], tuple[int, str]],
        status: Callable[[], tuple[int, str]] = lambda: (200, '{"status": "success"}'),
        circuit: Callable[[], tuple[int, str]] = lambda: (200, '{"status": "triggered"}'),
    ) -> None:
        self.create, self.status, self.circuit = create, status, circuit
        self.circuit_calls = 0

    def _answer(
        self, endpoint: str, method: str, path: str, answer: tuple[int, str], cb: AttemptCallback
    ) -> ApiResponse:
        code, text = answer
        response = _response(endpoint, method, path, code, text)
        cb(ApiAttempt(endpoint, method, path, 1, 1.0, code, "ok", response.data or text, None))
        return response

    def create_policy(self, payload: dict[str, Any], key: str, cb: AttemptCallback) -> ApiResponse:
        return self._answer("createpolicy", "POST", "/createpolicy", self.create(), cb)

    def get_policy_status(
        self, policy_id: str, cb: AttemptCallback, max_attempts: int | None = None
    ) -> ApiResponse:
        return self._answer("policy_status", "GET", f"/policy/{policy_id}", self.status(), cb)

    def trigger_circuit_breaker(
        self, policy_id: str, execution_id: str, reason: str, key: str, cb: AttemptCallback
    ) -> ApiResponse:
        self.circuit_calls += 1
        return self._answer("circuit", "POST", "/circuit", self.circuit(), cb)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    database = str(tmp_path / "state.duckdb")
    return StateStore(WarehouseConnection(SqlDialect.DUCKDB, lambda: duckdb.connect(database)))


def _workflow(
    store: StateStore, api: ScriptedApi, log: RecordingLog | None = None
) -> PolicyWorkflow:
    return PolicyWorkflow(store, api, owner="test", log=log or RecordingLog())


@pytest.mark.parametrize(
    ("answer", "expected", "resumable"),
    [
        ((200, '{"execution_id": "x"}'), "JSON without it", False),
        ((200, '{"policy_id": 42}'), "'policy_id' is a number (42), not a string", False),
        ((200, '{"policy_id": ""}'), "'policy_id' is an empty string", False),
        ((200, '["pol_1"]'), "a JSON list, not an object", False),
        ((200, "<html><body>502 Bad Gateway</body></html>"), "a body that is not JSON", True),
        ((200, ""), "an empty body", True),
        ((422, '{"error": "bad body"}'), "POST /createpolicy answered HTTP 422", False),
    ],
)
def test_create_answers_without_a_usable_policy_id(
    store: StateStore, answer: tuple[int, str], expected: str, resumable: bool
) -> None:
    report = _workflow(store, ScriptedApi(create=lambda: answer)).create_policies([POLICY])
    assert expected in report.failures["bad-input"]
    row = store.current_execution("bad-input")
    assert row is not None and row.status == "error"
    assert row.resumable is resumable
    assert expected in (row.error_message or "")


def test_huge_response_bodies_are_truncated_in_the_audit(store: StateStore) -> None:
    huge = json.dumps({"policy_id": "pol_big", "blob": "x" * 2_000_000})
    report = _workflow(store, ScriptedApi(create=lambda: (200, huge))).create_policies([POLICY])
    assert report.outcomes["bad-input"].policy_id == "pol_big"
    with store.warehouse.session() as session:
        from policy_pipeline.core.store.dialect import Statement

        [(detail,)] = session.rows(
            Statement(
                "t",
                'SELECT "detail" FROM policy_execution_events WHERE "event_type" = \'api_call\'',
            )
        )
        [(response,)] = session.rows(
            Statement("t", 'SELECT "api_response" FROM policy_execution_state')
        )
    for stored in (detail, response):
        assert len(stored) <= MAX_DETAIL_CHARS + 200
        assert json.loads(stored)["truncated"] is True


def test_unknown_status_values_keep_polling_with_a_warning_until_the_deadline(
    store: StateStore,
) -> None:
    api = ScriptedApi(
        create=lambda: (200, '{"policy_id": "pol_1"}'),
        status=lambda: (200, '{"status": "quantum-superposition"}'),
    )
    log = RecordingLog()
    workflow = _workflow(store, api, log)
    workflow.create_policies([POLICY])
    report = workflow.wait_until_ready(
        ["bad-input"], PollingSettings(initial_interval_seconds=0.001, max_polls=4)
    )
    assert "not ready after 4 polls" in report.failures["bad-input"]
    assert len(log.warnings) == 4
    assert "unknown status 'quantum-superposition'" in log.warnings[0]
    row = store.current_execution("bad-input")
    assert row is not None and row.poll_count == 4 and row.resumable
    assert api.circuit_calls == 0


def test_wrong_status_type_is_unknown_not_a_crash(store: StateStore) -> None:
    answers = iter(
        [(200, '{"status": 7}'), (200, '{"status": ["ready"]}'), (200, '{"status": "READY"}')]
    )
    api = ScriptedApi(create=lambda: (200, '{"policy_id": "pol_1"}'), status=lambda: next(answers))
    workflow = _workflow(store, api)
    workflow.create_policies([POLICY])
    report = workflow.wait_until_ready(
        ["bad-input"], PollingSettings(initial_interval_seconds=0.001)
    )
    assert report.outcomes["bad-input"].status == "policy_ready"
    assert report.outcomes["bad-input"].poll_count == 3


# --- hostile catalogs ------------------------------------------------------------------------


def _write(directory: Path, name: str, text: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")


VALID = "policy_name: {name}\npolicy_type: t\ndescription: {description}\npriority: low\n"


def test_a_one_megabyte_parameters_block_is_stored_intact(
    tmp_path: Path, store: StateStore
) -> None:
    catalog = tmp_path / "catalog"
    blob = "y" * 1_000_000
    _write(
        catalog,
        "big.yaml",
        VALID.format(name="big", description="d") + f"parameters:\n  blob: {blob}\n",
    )
    [entry] = load_catalog(catalog).values()
    api = ScriptedApi(create=lambda: (200, '{"policy_id": "pol_big"}'))
    assert "big" in _workflow(store, api).create_policies([entry.policy]).outcomes
    row = store.current_execution("big")
    assert row is not None
    assert store.policy_data([row.execution_id])[row.execution_id]["parameters"]["blob"] == blob


@pytest.mark.parametrize(
    ("field_text", "expected"),
    [
        ("priority: urgent", "field 'priority'"),
        ("priority: [low]", "field 'priority'"),
        ("parameters: 5", "field 'parameters'"),
        ('description: "tab\\tok but bell \\a no"', "control characters"),
    ],
)
def test_hostile_catalog_values_name_the_file_and_field(
    tmp_path: Path, field_text: str, expected: str
) -> None:
    text = VALID.format(name="hostile", description="d")
    key = field_text.split(":")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key)) + "\n"
    _write(tmp_path / "c", "hostile.yaml", text + field_text + "\n")
    with pytest.raises(CatalogError) as error:
        load_catalog(tmp_path / "c")
    assert "hostile.yaml" in str(error.value) and expected in str(error.value)


def test_unicode_and_injection_strings_are_data(tmp_path: Path, store: StateStore) -> None:
    description = "Robert'); DROP TABLE policy_execution_state;-- 🚀 ünïcødé \\\" ' %s ? $1"
    policy = PolicyDefinition(
        policy_name="quoted", policy_type="t", description=description, priority="low"
    )
    api = ScriptedApi(create=lambda: (200, '{"policy_id": "pol_q"}'))
    assert "quoted" in _workflow(store, api).create_policies([policy]).outcomes
    row = store.current_execution("quoted")
    assert row is not None
    assert store.policy_data([row.execution_id])[row.execution_id]["description"] == description


def test_thousands_of_catalog_files_load_quickly(tmp_path: Path) -> None:
    import time

    catalog = tmp_path / "many"
    for i in range(3000):
        _write(catalog, f"p{i:05d}.yaml", VALID.format(name=f"p{i:05d}", description=f"policy {i}"))
    started = time.monotonic()
    assert len(load_catalog(catalog)) == 3000
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("body", ["<html>proxy says hi</html>", '{"status": "trig'])
def test_unreadable_circuit_confirmation_is_not_completion(store: StateStore, body: str) -> None:
    answers = iter([(200, body), (200, '{"status": "triggered", "circuit_breaker_id": "cb_1"}')])
    api = ScriptedApi(create=lambda: (200, '{"policy_id": "pol_1"}'), circuit=lambda: next(answers))
    workflow = _workflow(store, api)
    workflow.create_policies([POLICY])
    workflow.wait_until_ready(["bad-input"], PollingSettings(initial_interval_seconds=0.001))
    first = workflow.activate_circuit_breakers(["bad-input"])
    assert "without a readable confirmation" in first.failures["bad-input"]
    row = store.current_execution("bad-input")
    assert row is not None and row.status == "error" and row.resumable
    assert row.circuit_breaker_initiated and not row.circuit_breaker_completed
    # The next run repeats the call (same idempotency key) and completes.
    second = workflow.activate_circuit_breakers(["bad-input"])
    assert second.outcomes["bad-input"].status == "completed"
    assert api.circuit_calls == 2

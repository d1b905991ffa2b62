"""End to end through the Dagster UI in a real browser.

``dagster dev`` (webserver and daemon) runs on a loopback port against a temporary
``DAGSTER_HOME``, the Policy API simulator and a temporary DuckDB file; headless Chromium
(Debian's ``/usr/bin/chromium``, driven by Playwright; no browser download) then does what an
operator does:

1. opens the asset graph and finds the three workflow assets and the two dbt models;
2. opens ``policy_created``, picks a partition (a policy), materializes it and waits for the
   run's Success; then runs the whole workflow for that policy from ``policy_workflow_job``'s
   page, so its execution ends completed whatever step 1 alone left behind;
3. builds the reporting models (``policy_reporting_job``: ``dbt build`` and the asset checks on
   the results view) and reads the checks' results on ``policy_execution_results``' Checks tab.

Screenshots go to ``test-artifacts/`` (``asset-graph.png``, ``run-success.png``,
``results-view-checks.png``; ``ui-failure.png`` and ``dagster-dev.log`` when the test fails).

Determinism. A fresh instance runs ``policy_catalog_sensor`` (default RUNNING) as soon as the
daemon starts: its first tick launches one run for every catalog policy, and later ticks launch
nothing (the catalog does not change). The test accepts that run and waits for it to finish
before launching anything itself, so no two runs ever work on the same policy at once. The two
schedules (checks every 15 minutes, reporting at :05) would launch runs only if the test happens
to cross their tick time; the test switches them off first, as an operator would, because
even a scheduled run held in the queue (the instance's tag concurrency limit of 0 on
``dagster/schedule_name`` stays as a second line) plans the checks, which the UI then shows
"In progress" for ever.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from dagster import DagsterInstance

from policy_pipeline.core.settings import PROJECT_ROOT
from policy_pipeline.defs.workflow.partitions import PARTITIONS_NAME
from policy_pipeline_tests.conftest import CATALOG_POLICIES, Workspace, subprocess_env
from policy_pipeline_tests.harness.dagster_dev import (
    LOCATION_NAME,
    DagsterDev,
    dagster_dev,
    prepare_dagster_home,
)
from policy_pipeline_tests.harness.graphql import (
    AUTOMATION_QUERY,
    LOCATION,
    REPOSITORY,
    STOP_SCHEDULE,
)

try:
    from playwright.sync_api import Locator, Page, expect, sync_playwright

    PLAYWRIGHT_MISSING: str | None = None
except ImportError as exc:  # the test skips without it (and fails under CI): _require_browser
    PLAYWRIGHT_MISSING = str(exc)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
SCREENSHOTS = ("asset-graph.png", "run-success.png", "results-view-checks.png")
FAILURE_ARTIFACTS = ("ui-failure.png", "dagster-dev.log")

WORKFLOW_ASSETS = ("policy_created", "policy_ready", "circuit_breaker_activation")
DBT_MODELS = ("policy_execution_results", "policy_execution_daily_stats")
RESULTS_VIEW = "policy_execution_results"
CHECKS = ("no_stuck_executions", "state_consistency", "success_rate_24h")
POLICY = "pii_access_review"  # the partition the test materializes
CATALOG_SENSOR = "policy_catalog_sensor"

# Generous, because a loaded CI machine is slow (they cost nothing when it is fast).
UI_TIMEOUT_MS = 60_000  # one page element
FIRST_PAGE_TIMEOUT_MS = 180_000  # the first page: the webserver's first asset-graph queries
RUN_TIMEOUT_S = 180.0  # one run, from launch to its end (includes the run worker's start-up)
SENSOR_TIMEOUT_S = 180.0  # the catalog sensor's first tick and its run

# The test instance: fast dequeuing, and scheduled runs held in the queue (see the docstring).
INSTANCE_EXTRA: dict[str, Any] = {
    "run_queue": {
        "dequeue_interval_seconds": 1,
        "tag_concurrency_limits": [{"key": "dagster/schedule_name", "limit": 0}],
    },
}

_SENSOR_QUERY = """
query CatalogSensorTicks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { ticks(limit: 10) { status runIds error { message } } } }
    ... on PythonError { message }
  }
}
"""

_RUNS_QUERY = """
query RunStatuses($ids: [String!]) {
  runsOrError(filter: {runIds: $ids}) {
    __typename
    ... on Runs { results { runId status } }
    ... on PythonError { message }
  }
}
"""

_TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


# --- Preconditions ----------------------------------------------------------------------------


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_browser() -> None:
    """Skip (fail under CI) when Chromium or Playwright is not installed."""
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if PLAYWRIGHT_MISSING is not None:
        missing.append(f"the playwright Python package ({PLAYWRIGHT_MISSING})")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if _ci():
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)


# --- Fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ui:
    """The running ``dagster dev`` and the workspace (simulator, DuckDB file, catalog) it uses."""

    server: DagsterDev
    workspace: Workspace

    @property
    def base_url(self) -> str:
        return self.server.base_url


@pytest.fixture
def ui(workspace: Workspace) -> Iterator[Ui]:
    """``dagster dev`` with the workspace's simulator, DuckDB file and catalog copy."""
    _require_browser()
    env = subprocess_env(workspace)
    home = prepare_dagster_home(Path(env["DAGSTER_HOME"]), INSTANCE_EXTRA)
    # The partitions the catalog sensor would add on its first tick, registered up front so the
    # partition picker has them whenever the page opens (as demo.py does).
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(PARTITIONS_NAME, CATALOG_POLICIES)
    started = time.monotonic()
    with dagster_dev(env, workspace.root / "dagster-dev.log") as server:
        print(f"dagster dev ready in {time.monotonic() - started:.1f}s at {server.base_url}")
        yield Ui(server=server, workspace=workspace)


@pytest.fixture
def page(ui: Ui, tmp_path: Path) -> Iterator[Page]:
    """A page of headless Chromium (Debian's) with a new, empty profile."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1920, "height": 1080},
        )
        try:
            context.set_default_timeout(UI_TIMEOUT_MS)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@contextmanager
def _artifacts_on_failure(page: Page, ui: Ui) -> Iterator[None]:
    """Save a screenshot of the page and the ``dagster dev`` log if the block fails."""
    ARTIFACTS.mkdir(exist_ok=True)
    for name in (*SCREENSHOTS, *FAILURE_ARTIFACTS):  # none left over from an earlier run
        (ARTIFACTS / name).unlink(missing_ok=True)
    try:
        yield
    except BaseException:
        try:
            page.screenshot(path=str(ARTIFACTS / "ui-failure.png"), full_page=True)
        except Exception as exc:  # the browser may be what failed
            print(f"no failure screenshot: {exc}")
        shutil.copyfile(ui.server.log_path, ARTIFACTS / "dagster-dev.log")
        print(f"failure artifacts in {ARTIFACTS} (ui-failure.png, dagster-dev.log)")
        raise


def _screenshot(page: Page, name: str) -> None:
    assert name in SCREENSHOTS, name
    page.screenshot(path=str(ARTIFACTS / name))


# --- Steps ------------------------------------------------------------------------------------


def _visible_text(page: Page, text: str) -> Locator:
    # Dagster draws truncatable names twice (shown, and a hidden copy it measures): the shown one.
    return page.get_by_text(text, exact=True).filter(visible=True).first


def _named(role: Literal["button", "link"], label: str, scope: Page | Locator) -> Locator:
    # A control's accessible name starts with its icon's ("materialization Materialize all"),
    # and ends in "…" when it opens a dialog ("Materialize all…" for partitioned assets).
    return scope.get_by_role(role, name=re.compile(rf"(^|\s){re.escape(label)}…?$")).first


def _button(scope: Page | Locator, label: str) -> Locator:
    return _named("button", label, scope)


def _open_asset_graph(page: Page, ui: Ui) -> None:
    page.goto(f"{ui.base_url}/asset-groups")
    expect(_visible_text(page, "policy_workflow")).to_be_visible(timeout=FIRST_PAGE_TIMEOUT_MS)
    # The global graph starts with every group collapsed: expand them through its settings menu.
    page.locator("button:has([aria-label=settings])").last.click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    expect(page).to_have_url(re.compile(r"expanded="))
    # Reloading lays the expanded graph out from scratch and zooms it to fit the page.
    page.reload()
    for name in (*WORKFLOW_ASSETS, *DBT_MODELS):
        expect(_visible_text(page, name), f"asset {name} in the asset graph").to_be_visible()
    # Let the nodes' live data (latest event, checks, partitions) arrive before the screenshot:
    # a wait, not an assertion (on a busy 2-core machine it has taken more than 5 s).
    expect(page.get_by_text(re.compile(r"^Loading"))).to_have_count(0, timeout=60_000)
    _screenshot(page, "asset-graph.png")


def _wait_for_catalog_sensor(page: Page, ui: Ui) -> None:
    """Wait for the catalog sensor's first tick and for the runs it launched to end."""
    selector = {
        "repositoryLocationName": LOCATION_NAME,
        "repositoryName": "__repository__",
        "sensorName": CATALOG_SENSOR,
    }
    deadline = time.monotonic() + SENSOR_TIMEOUT_S
    state = "no tick yet"
    while time.monotonic() < deadline:
        sensor = ui.server.graphql(_SENSOR_QUERY, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", f"{CATALOG_SENSOR}: {sensor}"
        ticks = sensor["sensorState"]["ticks"]
        failed = [t["error"] for t in ticks if t["status"] == "FAILURE"]
        assert not failed, f"{CATALOG_SENSOR} tick failed: {failed}"
        done = [t for t in ticks if t["status"] in ("SUCCESS", "SKIPPED")]
        run_ids = sorted({run_id for tick in done for run_id in tick["runIds"]})
        if done:
            runs = ui.server.graphql(_RUNS_QUERY, {"ids": run_ids})["runsOrError"]
            statuses = {run["runId"]: run["status"] for run in runs.get("results", [])}
            state = f"runs {statuses}"
            if len(statuses) == len(run_ids) and set(statuses.values()) <= _TERMINAL_RUN_STATUSES:
                assert set(statuses.values()) <= {"SUCCESS"}, f"{CATALOG_SENSOR}'s {state}"
                return
        time.sleep(1.0)
    raise AssertionError(
        f"{CATALOG_SENSOR} had not ticked and finished its runs in {SENSOR_TIMEOUT_S:.0f}s "
        f"({state}):\n{ui.server.log_tail()}"
    )


def _pick_partition_and_launch(page: Page, title: str, partition: str) -> None:
    """In the "Launch runs to materialize ..." dialog, pick one partition and launch its run."""
    dialog = page.get_by_role("dialog").filter(has_text=title)
    expect(dialog).to_be_visible()
    dialog.get_by_text("Select a partition or create one").click()
    # The picker's drop-down (a pop-over outside the dialog) lists the partitions as menu items.
    option = page.get_by_role("menuitem").filter(has=page.get_by_text(partition, exact=True))
    option.filter(visible=True).first.click()
    dialog.get_by_text(title).click()  # closes the drop-down
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    _button(dialog, "Launch 1 run").click()


def _follow_launched_run(page: Page, ui: Ui) -> str:
    """Open the run that the "Launched run <id> [View]" toast links to; returns its short id."""
    message = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$")).last
    # The toast shows once the launch returns, which takes more than the default 5 s while the
    # machine is busy (the code location starts the run's process first).
    expect(message, "the toast of a launched run").to_be_visible(timeout=UI_TIMEOUT_MS)
    short_id = message.inner_text().split()[-1]
    view = page.get_by_role("link", name="View", exact=True)
    href = view.and_(page.locator(f'[href^="/runs/{short_id}"]')).first.get_attribute("href")
    assert href, f"no View link for run {short_id}"
    # The link's own URL, not a click: the toast closes by itself after a few seconds.
    page.goto(f"{ui.base_url}{href}")
    return short_id


def _wait_for_run_success(page: Page, ui: Ui, short_id: str) -> None:
    """Watch the run page until the run ends; it must end in Success."""
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(status, f"run {short_id} to end").to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    outcome = status.inner_text()
    assert outcome == "Success", (
        f"run {short_id} ended in {outcome}; dagster dev log:\n{ui.server.log_tail(6000)}"
    )


def _materialize_policy_created(page: Page, ui: Ui) -> None:
    page.goto(f"{ui.base_url}/assets/policy_created")
    _button(page, "Materialize").click()
    _pick_partition_and_launch(page, "Launch runs to materialize policy_created", POLICY)
    short_id = _follow_launched_run(page, ui)
    _wait_for_run_success(page, ui, short_id)
    # The run page names the partition it materialized.
    expect(page.get_by_text(f"partition: {POLICY}").first).to_be_visible()
    _screenshot(page, "run-success.png")


def _open_job(page: Page, ui: Ui, job: str) -> None:
    page.goto(f"{ui.base_url}/jobs")
    _named("link", job, page).click()
    expect(page).to_have_url(re.compile(rf"/jobs/{job}\b"))


def _finish_workflow(page: Page, ui: Ui) -> None:
    """The whole workflow for the same policy: one run of policy_workflow_job (step 1 resumes
    the execution it started, or finds this content done)."""
    _open_job(page, ui, "policy_workflow_job")
    _button(page, "Materialize all").click()
    _pick_partition_and_launch(page, "Launch runs to materialize 3 assets", POLICY)
    _wait_for_run_success(page, ui, _follow_launched_run(page, ui))


def _build_reporting(page: Page, ui: Ui) -> None:
    """policy_reporting_job: dbt build, then every check on the models (the dbt tests and the
    three monitoring checks on the results view)."""
    _open_job(page, ui, "policy_reporting_job")
    _button(page, "Materialize all").click()
    _wait_for_run_success(page, ui, _follow_launched_run(page, ui))


def _stop_schedules(page: Page, ui: Ui) -> None:
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
    repository = ui.server.graphql(AUTOMATION_QUERY, {"selector": selector})["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    for schedule in repository["schedules"]:
        if schedule["scheduleState"]["status"] == "RUNNING":
            state_id = schedule["scheduleState"]["id"]
            result = ui.server.graphql(STOP_SCHEDULE, {"id": state_id})["stopRunningSchedule"]
            assert result["scheduleState"]["status"] == "STOPPED", result


def _check_row(page: Page, name: str) -> Locator:
    # A row of the checks list: the check's name (its full form is the title) and its status.
    return page.locator("span").filter(has=page.get_by_title(name, exact=True)).last


def _assert_checks_passed(page: Page, ui: Ui) -> None:
    page.goto(f"{ui.base_url}/assets/{RESULTS_VIEW}")
    page.get_by_role("tab", name="Checks", exact=True).click()
    expect(page).to_have_url(re.compile(r"view=checks"))
    for name in CHECKS:
        row = _check_row(page, name)
        expect(row, f"check {name} in the list").to_be_visible()
        expect(row, f"check {name}'s latest status").to_contain_text("Succeeded")
        row.click()
        expect(page).to_have_url(re.compile(rf"checkDetail={name}\b"))
        expect(page.get_by_text("Evaluation result", exact=True)).to_be_visible()
        expect(page.get_by_text("Passed", exact=True), f"{name} evaluation").to_be_visible()
    # The last one opened, success_rate_24h, describes its result.
    expect(
        page.get_by_text(re.compile(r"^100\.00% of \d+ finished executions succeeded"))
    ).to_be_visible()
    _screenshot(page, "results-view-checks.png")


# --- The test ---------------------------------------------------------------------------------


def test_operator_materializes_a_policy_and_sees_the_checks_in_the_ui(ui: Ui, page: Page) -> None:
    steps = (
        _stop_schedules,
        _wait_for_catalog_sensor,
        _open_asset_graph,
        _materialize_policy_created,
        _finish_workflow,
        _build_reporting,
        _assert_checks_passed,
    )
    with _artifacts_on_failure(page, ui):
        for step in steps:
            started = time.monotonic()
            step(page, ui)
            print(f"{step.__name__}: {time.monotonic() - started:.1f}s")

        # What the Policy API saw for the policy (the sensor's run and the test's): every policy
        # it created got its circuit breaker, once.
        counts = ui.workspace.simulator.counts()["per_policy"][POLICY]
        assert counts["policies_created"] >= 1, counts
        assert counts["circuits_triggered"] == counts["policies_created"], counts
        assert counts["duplicate_circuit_triggers"] == 0, counts

"""The run launcher of the Celery layout (deploy/celery/dagster.yaml): dagster-celery's
`CeleryRunLauncher`, with a health check that notices a worker host that is gone.

dagster-celery's own check reads the run task's state from the result backend. When a whole
worker host dies (power, kernel panic, SIGKILL of everything), nobody is left to move that state
on from STARTED, so run monitoring would see the run healthy until ``max_runtime_seconds``.
Here a STARTED task is also checked against the worker that took it (the ``hostname`` Celery
records with STARTED, ``task_track_started``): that worker must answer Celery's ``ping``. A
worker silent for ``worker_lost_after_seconds`` is reported FAILED, and run monitoring fails
the run (or resumes it, with ``max_resume_run_attempts``); run retries launch a failed run
again. Everything else is dagster-celery's, and run monitoring (the daemon) does the acting.

Why a slow worker is not harmed: a worker is declared lost only after it has not
answered for ``worker_lost_after_seconds`` (several pings, each with its own timeout). Keep that
at least ``POLICY_LEASE_TTL_SECONDS``: a run of a lost worker is then failed (or resumed) only
after the leases its process held have lapsed, so no other run is handed those policies early
(a finished run counts as holding nothing); the run that works on them next, like any other,
takes a policy only through its lease.

Lives outside ``policy_pipeline.defs``: a run launcher is instance configuration, loaded by the
daemon, the webserver and the workers from dagster.yaml, not part of the code location.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Self

from dagster import DagsterRun, Field, IntSource

# The run launcher interface's result types are not exported at dagster's top level:
# dagster-celery's launcher takes them from the same module.
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._serdes import ConfigurableClassData
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

WORKER_LOST_AFTER_SECONDS = 60
PING_TIMEOUT_SECONDS = 5
# A resumed run's new task waits in the broker for a free worker (PENDING) this long before it
# counts as lost: then Dagster's own handling (resume again, or fail) takes over.
PENDING_GRACE_SECONDS = 600


class PolicyCeleryRunLauncher(CeleryRunLauncher):
    """`CeleryRunLauncher` whose health check reports a run FAILED once the worker that took
    its task stops answering pings (its host is gone), so that run monitoring acts on it."""

    def __init__(
        self,
        default_queue: str,
        broker: str | None = None,
        backend: str | None = None,
        include: list[str] | None = None,
        config_source: dict[str, Any] | None = None,
        inst_data: ConfigurableClassData | None = None,
        worker_lost_after_seconds: int = WORKER_LOST_AFTER_SECONDS,
        ping_timeout_seconds: int = PING_TIMEOUT_SECONDS,
        pending_grace_seconds: int = PENDING_GRACE_SECONDS,
    ) -> None:
        super().__init__(
            default_queue=default_queue,
            broker=broker,
            backend=backend,
            include=include,
            config_source=config_source,
            inst_data=inst_data,
        )
        if worker_lost_after_seconds < 0 or ping_timeout_seconds < 1:
            raise ValueError(
                "PolicyCeleryRunLauncher: worker_lost_after_seconds must be >= 0 and "
                f"ping_timeout_seconds >= 1, got {worker_lost_after_seconds} and "
                f"{ping_timeout_seconds}"
            )
        self.worker_lost_after_seconds = worker_lost_after_seconds
        self.ping_timeout_seconds = ping_timeout_seconds
        self.pending_grace_seconds = pending_grace_seconds
        # Run monitoring keeps one launcher in the daemon and polls every poll_interval_seconds:
        # what earlier checks found carries over to the next ones.
        self._silent_since: dict[str, float] = {}  # worker -> first unanswered ping
        self._answers: dict[str, tuple[float, bool]] = {}  # worker -> (when asked, answered)
        self._pending_since: dict[str, float] = {}  # task id -> first seen PENDING

    @classmethod
    def config_type(cls) -> Any:
        inherited = CeleryRunLauncher.config_type()
        assert isinstance(inherited, Mapping)  # dagster-celery's fields, as a dict
        return {
            **inherited,
            "worker_lost_after_seconds": Field(
                IntSource,
                is_required=False,
                default_value=WORKER_LOST_AFTER_SECONDS,
                description="How long the worker that took a started run's task must not "
                "answer pings before the run's worker is reported failed (run monitoring then "
                "resumes or fails the run). Keep it at least POLICY_LEASE_TTL_SECONDS.",
            ),
            "ping_timeout_seconds": Field(
                IntSource,
                is_required=False,
                default_value=PING_TIMEOUT_SECONDS,
                description="How long one ping waits for the worker's answer.",
            ),
            "pending_grace_seconds": Field(
                IntSource,
                is_required=False,
                default_value=PENDING_GRACE_SECONDS,
                description="How long a resumed run's task may wait in the broker for a free "
                "worker before the run counts as lost.",
            ),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        return cls(inst_data=inst_data, **config_value)

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        task_id = run.tags[DAGSTER_CELERY_TASK_ID_TAG]
        result = self.celery.AsyncResult(task_id)
        state = result.state
        if state == "PENDING":
            # The run is STARTED, so its task was taken before: this is a resumed run's new
            # task waiting for a free worker slot, not a lost one (for a while).
            first = self._pending_since.setdefault(task_id, time.monotonic())
            if time.monotonic() - first < self.pending_grace_seconds:
                return CheckRunHealthResult(
                    WorkerStatus.RUNNING, "the run's task waits for a free worker"
                )
            return super().check_run_worker_health(run)
        self._pending_since.pop(task_id, None)
        if state != "STARTED":
            return super().check_run_worker_health(run)
        worker = _worker_of(result)
        if worker is None:  # no worker recorded: nothing to ask
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        silent_for = self._silent_for(worker)
        if silent_for is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        if silent_for < self.worker_lost_after_seconds:
            return CheckRunHealthResult(
                WorkerStatus.RUNNING,
                f"worker {worker} has not answered for {silent_for:.0f}s",
            )
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"worker {worker} no longer answers (for {silent_for:.0f}s): its host is gone",
        )

    def _silent_for(self, worker: str) -> float | None:
        """Seconds the worker has not answered pings for, or None while it answers (or when
        the broker cannot be asked: no verdict without an answer)."""
        now = time.monotonic()
        asked = self._answers.get(worker)
        if asked is None or now - asked[0] >= self.ping_timeout_seconds:
            try:
                replies = self.celery.control.ping(
                    destination=[worker], timeout=self.ping_timeout_seconds
                )
            except Exception:  # the broker is unreachable from here: that says nothing
                return None
            answered = any(worker in reply for reply in replies or [])
            asked = (now, answered)
            self._answers[worker] = asked
        if asked[1]:
            self._silent_since.pop(worker, None)
            return None
        return now - self._silent_since.setdefault(worker, asked[0])


def _worker_of(result: Any) -> str | None:
    """The worker (``name@host``) that took the task: Celery stores it with the STARTED state
    (``task_track_started``), or as ``worker`` with ``result_extended``."""
    info = result.info
    if isinstance(info, Mapping) and info.get("hostname"):
        return str(info["hostname"])
    worker = getattr(result, "worker", None)
    return str(worker) if worker else None

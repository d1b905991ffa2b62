"""The GraphQL documents the tests send to a Dagster webserver, as its UI sends them, and the
names of the code location's repository they select."""

LOCATION = "policy_pipeline"
REPOSITORY = "__repository__"  # the repository of a Definitions object

LOCATIONS_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""

AUTOMATION_QUERY = """
query ($selector: RepositorySelector!) { repositoryOrError(repositorySelector: $selector) {
  __typename
  ... on Repository {
    schedules { name scheduleState { id status } }
    sensors { name sensorState { id status } }
  }
  ... on PythonError { message }
} }
"""

STOP_SENSOR = """
mutation ($id: String!) { stopSensor(id: $id) {
  __typename
  ... on StopSensorMutationResult { instigationState { status } }
  ... on PythonError { message }
} }
"""

STOP_SCHEDULE = """
mutation ($id: String!) { stopRunningSchedule(id: $id) {
  __typename
  ... on ScheduleStateResult { scheduleState { status } }
  ... on PythonError { message }
} }
"""

LAUNCH_RUN = """
mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename
  ... on LaunchRunSuccess { run { runId status tags { key value } } }
  ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on InvalidSubsetError { message }
  ... on PipelineNotFoundError { message }
} }
"""

# A backfill as the UI's *Materialize* of many partitions launches it (the daemon runs it).
LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}
"""

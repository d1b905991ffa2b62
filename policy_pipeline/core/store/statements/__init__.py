"""The project's SQL statements, written once, grouped by who runs them: ``executions`` (the
state store for the workflow engine), ``leases``, ``guard`` (the Policy API guard),
``progress`` (the progress sensor), ``health`` (checks and operator reports) and ``archive``.

Statements are strict Snowflake SQL with ``?`` placeholders (bound parameters only, JSON
through ``SELECT PARSE_JSON(?)``, never ``VALUES (PARSE_JSON(...))``; a batch of rows as one
JSON-array parameter, see ``batches``); ``dialect`` renders them for each warehouse.
"""

"""Test harnesses that build more than a process: `hosts` builds test hosts (Linux namespaces
joined by veth pairs) and the services they share; `cluster` deploys the Celery layout of
deploy/ on them."""

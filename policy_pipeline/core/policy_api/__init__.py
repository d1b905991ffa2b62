"""The Policy API client: a plain class (no Dagster) for the three endpoints.

- `client.py`: the endpoints and the retry loop (backoff, ``Retry-After``, the Idempotency-Key
  409/422 rules);
- `transport.py`: one attempt over requests, within its total deadline (`deadline.py`);
- `answers.py`: an answer's body decoded, with the API key scrubbed out;
- `config.py`: what the client is told.

What the client hands back (attempts, responses, errors) is `policy_pipeline.core.policy_api_types`;
the Dagster resource that hands out the client is `policy_pipeline.resources.policy_api`.
"""

from policy_pipeline.core.policy_api.answers import ResponseScrubber
from policy_pipeline.core.policy_api.client import PolicyApiClient, parse_retry_after
from policy_pipeline.core.policy_api.config import PolicyApiConfig

__all__ = ["PolicyApiClient", "PolicyApiConfig", "ResponseScrubber", "parse_retry_after"]

"""Named points where a crash test can kill the process (SIGKILL, no clean-up), to prove that
every step survives a crash between an API call and the state write that follows it.

Inert unless POLICY_FAILPOINT names the point: ``POLICY_FAILPOINT=after_create_call``.
"""

import os
import signal

POINTS = (
    "after_intents",  # intents committed, no create sent
    "after_create_call",  # the policy exists at the API, the state does not know it
    "after_created",  # policy_created written
    "after_poll_call",  # a status answer not yet recorded
    "after_ready",  # policy_ready written
    "after_claim",  # circuit breaker initiated, not yet called
    "after_circuit_call",  # circuit breaker fired, completion not yet written
    "after_completed",  # completed written, leases not yet released
)


def failpoint(name: str) -> None:
    if os.environ.get("POLICY_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

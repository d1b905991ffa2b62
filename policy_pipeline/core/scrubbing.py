"""Secrets out of text: the one scrubber for the API key and the warehouse's secrets.

A server that echoes a request (a Policy API echoing headers, a Snowflake login echoing its
body) can put a secret into an error message, in any of the forms a server or library renders
text in. Whatever holds a secret (the Policy API client, the warehouse connection, the dbt
invocation) replaces every such form with ``***`` before the text is stored, logged or raised.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any
from urllib.parse import quote, quote_plus

SCRUBBED = "***"


def secret_forms(secret: str) -> set[str]:
    """The forms in which an echoing server or library may render ``secret``."""
    escaped_json = json.dumps(secret)[1:-1]
    percent = quote(secret, safe="")
    forms = {
        secret,
        escaped_json,  # '"' and '\\' escaped, non-ASCII as \\uXXXX, as in a JSON echo
        escaped_json.replace("/", "\\/"),  # encoders that escape '/' too
        json.dumps(secret, ensure_ascii=False)[1:-1],  # JSON with non-ASCII kept
        percent,
        re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), percent),
        quote(secret),  # '/' left as is
        quote_plus(secret, safe=""),  # form encoding
        html.escape(secret),
        html.escape(secret, quote=False),
        repr(secret)[1:-1],  # error messages quote what they choke on with repr()
        repr(secret.encode("utf-8", "replace"))[2:-1],
    }
    return {form for form in forms if form}


class SecretScrubber:
    """Replaces the given secrets, in every form of `secret_forms`, with ``***``. Empty and
    missing secrets are ignored; with none, text passes unchanged."""

    def __init__(self, *secrets: str | None) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= secret_forms(secret)
        # Longest first, so that a form containing another is replaced whole.
        self.forms: tuple[str, ...] = tuple(sorted(forms, key=lambda f: (-len(f), f)))
        self._pattern = (
            re.compile("|".join(re.escape(f) for f in self.forms)) if self.forms else None
        )

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        return self._pattern.sub(SCRUBBED, text) if self._pattern is not None else text

    def found_in(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None

    def data(self, value: Any) -> Any:
        """Parsed JSON with every string (keys included) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.data(v) for v in value]
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        return value

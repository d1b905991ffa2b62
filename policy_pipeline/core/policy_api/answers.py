"""What an answer's body is: text decoded from its bytes, and nothing of the API key left in it.

The key is scrubbed (raw, JSON-, percent- and HTML-escaped, see `policy_pipeline.core.scrubbing`)
from every body, message and error the client hands back: an API that echoes request headers
must not put it into the warehouse or the logs.
"""

from __future__ import annotations

import codecs
import email.message
import json
from typing import Any

from policy_pipeline.core.policy_api_types import parse_body
from policy_pipeline.core.scrubbing import SecretScrubber


class ResponseScrubber(SecretScrubber):
    """The shared scrubber, for response bodies too."""

    def body(self, raw: str) -> tuple[str, Any]:
        """A response body, scrubbed, then parsed (text, JSON or None)."""
        text = self.text(raw)
        data = parse_body(text)
        if data is not None and "\\" in text:  # JSON escapes could still hide the key
            clean = self.data(data)
            if clean != data:
                # The key was still there once decoded (\uXXXX escapes): the text the caller
                # keeps must not hold it either, so it becomes the scrubbed JSON.
                data, text = clean, json.dumps(clean)
        return text, data


def decode_text(content: bytes, content_type: str | None) -> str:
    """The body as text: in the declared charset if Python knows it, else UTF-8, bad bytes
    replaced (requests would guess a charset, or say Latin-1 for any text/*)."""
    if not content:
        return ""
    encoding = "utf-8"
    if content_type:
        message = email.message.Message()
        message["content-type"] = content_type
        charset = message.get_content_charset(failobj=None)
        if charset:
            try:
                codecs.lookup(charset)
                encoding = charset
            except LookupError:
                pass
    try:
        text = codecs.decode(content, encoding, errors="replace")
    except (LookupError, TypeError, ValueError):
        text = None
    return text if isinstance(text, str) else content.decode("utf-8", errors="replace")

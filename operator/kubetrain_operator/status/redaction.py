"""What a pod wrote, made fit for status, events and logs: credentials out, length bounded."""

from __future__ import annotations

import re

MESSAGE_LIMIT = 1024

_SECRET_PATTERNS = (
    # user:password@ in URLs
    (re.compile(r"(?i)([a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^\s@]+@"), r"\1[REDACTED]@"),
    # presigned S3 URLs and signatures
    (
        re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"),
        r"\1[REDACTED]",
    ),
    # AWS access key ids, HF tokens
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "[REDACTED]"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "[REDACTED]"),
    # KEY=value / "key": "value" for anything that looks like a credential
    (
        re.compile(
            r"(?i)((?:secret|password|passwd|token|access[_-]?key|api[_-]?key|credential)"
            r"[A-Za-z0-9_\-]*[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+"
        ),
        r"\1[REDACTED]",
    ),
)


def redact(text: str) -> str:
    """Strip what looks like a credential from a message a pod wrote, before it reaches status,
    events or logs (the operator never reads Secrets, so patterns are all it can go by)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def bounded(text: str) -> str:
    """At most MESSAGE_LIMIT characters (a condition message, an event)."""
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"

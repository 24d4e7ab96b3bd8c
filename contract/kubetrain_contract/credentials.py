"""The words that mark a URI's query parameter as a credential (a presigned signature, a token):
the operator refuses such URIs in a spec, and the trainer refuses them in a stage config, because
anything in a URI ends up in status, events and logs. Credentials belong in Secrets."""

from typing import Final

SECRET_QUERY_WORDS: Final = ("signature", "credential", "token", "secret", "password", "sig", "key")
"""Matched as substrings of a query parameter's name, case-insensitively."""


def is_secret_query_name(name: str) -> bool:
    """True when a query parameter's name contains one of SECRET_QUERY_WORDS."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_QUERY_WORDS)

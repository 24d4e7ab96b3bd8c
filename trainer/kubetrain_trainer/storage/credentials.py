"""The credential policy: credentials live in Secrets, never in URIs, configs or endpoints.

A URI that carries one (userinfo, a presigned or token query) would end up in logs, status and
events, so it is refused (exit 2) with a message that never repeats the secret and names the
field where the credential belongs. An S3 endpoint is refused when it is an instance-metadata
address (requests there can read the node's cloud credentials) or plain http:// not allowed by
the run.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kubetrain_contract.credentials import is_secret_query_name
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage.errors import Refused
from kubetrain_trainer.storage.uris import is_hf, redacted

#: Where credentials live instead of URIs (the run's fields, named in every refusal).
S3_CREDENTIALS_FIELD = "storage.s3.secretName"
HF_CREDENTIALS_FIELD = "storage.hf.secretName"
#: Query parameter names (lower case, substrings) that carry a credential: presigned S3 URLs
#: (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token), SAS and bearer tokens, API keys.
#: Instance metadata endpoints by name (their addresses are link-local or listed below).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200")})  # Alibaba Cloud


def credential_problem(uri: str) -> str | None:
    """What credential a URI carries (userinfo, a presigned or token query), or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    authority, slash, _ = rest.partition("/")
    # hf://name@revision has "@" in its first segment too; userinfo is followed by a path.
    if "@" in authority and (scheme != "hf" or slash):
        return "user information (NAME:SECRET@)"
    query = urlsplit(uri).query
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if is_secret_query_name(name):
            return f"a credential in its query ({name}=…)"
    return None


def refuse_credentials(uri: str, field: str) -> None:
    """Exit 2 for a URI that carries a credential; the message never repeats the secret."""
    problem = credential_problem(uri)
    if problem is None:
        return
    secret = HF_CREDENTIALS_FIELD if is_hf(uri) else S3_CREDENTIALS_FIELD
    raise Refused(
        f"{field}: {redacted(uri)} carries {problem} — credentials never go in URIs (they "
        f"would end up in logs, status and events): put them in a Secret and use {secret}, "
        "then write the plain URI"
    )


def endpoint_problem(s3: S3Settings) -> str | None:
    """Why `s3.endpoint` must not be used, or None (empty: AWS's own endpoints)."""
    if not s3.endpoint:
        return None
    parts = urlsplit(s3.endpoint)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "expected https://HOST[:PORT]"
    if credential_problem(s3.endpoint):
        return f"it carries credentials — use {S3_CREDENTIALS_FIELD}"
    host = parts.hostname.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in METADATA_HOSTS or (
        address is not None and (address.is_link_local or address in METADATA_ADDRESSES)
    ):
        return (
            f"{host} is a link-local or instance-metadata address, never an object store "
            "(requests there can read the node's cloud credentials)"
        )
    if parts.scheme == "http" and not s3.allow_insecure_endpoint:
        return (
            "plain http:// sends data and request signatures unencrypted — use https://, or "
            "set storage.s3.allowInsecureEndpoint: true for a store you trust on this network"
        )
    return None


def refuse_endpoint(s3: S3Settings) -> None:
    problem = endpoint_problem(s3)
    if problem is not None:
        raise Refused(f"s3.endpoint: {redacted(s3.endpoint)}: {problem}")


def check_config(config: Any) -> None:
    """Refuse credential URIs anywhere in a stage config, and unsafe S3 endpoints (exit 2)."""
    refuse_endpoint(config.s3)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and "://" in value:
            refuse_credentials(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")

    walk(config.model_dump(by_alias=True, exclude={"s3"}), "")

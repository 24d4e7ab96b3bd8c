"""The credential policy: credentials live in Secrets, never in URIs, configs or endpoints.

A URI that carries one (userinfo, a presigned or token parameter in its query, a `;` parameter or
its fragment) would end up in logs, status and events, so it is refused (exit 2) with a message
that never repeats the secret and names the field where the credential belongs. An S3 endpoint is
refused when its host is a number in disguise (2852039166, 0xa9fea9fe), when it is or resolves to
a link-local or instance-metadata address in any spelling (requests there can read the node's
cloud credentials), or when it is plain http:// not allowed by the run. Loopback stays allowed
(MinIO on localhost). The host is resolved once, here: a name that resolves elsewhere later (DNS
rebinding) is outside what this check can see.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from kubetrain_contract.credentials import (
    METADATA_ADDRESSES,
    METADATA_HOSTS,
    is_secret_query_name,
)
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage.errors import Refused
from kubetrain_trainer.storage.uris import is_hf, redacted

#: Where credentials live instead of URIs (the run's fields, named in every refusal).
S3_CREDENTIALS_FIELD = "storage.s3.secretName"
HF_CREDENTIALS_FIELD = "storage.hf.secretName"
_METADATA = frozenset(ipaddress.ip_address(a) for a in METADATA_ADDRESSES)
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052, 8215) and
#: IPv4-translated (RFC 2765); ipaddress knows IPv4-mapped and 6to4 itself.
_EMBEDDING = tuple(
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96")
)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def credential_problem(uri: str) -> str | None:
    """What credential a URI carries (userinfo, a presigned or token query), or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    authority, slash, _ = rest.partition("/")
    # hf://name@revision has "@" in its first segment too; userinfo is followed by a path.
    if "@" in authority and (scheme != "hf" or slash):
        return "user information (NAME:SECRET@)"
    for name in _parameter_names(uri):
        if is_secret_query_name(name):
            return f"a credential in a parameter ({name}=…)"
    return None


def _parameter_names(uri: str) -> Iterator[str]:
    """The name of every `NAME=` after `?`, `&`, `;` or `#`: query, path parameters and fragment
    alike (servers and proxies read all three), split as the operator's rule splits them."""
    for segment in re.split(r"[?&;#]", uri)[1:]:
        name, equals, _ = segment.partition("=")
        if equals:
            yield name


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
    literal = _literal(host)
    if literal is None and _is_numeric_host(host):
        return (
            f"{host} spells an IP address as a number (decimal, hex, octal or fewer than four "
            "parts) — write a DNS name, a dotted quad or a bracketed IPv6 address"
        )
    if host in METADATA_HOSTS or any(_is_metadata(a) for a in _addresses(host, literal)):
        return (
            f"{host} is or resolves to a link-local or instance-metadata address, never an "
            "object store (requests there can read the node's cloud credentials)"
        )
    if parts.scheme == "http" and not s3.allow_insecure_endpoint:
        return (
            "plain http:// sends data and request signatures unencrypted — use https://, or "
            "set storage.s3.allowInsecureEndpoint: true for a store you trust on this network"
        )
    return None


def _literal(host: str) -> Address | None:
    """The host as an IP address written canonically enough for `ipaddress`, or None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_numeric_host(host: str) -> bool:
    """True for the legacy inet_aton forms resolvers accept: 2852039166, 0xa9fea9fe, 0251.0376…"""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _addresses(host: str, literal: Address | None) -> set[Address]:
    """Every address the host stands for: itself, or what it resolves to now. A name that does
    not resolve yields none: no request can reach it, and the client's connection error is
    retryable."""
    if literal is not None:
        return {literal}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, translated, compatible, NAT64, 6to4),
    or None."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None or address.sixtofour is not None:
        return address.ipv4_mapped or address.sixtofour
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    compatible = int(address) >> 32 == 0 and int(low) > 1  # ::/96 but :: and ::1
    if compatible or any(address in prefix for prefix in _EMBEDDING):
        return low
    return None


def _is_metadata(address: Address) -> bool:
    """Link-local or a metadata address, itself or as the IPv4 address it embeds."""
    embedded = _embedded_ipv4(address)
    candidates = [address] if embedded is None else [address, embedded]
    return any(a.is_link_local or a in _METADATA for a in candidates)


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

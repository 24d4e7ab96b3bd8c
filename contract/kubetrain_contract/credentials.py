"""What counts as a credential in a URI, and where the cloud hands them out.

The operator refuses such URIs in a spec, and the trainer refuses them in a stage config, because
anything in a URI ends up in status, events and logs: credentials belong in Secrets. An S3 or Hub
endpoint at an instance-metadata address is refused on both sides too, because a request there
(signed or not) reads the node's cloud credentials.
"""

import re
from typing import Final

SECRET_QUERY_WORDS: Final = ("signature", "credential", "token", "secret", "password", "sig", "key")
"""Matched as substrings of a query parameter's name, case-insensitively."""

METADATA_HOSTS: Final = ("metadata", "metadata.google.internal", "instance-data")
"""Instance-metadata services by name (GCP, AWS); their addresses are below or link-local."""

METADATA_ADDRESSES: Final = ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
"""Instance-metadata addresses: AWS/GCP/Azure/OpenStack (IPv4), AWS (IPv6), Alibaba Cloud, and
Azure's WireServer. Every other link-local address (169.254.0.0/16, fe80::/10) is refused too."""


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def is_secret_query_name(name: str) -> bool:
    """True when a URI parameter's name contains one of SECRET_QUERY_WORDS once percent-decoded
    (until nothing changes, so X%252DAmz%252DSignature counts too): the name a server reads.
    (urllib's unquote would do, but the pure modules that import this may not import urllib.)"""
    decoded, previous = name, ""
    while decoded != previous:
        previous, decoded = decoded, _ESCAPE.sub(lambda m: chr(int(m[1], 16)), decoded)
    lowered = decoded.lower()
    return any(word in lowered for word in SECRET_QUERY_WORDS)

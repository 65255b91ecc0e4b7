"""One form for every peer address: the rule applied before an address keys anything.

`canonical_uri` turns what a notify, an mDNS record, a listing or the config names into the
one string the peer table, the rate limits and the location filter compare: lowercase scheme
and host, no user, path, query or fragment, ``grpc+tcp`` spelt ``grpc``, IPv6 hosts in
brackets, an explicit port. `dial_uri` is the address this node actually dials: on a node
configured for TLS a ``grpc://`` address is dialled as ``grpc+tls://`` (never clear text).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from loraflight.errors import ConfigError

SCHEMES = {"grpc": "grpc", "grpc+tcp": "grpc", "grpc+tls": "grpc+tls"}
MAX_URI_LEN = 512


def canonical_uri(uri: str, *, tls: bool = False) -> str:
    """`uri` in its one form ('host:port' gets grpc:// or, with `tls`, grpc+tls://).

    Raises ConfigError naming what is wrong: not a Flight address, no host, no or a bad port.
    """
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LEN:
        raise ConfigError(f"{str(uri)[:60]!r} is not a Flight address (empty, or over {MAX_URI_LEN} chars)")
    if not uri.isprintable() or any(c.isspace() for c in uri):
        raise ConfigError(f"{uri[:60]!r} is not a Flight address: it holds spaces or control characters")
    raw = uri if "://" in uri else f"{'grpc+tls' if tls else 'grpc'}://{uri}"
    u = urlsplit(raw)
    scheme = SCHEMES.get(u.scheme.lower())
    if scheme is None:
        raise ConfigError(f"{uri[:60]!r} is not a Flight address: use HOST:PORT or grpc[+tls]://HOST:PORT")
    host = (u.hostname or "").lower().rstrip(".")
    if not host:
        raise ConfigError(f"{uri[:60]!r} names no host")
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"{uri[:60]!r} has an invalid port") from None
    if not port:
        raise ConfigError(f"{uri[:60]!r} has no port: use HOST:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{scheme}://{host}:{port}"


def dial_uri(uri: str, *, tls: bool) -> str:
    """The address to dial: canonical, and grpc+tls:// whenever this node is configured for TLS."""
    c = canonical_uri(uri, tls=tls)
    if tls and c.startswith("grpc://"):
        return "grpc+tls://" + c[len("grpc://") :]
    return c


def same_host_port(a: str, b: str) -> bool:
    """Whether two addresses name the same host and port (whatever the scheme)."""
    return a.split("://", 1)[-1] == b.split("://", 1)[-1]


__all__ = ["MAX_URI_LEN", "SCHEMES", "canonical_uri", "dial_uri", "same_host_port"]

"""TLS / mutual TLS from PEM files, bearer tokens checked by server middleware, client options.

Writes (`do_put`, `delete`) always need a write token. Reads need a token only when read
tokens are configured (a write token also reads). Tokens mean something only over TLS.
Every call also carries the client's protocol version; another major is refused here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from loraflight.errors import AuthError, ConfigError, PeerError

from .protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, check_protocol, header_json_dict

MAX_TOKEN_LEN = 4096


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """Server certificate and key (PEM); with `client_ca`, clients must present a cert it signed."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        client_ca: str | os.PathLike[str] | None = None,
    ) -> ServerTLS:
        c, k = _read(cert, "TLS certificate"), _read(key, "TLS key")
        assert c is not None and k is not None
        if b"-----BEGIN" not in c or b"-----BEGIN" not in k:
            raise ConfigError("TLS certificate and key must be PEM files")
        return cls(c, k, _read(client_ca, "client CA"))


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """CA to trust (PEM; None = system roots), and a client cert + key for mutual TLS."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    override_hostname: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        override_hostname: str | None = None,
    ) -> ClientTLS:
        if (cert is None) != (key is None):
            raise ConfigError(
                "a client certificate needs its key, and a key its certificate (--tls-cert/--tls-key)"
            )
        return cls(
            _read(ca, "TLS CA"),
            _read(cert, "TLS client certificate"),
            _read(key, "TLS client key"),
            override_hostname,
        )

    def client_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.ca is not None:
            kw["tls_root_certs"] = self.ca
        if self.cert is not None:
            kw["cert_chain"] = self.cert
            kw["private_key"] = self.key
        if self.override_hostname:
            kw["override_hostname"] = self.override_hostname
        return kw


def load_tokens(path: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """Tokens from a file, one per line (blank lines and # comments skipped)."""
    data = _read(path, "token file")
    if data is None:
        return ()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path} is not UTF-8 text") from None
    toks = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not toks:
        raise ConfigError(f"token file {path} holds no token")
    for t in toks:
        if len(t) > MAX_TOKEN_LEN or not t.isprintable() or " " in t:
            raise ConfigError(
                f"token file {path}: tokens must be printable, without spaces, ≤ {MAX_TOKEN_LEN} chars"
            )
    return toks


def _match(token: str | None, allowed: Iterable[str]) -> bool:
    if token is None:
        return False
    tb = token.encode()
    ok = False
    for a in allowed:
        ok |= hmac.compare_digest(tb, a.encode())  # no early exit: constant time over the set
    return ok


class AuthMiddleware(flight.ServerMiddleware):
    """Per-call record of what the caller may do; handlers ask `can_write`."""

    def __init__(
        self,
        can_read: bool,
        can_write: bool,
        peer_protocol: str | None,
        token: str = "none",
        token_id: str = "",
    ) -> None:
        self.can_read = can_read
        self.can_write = can_write
        self.peer_protocol = peer_protocol
        self.token = token  # what the caller sent: "none", "write", "read" or "unknown" (matches no token)
        self.token_id = token_id  # a short hash of the token sent ("" when none): keys rate limits

    def sending_headers(self) -> dict[str, str]:
        return {PROTOCOL_HEADER: PROTOCOL_VERSION}


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Checks the protocol header and bearer token of every call."""

    def __init__(self, read_tokens: Iterable[str] = (), write_tokens: Iterable[str] = ()) -> None:
        self.read_tokens = tuple(read_tokens)
        self.write_tokens = tuple(write_tokens)

    def start_call(self, info: Any, headers: dict[str, Any]) -> AuthMiddleware:
        proto = header_json_dict(headers, PROTOCOL_HEADER)
        try:
            check_protocol(proto, who="this client")
        except PeerError as e:
            raise flight.FlightServerError(f"[lf:peer] {e}") from None
        auth = header_json_dict(headers, "authorization")
        token = None
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise flight.FlightUnauthenticatedError(
                    "[lf:auth] the authorization header must be 'Bearer <token>'"
                )
            token = value.strip()
        can_write = _match(token, self.write_tokens)
        is_read = _match(token, self.read_tokens)
        can_read = can_write or not self.read_tokens or is_read
        if token is not None and not can_write and not can_read:
            raise flight.FlightUnauthenticatedError("[lf:auth] the token is not valid for this node")
        if not can_read:
            raise flight.FlightUnauthenticatedError(
                "[lf:auth] this node needs a read token for every call; pass --token-file or LORAFLIGHT_TOKEN"
            )
        kind = "none" if token is None else "write" if can_write else "read" if is_read else "unknown"
        # only a token this node knows keys a rate limit (made-up ones would dodge it)
        tid = hashlib.sha256(token.encode()).hexdigest()[:16] if token and kind in ("write", "read") else ""
        return AuthMiddleware(can_read, can_write, proto, kind, tid)


def require_write(context: Any, what: str, writable: bool = True) -> None:
    """Raise AuthError unless the call carried a valid write token."""
    if not writable:
        raise AuthError(
            f"{what} is refused: this node has no write tokens, so it accepts no writes (denied); "
            "start it with a write token to allow publishing (`loraflight serve --token-file F`, "
            "`loraflight node run --write-token-file F`)"
        )
    mw = context.get_middleware("auth")
    if mw is not None and mw.can_write:
        return
    sent = mw.token if mw is not None else "none"
    if sent == "none":
        why = "no token was sent; pass --token-file or set LORAFLIGHT_TOKEN"
    elif sent == "read":
        why = "the token sent is a read-only token of this node"
    else:
        why = "the token sent is not one of this node's write tokens; check --token-file or LORAFLIGHT_TOKEN"
    raise AuthError(f"{what} needs a write token: {why} (denied)")


def call_source(context: Any) -> str:
    """Who a call comes from, for rate limits: its token (hashed) when one was sent, else the
    caller's address without the port (`context.peer()`, e.g. 'ipv4:10.0.0.5:51234')."""
    mw = context.get_middleware("auth") if context is not None else None
    tid = mw.token_id if isinstance(mw, AuthMiddleware) else ""
    if tid:
        return f"token:{tid}"
    try:
        peer = str(context.peer())
    except Exception:  # no peer known (in-process calls)
        return "addr:?"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0] if rest.count(":") >= 1 else rest
        return f"addr:{host.strip('[]')}"
    return f"addr:{peer[:80]}"


def call_headers(token: str | None) -> list[tuple[bytes, bytes]]:
    h = [(PROTOCOL_HEADER.encode(), PROTOCOL_VERSION.encode())]
    if token:
        h.append((b"authorization", f"Bearer {token}".encode()))
    return h


__all__ = [
    "AuthMiddleware",
    "AuthMiddlewareFactory",
    "ClientTLS",
    "ServerTLS",
    "call_headers",
    "call_source",
    "load_tokens",
    "require_write",
]

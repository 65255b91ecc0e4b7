"""The pure checks of a node config: addresses, keys, and every section's rules.

`validate(cfg)` returns every problem as one line each (`load_config` raises them all as one
`ConfigError`); the address parsers are shared with the CLI and the node's loops.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .serving.checks import api_problems, base_model_problem, device_problem
from .serving.pushrules import push_problems

if TYPE_CHECKING:
    from .config import NodeConfig

_log = logging.getLogger("loraflight.federation.config")

DEFAULT_PORT = 8815
_FLEET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def parse_uri(
    uri: str, what: str, problems: list[str], *, allow_port0: bool = False
) -> tuple[str, int] | None:
    """Check a ``grpc://host:port`` / ``grpc+tls://host:port`` address; (host, port) or None."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        problems.append(f"{what}: {uri!r} is not a valid address ({e}); use grpc://host:port")
        return None
    if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls"):
        problems.append(f"{what}: {uri!r} must start with grpc:// or grpc+tls://")
        return None
    if not parts.hostname:
        problems.append(f"{what}: {uri!r} has no host; use grpc://host:port")
        return None
    if port is None or (port == 0 and not allow_port0):
        problems.append(f"{what}: {uri!r} needs a port (grpc://host:port)")
        return None
    return parts.hostname, port


def parse_hostport(value: str, what: str, problems: list[str]) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` (DNS peers); default port 8815 when omitted."""
    v = value.strip()
    if "://" in v:
        problems.append(
            f"{what}: {value!r} should be a DNS name with an optional port (host:port), not a URI"
        )
        return None
    host, port = v, DEFAULT_PORT
    if v.startswith("["):
        end = v.find("]")
        host, rest = v[1:end], v[end + 1 :]
        if rest.startswith(":"):
            try:
                port = int(rest[1:])
            except ValueError:
                problems.append(f"{what}: {value!r} has a bad port")
                return None
    elif v.count(":") == 1:
        host, p = v.split(":")
        try:
            port = int(p)
        except ValueError:
            problems.append(f"{what}: {value!r} has a bad port")
            return None
    if not host or not (0 < port < 65536):
        problems.append(f"{what}: {value!r} needs a host and a port in 1..65535")
        return None
    return host, port


def key_problem(value: str) -> str | None:
    """None when `value` is a base64 Ed25519 public key or a readable .pub file."""
    v = value.strip()
    try:
        raw = base64.b64decode(v, validate=True)
        if len(raw) == 32:
            return None
    except (binascii.Error, ValueError):
        pass
    p = Path(os.path.expanduser(v))
    if p.is_file():
        try:
            from loraflight.engine import keys

            keys.public_b64_from_file(p)
            return None
        except Exception as e:
            return f"{v!r} is not an Ed25519 public key file: {e}"
    return f"{v!r} is neither a base64 Ed25519 public key (32 bytes) nor an existing .pub file"


def resolve_keys(values: Iterable[str]) -> list[str]:
    """Trust entries (base64 keys or .pub paths) as base64 public keys."""
    from loraflight.engine import keys

    out = []
    for v in values:
        p = Path(os.path.expanduser(v.strip()))
        out.append(keys.public_b64_from_file(p) if p.is_file() else v.strip())
    return out


def validate(cfg: NodeConfig) -> list[str]:
    """Every problem in a config (empty when it is valid)."""
    p: list[str] = []
    if not cfg.store.strip():
        p.append("store: empty; give a directory for the card store")
    if cfg.store_max_bytes < 0:
        p.append(f"store_max_bytes: {cfg.store_max_bytes} is negative; use 0 for no cap")
    lis = parse_uri(cfg.listen, "listen", p, allow_port0=True)
    if lis and urlsplit(cfg.listen).scheme == "grpc+tls" and not cfg.tls.cert:
        p.append("listen: grpc+tls:// needs tls.cert and tls.key")
    for a in cfg.advertise:
        ad = parse_uri(a, "advertise", p)
        if len(a.encode()) > 250:  # the first one travels in the mDNS TXT record (uri=..., ≤ 255 bytes)
            p.append(f"advertise: {a[:40]!r}... is longer than 250 bytes")
        if ad and ad[0] in ("0.0.0.0", "::"):
            p.append(f"advertise: {a!r} is a wildcard address; peers need a reachable host")
    if not _FLEET_RE.match(cfg.fleet):
        p.append(f"fleet: {cfg.fleet!r} must be 1-63 characters of letters, digits, '.', '_', '-'")
    # TLS
    t = cfg.tls
    if bool(t.cert) != bool(t.key):
        p.append("tls: cert and key go together; set both tls.cert and tls.key or neither")
    if bool(t.client_cert) != bool(t.client_key):
        p.append("tls: client_cert and client_key go together; set both or neither")
    if t.verify_client and not t.ca:
        p.append("tls.verify_client: needs tls.ca (the CA that signed client certificates)")
    if t.verify_client and not t.cert:
        p.append("tls.verify_client: needs TLS on (tls.cert and tls.key)")
    for name in ("cert", "key", "ca", "client_cert", "client_key"):
        v = getattr(t, name)
        if v and not Path(os.path.expanduser(v)).is_file():
            p.append(f"tls.{name}: file {v!r} does not exist")
    # tokens
    for kind in ("write", "read"):
        for tok in getattr(cfg.tokens, kind):
            if not tok or any(c.isspace() for c in tok) or not tok.isprintable():
                p.append(f"tokens.{kind}: tokens must be non-empty printable text without whitespace")
            elif len(tok) < 8:
                _log.warning("tokens.%s: a token shorter than 8 characters is easy to guess", kind)
    if cfg.tokens.peer and any(c.isspace() for c in cfg.tokens.peer):
        p.append("tokens.peer: no whitespace allowed")
    # trust
    if cfg.trust.entry not in ("open", "signed"):
        p.append(f"trust.entry: {cfg.trust.entry!r} is not 'open' or 'signed'")
    if cfg.trust.engine not in ("signed", "any"):
        p.append(f"trust.engine: {cfg.trust.engine!r} is not 'signed' or 'any'")
    for kind in ("keys", "engine_keys"):
        for v in getattr(cfg.trust, kind):
            msg = key_problem(v)
            if msg:
                p.append(f"trust.{kind}: {msg}")
    if cfg.trust.entry == "signed" and not cfg.trust.keys:
        p.append("trust.entry = 'signed' but trust.keys is empty: no card could ever enter the store")
    # discovery
    for i in cfg.discovery.interfaces:
        if not i.strip() or len(i) > 64:
            p.append(f"discovery.interfaces: {i!r} is not an interface name or address")
    for peer in cfg.discovery.peers:
        parse_uri(peer, "discovery.peers", p)
    for d in cfg.discovery.dns:
        parse_hostport(d, "discovery.dns", p)
    # sync
    if not 1 <= cfg.sync.concurrency <= 64:
        p.append(f"sync.concurrency: {cfg.sync.concurrency} is outside 1..64")
    # engine
    if cfg.engine.base_model:
        bm = cfg.engine.base_model
        msg = base_model_problem(bm)
        if msg:
            p.append(f"engine.base_model: {msg}")
        if (
            cfg.engine.hot_load
            and cfg.trust.engine == "signed"
            and not (cfg.trust.engine_keys or cfg.trust.keys)
        ):
            p.append(
                "engine: hot-load with trust.engine = 'signed' needs trust.engine_keys or trust.keys "
                "(or trust.engine = 'any'); otherwise nothing would ever load"
            )
    if cfg.export_dir and cfg.trust.engine == "signed" and not (cfg.trust.engine_keys or cfg.trust.keys):
        p.append(
            "export_dir: exported folders are served like the engine, and trust.engine = 'signed' needs "
            "trust.engine_keys or trust.keys (or trust.engine = 'any'); otherwise nothing would ever export"
        )
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.engine.device):
        p.append(f"engine.device: {cfg.engine.device!r} is not cpu, cuda, cuda:N or mps")
    elif cfg.engine.base_model:  # an engine will be built: the device must exist (loads torch)
        msg = device_problem(cfg.engine.device)
        if msg:
            p.append(f"engine.device: {msg}")
    if cfg.engine.model_id and (len(cfg.engine.model_id) > 256 or not cfg.engine.model_id.isprintable()):
        p.append("engine.model_id: at most 256 printable characters")
    p.extend(api_problems(cfg.api))  # (the node checks that an API has an engine to serve)
    p.extend(push_problems(cfg.api.push, cfg.api.push_interval))  # (and that pushing has export_dir)
    if cfg.export.path_prefix and not cfg.export.path_prefix.startswith("/"):
        p.append(f"export.path_prefix: {cfg.export.path_prefix!r} must be an absolute path")
    # intervals
    iv = cfg.intervals
    p += seconds_problems("intervals", iv, ("health", "health_timeout", "probe", "poll", "dns"))
    if not 1 <= iv.failures <= 1000:
        p.append(f"intervals.failures: {iv.failures} is outside 1..1000")
    lim = cfg.limits
    if not 1 << 20 <= lim.max_card_bytes <= 1 << 40:
        p.append(f"limits.max_card_bytes: {lim.max_card_bytes} is outside 1 MiB..1 TiB")
    p += range_problems(
        "limits",
        lim,
        (
            ("get_slots", 1, 1024),
            ("gets_per_client", 1, 1024),
            ("put_slots", 1, 1024),
            ("puts_per_client", 1, 1024),
        ),
    )
    p += seconds_problems("limits", lim, ("get_wait", "stall", "put_idle", "put_deadline", "read_timeout"))
    p.extend(swarm_problems(cfg))
    # metrics, log
    if not -1 <= cfg.metrics.port <= 65535:
        p.append(f"metrics.port: {cfg.metrics.port} is outside -1..65535 (-1: off)")
    if cfg.log.format not in ("text", "json"):
        p.append(f"log.format: {cfg.log.format!r} is not 'text' or 'json'")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        p.append(f"log.level: {cfg.log.level!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return p


def range_problems(section: str, keys: object, bounds: Iterable[tuple[str, int, int]]) -> list[str]:
    """One line per integer key of a config section (`keys`) outside its (name, low, high)."""
    out = []
    for name, low, high in bounds:
        v = getattr(keys, name)
        if not low <= v <= high:
            out.append(f"{section}.{name}: {v} is outside {low}..{high}")
    return out


def seconds_problems(section: str, keys: object, names: Iterable[str]) -> list[str]:
    """One line per key of a config section (`keys`) that is not a time in (0, 86400] seconds."""
    out = []
    for name in names:
        v = getattr(keys, name)
        if not 0 < v <= 86400:
            out.append(f"{section}.{name}: {v} must be > 0 and at most 86400 seconds")
    return out


def swarm_problems(cfg: NodeConfig) -> list[str]:
    """Every problem in the `swarm.*` keys (federation/swarm/settings.py turns them into limits)."""
    sw = cfg.swarm
    p = range_problems(
        "swarm",
        sw,
        (
            ("max_uploads", 1, 64),
            ("max_uploads_per_peer", 1, 64),
            ("fetch_concurrency", 1, 64),
            ("fetch_per_peer", 1, 64),
            ("notify", 0, 1024),
        ),
    )
    if not 0 <= sw.upload_wait <= 5:  # a fetcher gives a piece at least 10 s (swarm.fetch.SwarmConfig)
        p.append(
            f"swarm.upload_wait: {sw.upload_wait} must be 0 .. 5 seconds, well below a piece's 10 s deadline"
        )
    if not 0 <= sw.origin_extra <= 0.5:
        p.append(f"swarm.origin_extra: {sw.origin_extra} must be 0 .. 0.5 (a share of the card)")
    if not 0 <= sw.referral_wait <= 60:
        p.append(f"swarm.referral_wait: {sw.referral_wait} must be 0 .. 60 seconds")
    return p


__all__ = [
    "DEFAULT_PORT",
    "key_problem",
    "parse_hostport",
    "parse_uri",
    "range_problems",
    "resolve_keys",
    "seconds_problems",
    "swarm_problems",
    "validate",
]

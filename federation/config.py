# ruff: noqa: RUF009  (`_f` wraps dataclasses.field with help metadata; it builds no shared default)
"""The node's one configuration schema: a dataclass tree read from TOML, environment and flags.

Precedence: flags > environment (``LORAFLIGHT_<SECTION>_<KEY>``) > TOML file > defaults.
Every key has exactly one dotted path (``discovery.peers``), one environment name
(``LORAFLIGHT_DISCOVERY_PEERS``) and one flag (``--peer``); `KEYS` lists them all, and
`docs/operations.md` documents them. `load_config` collects *every* problem (unknown keys,
wrong types, invalid values) and raises one `ConfigError` listing them all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError

from .config_checks import DEFAULT_PORT, parse_hostport, parse_uri, resolve_keys, validate

_log = logging.getLogger(__name__)

ENV_PREFIX = "LORAFLIGHT_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _f(default: Any, help: str, flag: str | None = None, env: str | None = None) -> Any:
    """A schema field: its default, one-line help, and optional custom flag / env names."""
    meta = {"help": help, "flag": flag, "env": env}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TLSConfig:
    cert: str = _f("", "PEM certificate this node serves with (enables TLS: listen on grpc+tls://)")
    key: str = _f("", "PEM private key of tls.cert")
    ca: str = _f(
        "", "PEM CA bundle: verifies peers' server certificates (and client certs with verify_client)"
    )
    client_cert: str = _f("", "PEM client certificate presented to peers (mutual TLS)")
    client_key: str = _f("", "PEM private key of tls.client_cert")
    verify_client: bool = _f(False, "require clients to present a certificate signed by tls.ca (mutual TLS)")


@dataclass
class TokensConfig:
    write: list[str] = _f(
        [], "bearer tokens allowed to publish/delete (writes are refused when empty)", flag="--write-token"
    )
    read: list[str] = _f([], "bearer tokens required to read (empty: reads are open)", flag="--read-token")
    peer: str = _f("", "bearer token this node presents when it reads from peers", flag="--peer-token")
    # Token files keep secrets out of `ps` and config files (federation/token_files.py reads them).
    write_file: str = _f(
        "", "file of write tokens, one a line (join tokens.write)", flag="--write-token-file"
    )
    read_file: str = _f("", "file of read tokens, one a line (join tokens.read)", flag="--read-token-file")
    peer_file: str = _f("", "file of the peer token (when tokens.peer is empty)", flag="--peer-token-file")


@dataclass
class TrustConfig:
    entry: str = _f(
        "open", "what may enter the store: 'open' (digest checked) or 'signed' (trusted signature)"
    )
    keys: list[str] = _f(
        [], "trusted signing keys: base64 Ed25519 public keys or paths to .pub files", flag="--trust-key"
    )
    engine: str = _f(
        "signed", "what the node hot-loads and exports: 'signed' (by a key in engine_keys/keys) or 'any'"
    )
    engine_keys: list[str] = _f(
        [], "keys trusted for hot-loading (empty: the same as trust.keys)", flag="--engine-trust-key"
    )


@dataclass
class DiscoveryConfig:
    enabled: bool = _f(True, "find peers with Zeroconf/mDNS", flag="--discovery/--no-discovery")
    interfaces: list[str] = _f(
        [],
        "interface names or IPv4 addresses for mDNS (empty: every up multicast interface)",
        flag="--interface",
    )
    peers: list[str] = _f(
        [], "static peers, grpc://host:port (always used, also without mDNS)", flag="--peer"
    )
    dns: list[str] = _f(
        [], "DNS names resolved to peers (A/AAAA), host:port, e.g. a headless Service", flag="--dns-peer"
    )


@dataclass
class SyncConfig:
    enabled: bool = _f(True, "pull matching cards from peers", flag="--sync/--no-sync")
    base_models: list[str] = _f(
        [], "only cards for these base model ids (empty: any)", flag="--sync-base-model"
    )
    tags: list[str] = _f([], "only cards carrying one of these tags (empty: any)", flag="--sync-tag")
    names: list[str] = _f(
        [], "only cards whose name matches one of these globs (empty: any)", flag="--sync-name"
    )
    concurrency: int = _f(4, "concurrent fetches")


@dataclass
class EngineConfig:
    base_model: str = _f(
        "",
        "base model to hot-load into and serve: 'minilm', 'tiny:SEED', a Hugging Face folder, or a Hugging "
        "Face id in the local cache (empty: no engine)",
    )
    hot_load: bool = _f(
        True, "hot-load synced cards that match the base model", flag="--hot-load/--no-hot-load"
    )
    device: str = _f("cpu", "torch device of the engine ('cpu', 'cuda', 'cuda:1')")
    model_id: str = _f(
        "", "the base model id cards are matched against (empty: the model's own id, or the MiniLM id)"
    )


@dataclass
class ApiConfig:
    listen: str = _f(
        "",
        "HTTP address of the OpenAI-compatible API, HOST:PORT (port 0: any free port) or a Unix socket "
        "path; empty: off",
    )
    max_batch: int = _f(64, "most inputs in one forward of the cross-request batcher")
    max_wait_ms: float = _f(2.0, "how long the batcher waits for more requests before a forward, ms")
    queue: int = _f(1024, "most inputs admitted and waiting; beyond it requests get 429")
    max_inputs: int = _f(2048, "most inputs in one embeddings request")
    max_input_tokens: int = _f(0, "most tokens in one input (0: the model's context)")
    max_body_bytes: int = _f(8 * 1024 * 1024, "largest request body in bytes; larger bodies get 413")
    max_tokens: int = _f(
        256, "most tokens one completion or chat request generates (a larger max_tokens is capped to it)"
    )
    push: list[str] = _f([], "vLLM/SGLang servers to load exports into: vllm+http://H:P, sglang+http://H:P")
    push_interval: float = _f(30.0, "seconds between reconciliations of each api.push server's /v1/models")
    push_token_file: str = _f("", "file holding the bearer token the api.push servers want (empty: none)")
    max_connections: int = _f(256, "most connections and requests at once; beyond it: 503")
    header_timeout: float = _f(10.0, "seconds a request line and headers may take to arrive; then closed")
    body_timeout: float = _f(30.0, "seconds a request body may take to arrive; then 408")
    keep_alive: float = _f(5.0, "seconds an idle keep-alive connection stays open")
    max_header_bytes: int = _f(16 * 1024, "largest request line plus headers in bytes; larger: 400")
    rate: float = _f(1000.0, "requests per second one client (token, else address) may send (0: no limit)")
    burst: int = _f(2000, "requests one client may send at once above api.rate before 429s")


@dataclass
class ExportConfig:
    model_id: str = _f("", "served model id exports are for, when the node runs no engine (engine.model_id)")
    path_prefix: str = _f("", "where the api.push servers see export_dir (e.g. its mount in their container)")
    group: str = _f("", "group owning exported files, 0640/0750 (empty: readable by everyone, 0644/0755)")


@dataclass
class IntervalsConfig:
    health: float = _f(5.0, "seconds between health calls to each live peer")
    health_timeout: float = _f(2.0, "timeout of one health call, seconds")
    failures: int = _f(3, "consecutive failed health calls before a peer is dropped")
    probe: float = _f(15.0, "seconds between probes of dropped peers")
    poll: float = _f(60.0, "safety poll: seconds between full syncs when no change was announced")
    dns: float = _f(30.0, "seconds between re-resolutions of DNS peers")


@dataclass
class MetricsConfig:
    port: int = _f(-1, "Prometheus metrics HTTP port (-1: off, 0: any free port)")
    host: str = _f("127.0.0.1", "address the metrics server binds")


@dataclass
class LogConfig:
    format: str = _f("text", "log format: 'text' or 'json' (one object per line)")
    level: str = _f("INFO", "log level: DEBUG, INFO, WARNING, ERROR")


# membership.* (H15, issue 18): SWIM probes, gossip and anti-entropy (federation/membership)
@dataclass
class MembershipConfig:
    enabled: bool = _f(
        True,
        "SWIM membership: probe a few random peers per period and gossip news (off: health-check every peer)",
    )
    probe_interval: float = _f(1.0, "seconds per SWIM protocol period")
    probe_timeout: float = _f(0.0, "timeout of one SWIM ping, seconds (0: intervals.health_timeout)")
    probes: int = _f(1, "random members probed per period")
    indirect: int = _f(3, "members asked to probe one that did not answer, before suspecting it")
    fanout: int = _f(3, "members that news is pushed to per period, and that a catalog change is notified to")
    suspicion_mult: float = _f(4.0, "a suspect is dead after this * max(1, log10 N) * probe_interval seconds")
    retransmit_mult: int = _f(4, "each news item is piggybacked this * ceil(log10(N + 1)) times")
    gossip_interval: float = _f(
        0.2, "seconds between gossip rounds (fanout members) while news waits, between periods"
    )
    sync_interval: float = _f(
        10.0, "anti-entropy: seconds between member-list and epoch exchanges with one random member"
    )


# limits.* (issue 13): bounds against hostile or overloaded peers (federation/node/bounds.py
# turns them into the server's `Limits` and the client's read bounds)
@dataclass
class LimitsConfig:
    max_card_bytes: int = _f(8 << 30, "largest card this node accepts, by do_put or by a fetch, bytes")
    get_slots: int = _f(4, "do_get streams served at once (more wait up to limits.get_wait, then get 'busy')")
    gets_per_client: int = _f(3, "of those, streams one client (its token, else its address) holds at once")
    get_wait: float = _f(30.0, "seconds a do_get waits for a free slot before it is answered 'busy'")
    stall: float = _f(30.0, "seconds a served stream may make no progress before it gives its slot back")
    put_slots: int = _f(8, "do_put and do_exchange streams served at once (each kind)")
    puts_per_client: int = _f(2, "of those, streams one client holds at once")
    put_idle: float = _f(
        60.0, "seconds a do_put/do_exchange stream may stay idle before its slot is given back"
    )
    put_deadline: float = _f(900.0, "seconds one do_put may take in all")
    read_timeout: float = _f(
        30.0, "seconds a read from a peer's stream may bring nothing before this node gives the transfer up"
    )


# swarm.* (issue 19): the piece swarm's limits (federation/swarm/settings.py applies them)
@dataclass
class SwarmKeysConfig:
    max_uploads: int = _f(1, "piece streams this node sends at once (more requests wait, then get 'busy')")
    max_uploads_per_peer: int = _f(1, "of those, piece streams to one asking address")
    upload_wait: float = _f(
        0.25, "seconds a piece request waits for a free upload slot before it is answered 'busy'"
    )
    origin_extra: float = _f(
        0.25,
        "share of a card a publishing node sends again once it has sent every piece (0 .. 0.5: it sends at "
        "most 1 + this card sizes, besides pieces asked of it as the last holder)",
    )
    fetch_concurrency: int = _f(4, "piece requests one swarm fetch has in flight, to different holders")
    fetch_per_peer: int = _f(1, "piece requests one swarm fetch has in flight to one holder")
    referral_wait: float = _f(
        1.0,
        "longest wait, seconds, before a piece a holder referred elsewhere is asked of it again as its "
        "last holder (the fetch shortens it to 3 piece times)",
    )
    notify: int = _f(
        32, "peers notified at once of a card published here that the swarm spreads (the rest hear by gossip)"
    )


@dataclass
class NodeConfig:
    store: str = _f("~/.local/share/loraflight", "store directory (cards, index, node identity, epoch)")
    store_max_bytes: int = _f(0, "size cap of fetched cards in bytes, LRU-evicted (0: no cap)")
    listen: str = _f(f"grpc://0.0.0.0:{DEFAULT_PORT}", "Flight address to listen on (port 0: any free port)")
    advertise: list[str] = _f([], "addresses peers should use (empty: derived from listen and interfaces)")
    fleet: str = _f("default", "fleet id: nodes sync only with peers of the same fleet")
    fleet_secret_file: str = _f(
        "",
        "file holding the fleet secret (token-file rules, >= 16 chars): peers that prove it in a "
        "hello are confirmed; with it, unconfirmed hosts are never synced from (never printed)",
    )
    export_dir: str = _f(
        "", "write every stored card trust.engine allows as a PEFT folder here (for vLLM, LoRAX); empty: off"
    )
    status_file: str = _f("", "write a JSON status (peers, cards, loaded adapters) here on every change")
    tls: TLSConfig = field(default_factory=TLSConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    swarm: SwarmKeysConfig = field(default_factory=SwarmKeysConfig)

    def get(self, path: str) -> Any:
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def set(self, path: str, value: Any) -> None:
        *head, last = path.split(".")
        obj: Any = self
        for part in head:
            obj = getattr(obj, part)
        setattr(obj, last, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text (round-trips through `load_config`)."""
        lines: list[str] = []
        tables: list[str] = []
        for k in KEYS:
            if "." not in k.path:
                lines.append(f"{k.path} = {_toml_value(self.get(k.path))}")
        for section in _SECTIONS:
            tables.append(f"\n[{section}]")
            for k in KEYS:
                if k.path.startswith(section + "."):
                    tables.append(f"{k.name} = {_toml_value(self.get(k.path))}")
        return "\n".join(lines + tables) + "\n"

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls.cert)

    @property
    def store_path(self) -> Path:
        return Path(os.path.expanduser(self.store))


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    return json.dumps(v)


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives and how each source names it."""

    path: str  # "discovery.peers"
    type: type  # str, int, float, bool or list
    default: Any
    help: str
    env: str  # LORAFLIGHT_DISCOVERY_PEERS
    flag: str  # "--peer" or "--discovery/--no-discovery"

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def param(self) -> str:
        """Python identifier for the CLI parameter."""
        return self.path.replace(".", "__")

    @property
    def flag_names(self) -> list[str]:
        return self.flag.split("/")


def _keys() -> tuple[tuple[Key, ...], tuple[str, ...]]:
    keys: list[Key] = []
    sections: list[str] = []
    type_of = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list}
    root = NodeConfig()
    for f in dataclasses.fields(NodeConfig):
        if dataclasses.is_dataclass(getattr(root, f.name)):
            sections.append(f.name)
            sub = getattr(root, f.name)
            for g in dataclasses.fields(sub):
                keys.append(
                    _key(f"{f.name}.{g.name}", type_of[str(g.type)], getattr(sub, g.name), g.metadata)
                )
        else:
            keys.append(_key(f.name, type_of[str(f.type)], getattr(root, f.name), f.metadata))
    return tuple(keys), tuple(sections)


def _key(path: str, typ: type, default: Any, meta: Mapping[str, Any]) -> Key:
    env = meta.get("env") or ENV_PREFIX + path.replace(".", "_").upper()
    flag = meta.get("flag") or "--" + path.replace(".", "-").replace("_", "-")
    if typ is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag[2:]}"
    return Key(path, typ, default, meta["help"], env, flag)


KEYS, _SECTIONS = _keys()
KEYS_BY_PATH = {k.path: k for k in KEYS}


# ---------------------------------------------------------------- parsing each source


def _coerce(key: Key, value: Any, source: str, problems: list[str]) -> Any:
    """A value from TOML or flags, checked against the key's type; None after a problem."""
    t = key.type
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif t is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
            return list(value)
    elif isinstance(value, str):
        return value
    tname = "list of strings" if t is list else t.__name__
    problems.append(f"{key.path}: expected {tname}, got {type(value).__name__} {value!r} (from {source})")
    return None


def _parse_env(key: Key, raw: str, problems: list[str]) -> Any:
    t = key.type
    src = f"environment {key.env}"
    try:
        if t is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if t is int:
            return int(raw.strip())
        if t is float:
            return float(raw.strip())
    except ValueError:
        want = "true/false (1/0, yes/no, on/off)" if t is bool else t.__name__
        problems.append(f"{key.path}: expected {want}, got {raw!r} (from {src})")
        return None
    if t is list:
        return [x.strip() for x in raw.split(",") if x.strip()]
    return raw


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        problems.append(f"config file {path} does not exist")
        return {}
    except OSError as e:
        problems.append(f"config file {path} cannot be read: {e.strerror or e}")
        return {}
    except tomllib.TOMLDecodeError as e:
        problems.append(f"config file {path} is not valid TOML: {e}")
        return {}
    return flatten_toml(data, str(path), problems)


def flatten_toml(data: Mapping[str, Any], source: str, problems: list[str]) -> dict[str, Any]:
    """Nested TOML tables to {dotted path: value}; unknown keys become problems."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k in _SECTIONS:
            if not isinstance(v, dict):
                problems.append(f"{k}: expected a table [{k}], got {type(v).__name__} (in {source})")
                continue
            for k2, v2 in v.items():
                path = f"{k}.{k2}"
                if path not in KEYS_BY_PATH:
                    known = ", ".join(x.name for x in KEYS if x.path.startswith(k + "."))
                    problems.append(f"unknown key {path!r} in {source} (keys of [{k}]: {known})")
                    continue
                out[path] = v2
        elif k in KEYS_BY_PATH:
            out[k] = v
        else:
            problems.append(
                f"unknown key {k!r} in {source} (top-level keys: "
                + ", ".join(x.path for x in KEYS if "." not in x.path)
                + "; tables: "
                + ", ".join(_SECTIONS)
                + ")"
            )
    return out


def load_config(
    file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    base: NodeConfig | None = None,
) -> NodeConfig:
    """Build and validate a config: flags > environment > file > `base` (defaults).

    `flags` maps dotted paths (or `Key.param` names) to values; None means "not given".
    `env` defaults to `os.environ`; the file may also be named by ``LORAFLIGHT_CONFIG``.
    Raises `ConfigError` listing every problem found.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    cfg = dataclasses.replace(base) if base is not None else NodeConfig()
    if base is not None:  # deep copy the sections
        for s in _SECTIONS:
            cfg.set(s, dataclasses.replace(base.get(s)))
        for k in KEYS:
            if k.type is list:
                cfg.set(k.path, list(base.get(k.path)))
    if file is None and env.get(ENV_PREFIX + "CONFIG"):
        file = env[ENV_PREFIX + "CONFIG"]
    if file is not None:
        for path, value in _read_toml(Path(file), problems).items():
            v = _coerce(KEYS_BY_PATH[path], value, str(file), problems)
            if v is not None:
                cfg.set(path, v)
    known_env = {k.env for k in KEYS} | {ENV_PREFIX + "CONFIG"}
    for k in KEYS:
        if k.env in env:
            v = _parse_env(k, env[k.env], problems)
            if v is not None:
                cfg.set(k.path, v)
    for name in env:
        # A misspelt LORAFLIGHT_ variable would silently do nothing: say so (other tools may own some).
        if name.startswith(ENV_PREFIX) and name not in known_env and name not in _ENV_OTHER:
            _log.warning("ignoring unknown environment variable %s (see `loraflight node run --help`)", name)
    by_param = {k.param: k for k in KEYS}
    for name, value in (flags or {}).items():
        key = KEYS_BY_PATH.get(name) or by_param.get(name)
        if key is None:
            problems.append(f"unknown flag for key {name!r}")
            continue
        if value is None or (key.type is list and value == () and not isinstance(value, list)):
            continue
        v = _coerce(key, value, f"flag {key.flag_names[0]}", problems)
        if v is not None:
            cfg.set(key.path, v)
    from .token_files import add_token_files

    add_token_files(cfg, problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(_format(problems, file))
    return cfg


# Environment variables with the prefix that are not config keys (read elsewhere).
_ENV_OTHER = frozenset(
    {"LORAFLIGHT_TOKEN", "LORAFLIGHT_TOKEN_FILE", "LORAFLIGHT_HOME", "LORAFLIGHT_TRUST_DIR"}
)


def _format(problems: list[str], file: Any) -> str:
    where = f" ({file})" if file else ""
    head = f"invalid configuration{where}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return head + "\n" + "\n".join(f"  - {p}" for p in problems)


# ---------------------------------------------------------------- validation


def check_file(path: str | os.PathLike[str]) -> NodeConfig:
    """Validate one TOML file alone (no environment, no flags): what `node check-config` runs."""
    return load_config(path, env={})


__all__ = [
    "DEFAULT_PORT",
    "KEYS",
    "KEYS_BY_PATH",
    "ApiConfig",
    "DiscoveryConfig",
    "EngineConfig",
    "ExportConfig",
    "IntervalsConfig",
    "Key",
    "LimitsConfig",
    "LogConfig",
    "MembershipConfig",
    "MetricsConfig",
    "NodeConfig",
    "SwarmKeysConfig",
    "SyncConfig",
    "TLSConfig",
    "TokensConfig",
    "TrustConfig",
    "check_file",
    "load_config",
    "parse_hostport",
    "parse_uri",
    "resolve_keys",
    "validate",
]

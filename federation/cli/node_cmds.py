"""Node commands: `node run` (every config key as a flag), `node check-config`, `status`, `peers`, `demo`."""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loraflight.federation.config import KEYS, Key, check_file, load_config

from ._app import app, node_app
from .outputs import LOG_FORMAT, PlainFormatter, plain

_out = Console()
_err = Console(stderr=True)

DEFAULT_URI = "grpc://127.0.0.1:8815"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup_logging(fmt: str, level: str) -> None:
    """Route the root logger to stderr in the configured format (replaces earlier handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(LOG_FORMAT))
    root.addHandler(h)
    root.setLevel(level.upper())
    if fmt == "json":
        quiet_libraries()
    # Zeroconf logs every malformed packet on a busy LAN at WARNING; keep it quieter.
    logging.getLogger("zeroconf").setLevel(max(logging.ERROR, root.level))


def quiet_libraries() -> None:
    """Keep stderr one JSON object per line: no progress bars, library chatter through `logging`.

    Hugging Face libraries read these when they are imported (the engine imports them later);
    Python warnings become log records.
    """
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.captureWarnings(True)
    tf = sys.modules.get("transformers")
    if tf is not None:  # already imported (in-process use): switch its own handler and bars off too
        tf.logging.disable_progress_bar()
        tf.logging.disable_default_handler()
        tf.logging.enable_propagation()


# ---------------------------------------------------------------- node run: flags from the schema


def _flag_type(key: Key) -> Any:
    return {str: str | None, int: int | None, float: float | None, bool: bool | None, list: list[str] | None}[
        key.type
    ]


SECRET_KEYS = ("tokens.write", "tokens.read", "tokens.peer")


def redacted_toml(cfg: Any) -> str:
    """The config as TOML with every secret replaced by a comment saying how many there are."""
    out, section = [], ""
    for line in cfg.to_toml().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        name = line.split(" = ", 1)[0]
        path = f"{section}.{name}" if section else name
        if path in SECRET_KEYS and " = " in line:
            v = cfg.get(path)
            n = len(v) if isinstance(v, list) else int(bool(v))
            line = f"# {name}: {n} secret{'s' if n != 1 else ''}, not printed"
        out.append(line)
    return "\n".join(out) + "\n"


def _uri_flag(value: str, tls: bool) -> str:
    """HOST:PORT as grpc[+tls]://HOST:PORT; a URI is kept (the config checks it)."""
    return value if "://" in value else f"{'grpc+tls' if tls else 'grpc'}://{value}"


def _host_port_flag(value: str) -> str:
    """A DNS peer given as grpc[+tls]://HOST:PORT becomes HOST:PORT."""
    scheme, sep, rest = value.partition("://")
    return rest.rstrip("/") if sep and scheme in ("grpc", "grpc+tcp", "grpc+tls") else value


def _addresses(config: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Every address flag accepts HOST:PORT and grpc[+tls]://HOST:PORT (listen gets TLS from tls.cert)."""
    f = dict(flags)
    for name in ("advertise", "discovery__peers"):
        if f.get(name):
            f[name] = [_uri_flag(v, False) for v in f[name]]
    if f.get("discovery__dns"):
        f["discovery__dns"] = [_host_port_flag(v) for v in f["discovery__dns"]]
    if f.get("listen") and "://" not in f["listen"]:
        tls = bool(f.get("tls__cert")) or bool(load_config(config, flags={**f, "listen": None}).tls.cert)
        f["listen"] = _uri_flag(f["listen"], tls)
    return f


def check_listen_free(uri: str) -> None:
    """Raise ConfigError when another process listens on the address (gRPC would only say 'did not start')."""
    import errno
    import socket
    from urllib.parse import urlsplit

    from loraflight.errors import ConfigError

    u = urlsplit(uri)
    if not u.port:
        return
    host = u.hostname or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind((host, u.port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # not ours to judge: the server reports it
            where = f"{host}:{u.port}"
            raise ConfigError(
                f"listen: {where} is already in use (another node? 'loraflight status --node {where}'); "
                "stop it or pick another port with --listen HOST:PORT (port 0: any free port)"
            ) from None


def _say_starting(cfg: Any) -> None:
    """Loading a base model takes a while and the node answers only after it: say so at any log level."""
    import time

    msg = (
        f"loading the base model {cfg.engine.base_model} (engine.base_model); "
        f"the node answers on {cfg.listen} once it is loaded"
    )
    if cfg.log.format == "json":
        rec = {"ts": round(time.time(), 3), "level": "INFO", "logger": "loraflight.cli", "msg": msg}
        typer.echo(json.dumps(rec), err=True)
    else:
        typer.echo(msg, err=True)


def _run(config: Path | None, print_config: bool, **flags: Any) -> None:
    cfg = load_config(config, flags=_addresses(config, flags))
    if print_config:
        typer.echo(redacted_toml(cfg), nl=False)
        return
    check_listen_free(cfg.listen)
    setup_logging(cfg.log.format, cfg.log.level)
    if cfg.engine.base_model and (cfg.engine.hot_load or cfg.api.listen):
        _say_starting(cfg)
    from loraflight.federation.node import Node
    from loraflight.federation.node.signals import block_stop_signals, run_until_signal

    block_stop_signals()  # before the node starts a thread: every thread inherits the mask
    node = Node(cfg)
    raise typer.Exit(run_until_signal(node.run_forever))


def _make_run_command() -> Any:
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config", "-c", help="TOML config file (also $LORAFLIGHT_CONFIG).", show_default=False
                ),
            ],
        ),
        inspect.Parameter(
            "print_config",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool, typer.Option("--print-config", help="Print the effective config as TOML and exit.")
            ],
        ),
    ]
    for k in KEYS:
        section = k.path.split(".")[0] if "." in k.path else "node"
        params.append(
            inspect.Parameter(
                k.param,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    _flag_type(k),
                    typer.Option(
                        k.flag,  # "--x" or, for booleans, "--x/--no-x"
                        help=f"{k.help} [{k.path}; env {k.env}]",
                        rich_help_panel=section,
                        show_default=False,
                    ),
                ],
            )
        )

    def run(**kw: Any) -> None:
        """Run a node: store, Flight server, discovery, sync, hot-load (flags > env > file)."""
        config = kw.pop("config")
        print_config = kw.pop("print_config")
        _run(config, print_config, **kw)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


node_app.command("run")(_make_run_command())


@node_app.command("check-config")
def check_config_cmd(
    file: Path = typer.Argument(..., help="TOML config file to validate."),
    with_env: bool = typer.Option(False, "--with-env", help="Also apply LORAFLIGHT_* environment variables."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout: ok, problems."),
) -> None:
    """Validate a config file; lists every problem, exits 1 when there is one."""
    from loraflight.errors import ConfigError

    try:
        cfg = load_config(file) if with_env else check_file(file)
    except ConfigError as e:
        if not as_json:
            raise
        problems = [line[4:] for line in str(e).splitlines() if line.startswith("  - ")] or [str(e)]
        typer.echo(json.dumps({"file": str(file), "ok": False, "problems": problems}))
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"file": str(file), "ok": True, "fleet": cfg.fleet, "listen": cfg.listen}))
        return
    _out.print(plain(f"{file}: ok (fleet {cfg.fleet}, listen {cfg.listen})"))


# ---------------------------------------------------------------- talking to a running node


def _client_tls(ca: Path | None, cert: Path | None, key: Path | None, uri: str) -> Any:
    from loraflight.federation.security import ClientTLS

    if ca is None and cert is None and uri.startswith("grpc+tls"):
        return ClientTLS()
    if ca is None and cert is None:
        return None
    return ClientTLS.from_files(ca, cert, key)


def _token(token_file: Path | None = None) -> str | None:
    import os

    if token_file is not None:
        from loraflight.federation.security import load_tokens

        return load_tokens(token_file)[0]
    return os.environ.get("LORAFLIGHT_TOKEN") or None


Uri = typer.Option(
    DEFAULT_URI, "--node", "--uri", "-u", help="The node, HOST:PORT or grpc[+tls]://HOST:PORT."
)
TokenFile = typer.Option(
    None,
    "--token-file",
    envvar="LORAFLIGHT_TOKEN_FILE",
    help="File holding the node's read token (else $LORAFLIGHT_TOKEN).",
)
Timeout = typer.Option(5.0, "--timeout", help="Seconds to wait for the node.")
Ca = typer.Option(None, "--tls-ca", help="PEM CA that signed the node's certificate.")
Cert = typer.Option(None, "--tls-cert", help="PEM client certificate (mutual TLS).")
KeyOpt = typer.Option(None, "--tls-key", help="PEM client key (mutual TLS).")


@app.command("status")
def status_cmd(
    uri: str = Uri,
    timeout: float = Timeout,
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing; exit 0 when the node answers."),
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = Ca,
    tls_cert: Path | None = Cert,
    tls_key: Path | None = KeyOpt,
) -> None:
    """A running node's state: id, fleet, epoch, cards, loaded adapters, peers."""
    from loraflight.federation.client import node_action

    tls = _client_tls(tls_ca, tls_cert, tls_key, uri)
    if quiet:
        node_action(uri, "health", token=_token(token_file), tls=tls, timeout=timeout)
        return
    st = node_action(uri, "status", token=_token(token_file), tls=tls, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    _out.print(
        plain(
            f"node {st['node_id']}  fleet {st['fleet_id']}  epoch {st['epoch']}  "
            f"mDNS {'on' if st.get('mdns') else 'off'}  serving {', '.join(st.get('uris', []))}"
        )
    )
    loading = st.get("loading")
    if isinstance(loading, dict):  # a slow start: the model is still being built
        secs = loading.get("elapsed")
        took = f"{secs:.0f} s so far" if isinstance(secs, int | float) else "just begun"
        _out.print(plain(f"starting: {loading.get('doing')} ({took})"))
    has_engine = st.get("engine") or st.get("base_model")
    base = f"base model {st['base_model']}" if st.get("base_model") else "base model unknown"
    if not isinstance(loading, dict):
        _out.print(plain(f"engine: {base}" if has_engine else "engine: none"))
    t = Table("card", "digest", "size", "source", "loaded", title=f"{len(st['cards'])} cards")
    loaded = st.get("loaded", {})
    for c in st["cards"]:
        name = c["ref"].split("@")[0]
        is_loaded = loaded.get(name, {}).get("digest") == c["digest"]
        state = "yes" if is_loaded else (f"no: {c['refused']}" if c.get("refused") else "")
        t.add_row(
            plain(c["ref"]), plain(c["digest"][:16]), plain(c["size"]), plain(c["source"]), plain(state)
        )
    _out.print(t)
    for w in st.get("withdrawals", []):  # peer-supplied text: printed as plain text
        reason = f": {w['reason']}" if w.get("reason") else ""
        _out.print(
            plain(f"withdrawn {w['name']}@{w['version']} by {w.get('signer')} at {w.get('time')}{reason}")
        )
    _print_peers(st.get("peers", []))


def _print_peers(peers: list[dict[str, Any]]) -> None:
    t = Table("node", "address", "state", "sources", "epoch", "last ok", title=f"{len(peers)} peers")
    for p in peers:
        ago = f"{p['last_ok_ago']:.1f} s ago" if p.get("last_ok_ago") is not None else "never"
        t.add_row(  # peer-supplied: plain text, controls escaped
            plain(p.get("node_id") or "?"),
            plain(p.get("uri") or ""),
            plain(p["state"]),
            plain(",".join(map(str, p["sources"]))),
            plain(p["epoch"]),
            plain(ago),
        )
    _out.print(t)


@app.command("peers")
def peers_cmd(
    uri: str = Uri,
    timeout: float = Timeout,
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = Ca,
    tls_cert: Path | None = Cert,
    tls_key: Path | None = KeyOpt,
) -> None:
    """A running node's peer table."""
    from loraflight.federation.client import node_action

    peers = node_action(
        uri,
        "peers",
        token=_token(token_file),
        tls=_client_tls(tls_ca, tls_cert, tls_key, uri),
        timeout=timeout,
    )
    if as_json:
        typer.echo(json.dumps(peers, indent=2, sort_keys=True))
        return
    _print_peers(peers)


# ---------------------------------------------------------------- demo


@app.command("demo")
def demo_cmd(
    tiny: bool = typer.Option(
        False, "--tiny", help="Use the built-in tiny encoder instead of all-MiniLM-L6-v2."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default: the demo's own)."),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Keep the nodes' stores here (default: temporary)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON at the end."),
) -> None:
    """Three nodes on loopback: node 1 trains, signs and publishes a skill; nodes 2 and 3 discover,
    sync, verify and hot-load it. Prints a held-out metric before/after on each and the propagation time."""
    from loraflight.federation.demo import run_demo

    result = run_demo(console=_out, tiny=tiny, steps=steps, workdir=workdir)
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))


__all__ = [
    "SECRET_KEYS",
    "check_config_cmd",
    "check_listen_free",
    "demo_cmd",
    "peers_cmd",
    "quiet_libraries",
    "redacted_toml",
    "setup_logging",
    "status_cmd",
]

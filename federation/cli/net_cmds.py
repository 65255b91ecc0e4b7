"""Network commands: serve, ls, fetch, publish, sync, delete, withdraw, and `trust add|list|remove`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Column, Table

from loraflight.errors import ConfigError

from ._app import app, trust_app
from .outputs import plain, plain_lines

_out = Console()
_err = Console(stderr=True)

TokenFile = typer.Option(
    None,
    "--token-file",
    envvar="LORAFLIGHT_TOKEN_FILE",
    help="File holding the bearer token (else $LORAFLIGHT_TOKEN).",
)
TlsCa = typer.Option(None, "--tls-ca", help="PEM CA that signed the server's certificate.")
TlsCert = typer.Option(None, "--tls-cert", help="PEM client certificate (mutual TLS).")
TlsKey = typer.Option(None, "--tls-key", help="PEM client key (mutual TLS).")
AsJson = typer.Option(False, "--json", help="One JSON document on stdout.")
NODE_HELP = "The node, HOST:PORT or grpc[+tls]://HOST:PORT"


def _token(token_file: Path | None) -> str | None:
    if token_file is not None:
        from loraflight.federation.security import load_tokens

        return load_tokens(token_file)[0]
    return os.environ.get("LORAFLIGHT_TOKEN") or None


def _tls(ca: Path | None, cert: Path | None, key: Path | None, uri: str | None = None):
    from loraflight.federation.security import ClientTLS

    if ca is None and cert is None and key is None:
        if uri is not None and uri.startswith("grpc+tls"):
            return ClientTLS()
        return None
    return ClientTLS.from_files(ca, cert, key)


def _client(uri: str, token_file: Path | None, ca: Path | None, cert: Path | None, key: Path | None):
    from loraflight.federation.client import Client

    tls = _tls(ca, cert, key, uri)
    return Client(uri, token=_token(token_file), tls=tls)


def _one_node(positional: str | None, option: str | None) -> str:
    if positional and option and positional != option:
        raise typer.BadParameter(f"two nodes given ({positional!r} and --node {option!r}); name one")
    if not (positional or option):
        raise typer.BadParameter("name the node: --node HOST:PORT")
    return positional or option or ""


def _parse_ref(ref: str) -> tuple[str, int | str]:
    name, _, version = ref.partition("@")
    if not version or version == "latest":
        return name, "latest"
    if not version.isdigit() or int(version) < 1:
        raise ConfigError(f"{ref!r}: the version after '@' must be a positive integer or 'latest'")
    return name, int(version)


@app.command()
def serve(
    store: Path = typer.Option(..., "--store", help="Store directory (created if missing)."),
    listen: str = typer.Option("127.0.0.1:0", "--listen", help="HOST:PORT to listen on (port 0 = any)."),
    advertise: list[str] = typer.Option(
        [], "--advertise", help="HOST:PORT other hosts use to reach this node (repeatable)."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM server certificate."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM server key."),
    tls_client_ca: Path | None = typer.Option(
        None, "--tls-client-ca", help="PEM CA for client certificates (mutual TLS)."
    ),
    token_file: Path | None = typer.Option(None, "--token-file", help="Write tokens, one per line."),
    read_token_file: Path | None = typer.Option(
        None, "--read-token-file", help="Read tokens; without it reads are open."
    ),
    trust: str = typer.Option("open", "--trust", help="Entry policy: open (digest only) or signed."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Store size cap (LRU eviction)."),
) -> None:
    """Serve a store over Arrow Flight until SIGTERM/SIGINT (a node without discovery and sync)."""
    # One code path: `serve` is `node run` with discovery and sync off.
    from loraflight.federation.config import load_config
    from loraflight.federation.node import Node
    from loraflight.federation.security import load_tokens
    from loraflight.federation.server import normalize_uri

    cfg = load_config(
        env={},
        flags={
            "store": str(store),
            "listen": normalize_uri(listen),
            "advertise": [normalize_uri(a) for a in advertise],
            "tls.cert": str(tls_cert) if tls_cert else None,
            "tls.key": str(tls_key) if tls_key else None,
            "tls.ca": str(tls_client_ca) if tls_client_ca else None,
            "tls.verify_client": tls_client_ca is not None,
            "tokens.write": list(load_tokens(token_file)) if token_file else None,
            "tokens.read": list(load_tokens(read_token_file)) if read_token_file else None,
            "trust.entry": trust,
            "store_max_bytes": max_bytes or 0,
            "discovery.enabled": False,
            "sync.enabled": False,
        },
    )

    from .node_cmds import check_listen_free

    check_listen_free(cfg.listen)

    def ready(node: Node) -> None:
        _out.print(plain(f"serving {node.uri} node={node.node_id} store={store}"))
        _out.file.flush()

    raise typer.Exit(Node(cfg).run_forever(on_ready=ready))


@app.command("ls")
def ls_cmd(
    uri: str | None = typer.Argument(None, help=f"{NODE_HELP} (or --node).", show_default=False),
    node: str | None = typer.Option(None, "--node", help=f"{NODE_HELP}."),
    name: str | None = typer.Option(None, "--name", help="Name glob."),
    base_model: str | None = typer.Option(None, "--base-model"),
    tag: list[str] = typer.Option([], "--tag", help="Required tag (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """List a node's cards with every location that holds them."""
    uri = _one_node(uri, node)
    with _client(uri, token_file, tls_ca, tls_cert, tls_key) as c:
        entries = c.list(name=name, base_model=base_model, tags=tuple(tag))
        withdrawn = [] if as_json else c.withdrawals()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    t = Table("version", "size", "base model", "tags", "signer", "digest")
    t.columns.insert(0, Column("name", no_wrap=True))
    t.add_column("locations", overflow="fold")
    for e in entries:
        t.add_row(  # every cell came from the peer: plain text, controls escaped
            plain(e.name),
            plain(e.version),
            plain(f"{e.size:,}"),
            plain(e.header.base_model or ""),
            plain(",".join(e.header.tags)),
            plain(e.header.signer or "unsigned"),
            plain(e.digest[:12]),
            plain_lines(e.locations),
        )
    _out.print(t)
    _print_withdrawals(withdrawn)


def _bar(quiet: bool = False) -> Progress:
    """A transfer bar on stderr; silent with --json (`quiet`) or when stderr is not a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_err,
        transient=True,
        disable=quiet or not _err.is_terminal,
    )


@app.command()
def fetch(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION."),
    source: str = typer.Option(..., "--node", "--from", help=f"{NODE_HELP} to fetch from."),
    store: Path = typer.Option(Path("./loraflight-store"), "--store", help="Store directory."),
    trust: str = typer.Option("open", "--trust", help="Entry policy of the store: open or signed."),
    as_json: bool = AsJson,
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """Fetch a card (verified before it is stored) into a local store."""
    from loraflight.federation.store import Store

    name, version = _parse_ref(ref)
    with Store(store, trust=trust) as st, _client(source, token_file, tls_ca, tls_cert, tls_key) as c:
        entry = _remote_info(c, source, name, version)
        with _bar(quiet=as_json) as bar:
            task = bar.add_task(entry.ref, total=entry.size)
            card = c.fetch_entry(entry, store=st, progress=lambda done, tot: bar.update(task, completed=done))
    if as_json:
        doc = {"ref": card.ref, "name": card.name, "version": card.version, "digest": card.digest}
        typer.echo(json.dumps({**doc, "size": entry.size, "path": str(card.path), "node": source}))
        return
    _out.print(plain(f"fetched {card.ref} {card.digest} -> {card.path}"))


def _remote_info(c: Any, node: str, name: str, version: int | str) -> Any:
    """The node's entry for NAME@VERSION; a missing card says which node lacks it and how to look."""
    from loraflight.errors import CardNotFound

    try:
        return c.info(name, version)
    except CardNotFound:
        what = name if version == "latest" else f"{name}@{version}"
        raise CardNotFound(
            f"node {node} has no card {what}; 'loraflight ls --node {node}' lists what it has"
        ) from None


@app.command()
def publish(
    file: Path = typer.Argument(..., help="A .lora.arrow card file."),
    to: str = typer.Option(..., "--node", "--to", help=f"{NODE_HELP} to publish to."),
    as_json: bool = AsJson,
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """Upload a card to a node (needs a write token)."""
    from loraflight.engine.card import LoRACard

    card = LoRACard.open(file)
    card.verify()
    with _client(to, token_file, tls_ca, tls_cert, tls_key) as c, _bar(quiet=as_json) as bar:
        task = bar.add_task(card.ref, total=None)
        digest = c.publish(card, progress=lambda done, tot: bar.update(task, completed=done, total=tot))
    if as_json:
        typer.echo(
            json.dumps(
                {"ref": card.ref, "name": card.name, "version": card.version, "digest": digest, "node": to}
            )
        )
        return
    _out.print(plain(f"published {card.ref} {digest}"))


@app.command("sync")
def sync_cmd(
    sources: list[str] = typer.Option(
        ..., "--node", "--from", help=f"{NODE_HELP} to pull from (repeatable)."
    ),
    store: Path = typer.Option(Path("./loraflight-store"), "--store", help="Store directory."),
    base_model: list[str] = typer.Option([], "--base-model", help="Only these base models."),
    tag: list[str] = typer.Option([], "--tag", help="Only cards with one of these tags."),
    name: list[str] = typer.Option([], "--name", help="Only names matching these globs."),
    trust: str = typer.Option("open", "--trust", help="Entry policy of the store: open or signed."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64),
    as_json: bool = AsJson,
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """Pull what the peers have that the policy wants (newest versions, lineage included)."""
    from loraflight.federation.store import Store
    from loraflight.federation.sync import SyncPolicy, SyncProgress, sync

    policy = SyncPolicy(base_models=tuple(base_model), tags=tuple(tag), names=tuple(name))
    tls = _tls(tls_ca, tls_cert, tls_key, sources[0])
    with Store(store, trust=trust) as st, _bar(quiet=as_json) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(p: SyncProgress) -> None:
            if p.ref not in tasks:
                tasks[p.ref] = bar.add_task(p.ref, total=p.bytes_total)
            bar.update(tasks[p.ref], completed=p.bytes_done)

        report = sync(
            sources, policy, st, concurrency=concurrency, progress=progress, token=_token(token_file), tls=tls
        )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "fetched": [{"ref": e.ref, "digest": e.digest} for e in report.fetched],
                    "errors": dict(report.errors),
                    "peer_errors": dict(report.peer_errors),
                }
            )
        )
        if not report.ok:
            raise typer.Exit(1)
        return
    for e in report.fetched:
        _out.print(plain(f"fetched {e.ref} {e.digest}"))
    for uri, msg in report.peer_errors.items():
        _err.print(plain(f"error: peer {uri}: {msg}"))
    for ref, msg in report.errors.items():
        _err.print(plain(f"error: {ref}: {msg}"))
    _out.print(
        plain(
            f"sync: {len(report.fetched)} fetched, {len(report.errors)} failed, "
            f"{len(report.peer_errors)} peers unreachable"
        )
    )
    if not report.ok:
        raise typer.Exit(1)


# -- delete and withdraw


def _print_withdrawals(records: list) -> None:
    if not records:
        return
    t = Table("withdrawn", "signer", "time", "reason", title=f"{len(records)} withdrawn (refused for good)")
    for w in records:
        t.add_row(plain(w.ref), plain(w.signer or ""), plain(w.time), plain(w.reason))
    _out.print(t)


@app.command()
def delete(
    ref: str = typer.Argument(..., help="NAME@VERSION (or NAME: the newest version)."),
    node: str = typer.Option(..., "--node", help="Node address, HOST:PORT or grpc[+tls]://HOST:PORT."),
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """Delete a card from ONE node (needs a write token); peers still hold it and send it back."""
    name, version = _parse_ref(ref)
    with _client(node, token_file, tls_ca, tls_cert, tls_key) as c:
        out = c.delete(name=name, version=version)
    _out.print(
        plain(
            f"deleted {out.get('ref', ref)} {out.get('removed', '')} from {node} only: it comes back from "
            f"peers that hold it unless withdrawn ('loraflight withdraw {out.get('ref', ref)} --node {node} "
            "--key KEY')"
        )
    )


@app.command()
def withdraw(
    ref: str = typer.Argument(..., help="NAME@VERSION to take back from the whole fleet."),
    node: str = typer.Option(..., "--node", help="Node address, HOST:PORT or grpc[+tls]://HOST:PORT."),
    key: Path = typer.Option(..., "--key", help="Private key file of a key trusted for that name."),
    reason: str = typer.Option(
        "", "--reason", help="Why (kept with the withdrawal, shown by ls and status)."
    ),
    token_file: Path | None = TokenFile,
    tls_ca: Path | None = TlsCa,
    tls_cert: Path | None = TlsCert,
    tls_key: Path | None = TlsKey,
) -> None:
    """Withdraw a card fleet-wide: a signed record every node keeps for good; each deletes the
    card, never fetches or accepts that NAME@VERSION again and rolls back to the newest
    remaining version (needs a write token)."""
    from loraflight.engine.keys import load_private
    from loraflight.federation.withdrawal import new_withdrawal, parse_ref

    name, version = parse_ref(ref)
    w = new_withdrawal(name, version, load_private(key), reason=reason)
    with _client(node, token_file, tls_ca, tls_cert, tls_key) as c:
        out = c.withdraw(w)
    removed = out.get("removed") or []
    state = "withdrawn" if out.get("new") else "already withdrawn"
    _out.print(
        plain(
            f"{state} {w.ref} on {node} (signer {w.signer}); {len(removed)} card(s) deleted there; "
            "the fleet follows as nodes sync"
        )
    )


# -- trust


def _key_arg(key: str) -> str:
    """A key argument as base64: read from the file it names, else the text itself (a key or signer id)."""
    from loraflight.engine.keys import public_b64_from_file

    try:
        is_file = Path(key).is_file()
    except OSError:  # e.g. a base64 key longer than a file name may be
        is_file = False
    return public_b64_from_file(key) if is_file else key.strip()


@trust_app.command("add")
def trust_add(
    key: str = typer.Argument(..., help="Public key file (PEM or base64) or base64 key text."),
    store: Path = typer.Option(Path("./loraflight-store"), "--store", help="Store directory."),
    label: str = typer.Option("", "--label", help="A note to remember whose key this is."),
    name: list[str] = typer.Option(
        [], "--name", help="Name globs this key may publish even when another key owns them."
    ),
) -> None:
    """Trust a signing key in a store (used by the 'signed' entry policy)."""
    from loraflight.federation.store import Store

    b64 = _key_arg(key)
    with Store(store) as st:
        tk = st.trust_add(b64, label=label, names=name)
    _out.print(plain(f"trusted {tk.signer} {tk.label}".rstrip()))


@trust_app.command("list")
def trust_list(
    store: Path = typer.Option(Path("./loraflight-store"), "--store", help="Store directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Keys a store trusts."""
    from loraflight.federation.store import Store

    with Store(store) as st:
        keys = list(st.trusted_keys().values())
    if as_json:
        typer.echo(
            json.dumps(
                [{"signer": k.signer, "key": k.key, "label": k.label, "names": list(k.names)} for k in keys]
            )
        )
        return
    t = Table("signer", "label", "names", "key")
    for k in keys:
        t.add_row(
            plain(k.signer), plain(k.label), plain(",".join(k.names) or "(unowned names)"), plain(k.key)
        )
    _out.print(t)


@trust_app.command("remove")
def trust_remove(
    key: str = typer.Argument(..., help="Signer id, base64 key, or public key file."),
    store: Path = typer.Option(Path("./loraflight-store"), "--store", help="Store directory."),
) -> None:
    """Stop trusting a key."""
    from loraflight.federation.store import Store

    ident = _key_arg(key)
    with Store(store) as st:
        if not st.trust_remove(ident):
            raise ConfigError(f"{key} is not a trusted key of {store}; see 'loraflight trust list'")
    _out.print(plain(f"removed {key}"))


__all__ = [
    "delete",
    "fetch",
    "ls_cmd",
    "publish",
    "serve",
    "sync_cmd",
    "trust_add",
    "trust_list",
    "trust_remove",
    "withdraw",
]

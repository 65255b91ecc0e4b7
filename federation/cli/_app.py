"""The Typer apps that command modules attach to."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="loraflight",
    help="Share LoRA adapter cards across a fleet: store, serve, discover, sync, hot-load.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
card_app = typer.Typer(help="Inspect, verify, sign and convert .lora.arrow cards.", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 signing keys.", no_args_is_help=True)
trust_app = typer.Typer(help="Keys this machine trusts to sign cards.", no_args_is_help=True)
node_app = typer.Typer(help="Run and query a loraflight node.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from loraflight import __version__

        typer.echo(f"loraflight {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_version
    ),
) -> None:
    """Share LoRA adapter cards across a fleet: store, serve, discover, sync, hot-load."""


app.add_typer(card_app, name="card")
app.add_typer(keys_app, name="keys")
app.add_typer(trust_app, name="trust")
app.add_typer(node_app, name="node")

__all__ = ["app", "card_app", "keys_app", "node_app", "trust_app"]

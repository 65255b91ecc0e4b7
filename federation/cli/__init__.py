"""The `loraflight` command line: one Typer app; each area registers its commands.

Errors a user can cause print one line (`error: ...`) and exit non-zero, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from loraflight.errors import LoraflightError, PeerError

from ._app import app, card_app, keys_app, trust_app
from .outputs import LOG_FORMAT, PlainFormatter, printable

# Each module adds its commands to the apps in _app; imported for that side effect.
_COMMAND_MODULES = ("card_cmds", "net_cmds", "node_cmds", "author_cmds")


def register_commands() -> None:
    """Import every command module, so each adds its commands to the apps (idempotent)."""
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise


def unreachable_hint(msg: str) -> str:
    """A peer error without gRPC's wording when nothing answered: what failed and what to check."""
    head, sep, detail = msg.partition(" unreachable: ")
    if not sep:
        return msg
    reason = detail.rsplit(": ", 1)[-1].strip() or "no answer"
    return (
        f"{head}: nothing answered ({reason}); is a node running there? "
        "check the address (--node HOST:PORT) and that the node runs"
    )


def _usage_error(e: typer.TyperException) -> int:
    """Show a usage error the way click does (usage line, hint, one `Error:` line); its exit code (2)."""
    show = getattr(e, "show", None)
    if callable(show):
        show()
    else:
        typer.echo(f"error: {e.format_message()}", err=True)
    return int(getattr(e, "exit_code", 2) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter(LOG_FORMAT))  # a peer's text in a log line: controls escaped
    logging.basicConfig(level=os.environ.get("LORAFLIGHT_LOG_LEVEL", "WARNING").upper(), handlers=[handler])
    register_commands()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="loraflight")
    except PeerError as e:
        typer.echo(f"error: {printable(unreachable_hint(str(e)), newlines=True)}", err=True)
        return 1
    except LoraflightError as e:
        typer.echo(f"error: {printable(e, newlines=True)}", err=True)
        return 1
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except OSError as e:  # a file or port the user named cannot be used: say which, no traceback
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or e}{where}", err=True)
        return 1
    except typer.TyperException as e:  # usage errors (typer's bundled click raises these)
        return _usage_error(e)
    return int(rv) if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = [
    "app",
    "card_app",
    "console_main",
    "keys_app",
    "main",
    "register_commands",
    "trust_app",
    "unreachable_hint",
]


def console_main() -> None:
    sys.exit(main())

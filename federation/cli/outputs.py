"""Where commands write (folders created or refused clearly, nothing overwritten without --force),
and how they print strings that came from a card or a peer (`plain`, `printable`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import typer
from rich.text import Text

from loraflight.engine.card import CARD_SUFFIX
from loraflight.errors import ConfigError


def printable(value: object, *, newlines: bool = False) -> str:
    """`value` as text safe for a terminal: every character that is not printable (ESC and the
    other C0/C1 controls, CR, newline, DEL, bidi overrides such as U+202E, zero-width and other
    format characters) is written as its Python escape (``\\x1b``, ``\\u202e``).

    For every string a card, a peer or a node supplies; Rich markup is not parsed in the
    result only when it is printed through `plain` (or typer.echo).
    With ``newlines=True`` a newline is kept (multi-line error messages); CR never is.
    """
    s = str(value)
    if s.isprintable():
        return s
    keep = "\u200d\n" if newlines else "\u200d"  # a zero-width joiner only joins emoji
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in s
    )


def plain(value: object, style: str = "") -> Text:
    """A Rich `Text` of `printable(value)`: printed as it is (no markup, no emoji codes, no highlighting)."""
    return Text(printable(value), style=style)


def plain_lines(values: Iterable[object]) -> Text:
    """Several card- or peer-supplied strings, one per line, as plain text (for a table cell)."""
    return Text("\n").join(plain(v) for v in values)


class PlainFormatter(logging.Formatter):
    """Text log lines with control characters escaped (a peer's error text is logged too);
    newlines stay, so tracebacks read as before."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), newlines=True)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


# For Annotated[bool, Force] = False parameters.
Force = typer.Option("--force", help="Overwrite what is already there.")

# What `card to-peft` writes into its folder (engine.peft_io.CONFIG_NAME / WEIGHTS_NAME).
PEFT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})


def card_out_path(out: Path | None, name: str, version: int, *, force: bool = False) -> Path:
    """The card file for --out: a folder (existing, or a path not ending in .lora.arrow) gets
    NAME-vVERSION.lora.arrow inside it; the folder is made now, so a bad --out fails before the work."""
    default = f"{name}-v{version}{CARD_SUFFIX}"
    if out is None:
        path = Path(default)
    elif out.is_dir() or not out.name.endswith(CARD_SUFFIX):
        path = out / default
    else:
        path = out
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder {path.parent}: {e.strerror or e}") from None
    check_overwrite(path, force)
    return path


def check_overwrite(path: Path, force: bool) -> None:
    """Refuse to replace an existing file unless --force."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; name a {CARD_SUFFIX} file (or a folder to write into)")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it, or choose another path")


def check_peft_folder(directory: Path, force: bool) -> None:
    """A PEFT export goes into a new or empty folder, or over an earlier export with --force."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a folder; name a new folder for the PEFT adapter")
    if not directory.is_dir():
        return
    entries = {p.name for p in directory.iterdir()}
    if not entries:
        return
    if not entries <= PEFT_FILES:
        others = ", ".join(sorted(entries - PEFT_FILES)[:3])
        raise ConfigError(
            f"{directory} is not empty and is not a PEFT adapter folder (it holds {others}); "
            "name a new or empty folder"
        )
    if not force:
        raise ConfigError(f"{directory} already holds a PEFT adapter; pass --force to overwrite it")


__all__ = [
    "LOG_FORMAT",
    "PEFT_FILES",
    "Force",
    "PlainFormatter",
    "card_out_path",
    "check_overwrite",
    "check_peft_folder",
    "plain",
    "plain_lines",
    "printable",
]

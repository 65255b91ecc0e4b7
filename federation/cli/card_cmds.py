"""`loraflight card ...` and `loraflight keys new`: inspect, verify, sign and convert cards.

Errors raise LoraflightError subclasses; `federation.cli.main` turns them into one line and exit 1.
Imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loraflight.engine import keys as keyfiles
from loraflight.engine.authoring.arrays import from_float
from loraflight.engine.card import CARD_SUFFIX, CardMeta, LoRACard, ModuleLoRA, Verification, base_fingerprint
from loraflight.errors import CardError, ConfigError, LoraflightError

from ._app import card_app, keys_app
from .outputs import Force, check_overwrite, check_peft_folder, plain, printable

_out = Console(highlight=False, soft_wrap=True)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _trusted_keys(keys: list[str] | None) -> list[str] | None:
    """Each --key is a key file (PEM, base64, a private key's public half) or a base64 key / signer id."""
    if not keys:
        return None
    out = []
    for k in keys:
        p = Path(k)
        if p.exists():
            out.append(keyfiles.public_b64_from_file(p))
        elif len(k) in (32, 44):  # a signer id (32 hex) or a raw key in base64 (44 chars)
            out.append(k)
        else:
            raise ConfigError(f"--key {k!r} is neither a key file nor a base64 public key or signer id")
    return out


def _verification(card: LoRACard, trusted: list[str] | None, require_signed: bool) -> Verification:
    return card.verify(trusted=trusted, require_signed=require_signed)


@card_app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A .lora.arrow card.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a card's header, modules, sizes, digest and signature status."""
    card = LoRACard.open(file)
    try:
        v = card.verify()
        status, ok = v.status, True
    except CardError as e:
        status, ok = f"FAILED: {e}", False
    h = card.header
    if as_json:
        _echo_json(
            {
                "file": str(file),
                "file_bytes": file.stat().st_size,
                "tensor_bytes": card.tensor_nbytes,
                "header": h.to_dict(),
                "format_major": card.format_major,
                "pieces": len(h.pieces),
                "verified": ok,
                "status": status,
                "modules": [
                    {
                        "module": m.module,
                        "rank": m.rank,
                        "alpha": m.alpha,
                        "in_features": m.in_features,
                        "out_features": m.out_features,
                        "bytes": m.a.nbytes + m.b.nbytes,
                    }
                    for m in card
                ],
            }
        )
        return
    _out.print(Text.assemble(plain(h.ref, style="bold"), "  ", plain(file)))
    rows = [
        ("format", f"{h.format} ({_format_words(card)})"),
        ("dtype", h.dtype),
        ("scaling", h.scaling),
        ("description", h.description),
        ("tags", ", ".join(h.tags)),
        ("base model", h.base_model or "-"),
        ("base fingerprint", h.base_fingerprint or "-"),
        ("author", h.author),
        ("created", h.created),
        ("lineage", ", ".join(x[:16] for x in h.lineage) or "-"),
        *([("upgraded from", h.upgraded_from)] if h.upgraded_from else []),
        ("from PEFT", "yes" if h.peft is not None else "no"),
        ("digest", h.digest),
        ("signer", h.signer or "-"),
        (
            "size",
            f"{_size(file.stat().st_size)} file, {_size(card.tensor_nbytes)} of tensors, {len(card)} modules",
        ),
        ("status", status),
    ]
    for key, val in sorted(h.extra.items()):
        rows.append((f"{key} (newer format)", json.dumps(val)))
    for key, text in rows:  # every value came from the card: plain text, controls escaped
        style = "red" if key == "status" and not ok else ""
        _out.print(Text.assemble(plain(f"  {key:>17}: "), plain(text, style=style)))
    t = Table("module", "rank", "alpha", "in", "out", "bytes", box=None, pad_edge=False)
    for m in card:
        t.add_row(
            plain(m.module),
            str(m.rank),
            f"{m.alpha:g}",
            str(m.in_features),
            str(m.out_features),
            _size(m.a.nbytes + m.b.nbytes),
        )
    _out.print(t)


@card_app.command("verify")
def verify_cmd(
    file: Annotated[Path, typer.Argument(help="A .lora.arrow card.")],
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="Trusted public key (file, base64 or signer id); repeatable."),
    ] = None,
    require_signed: Annotated[
        bool, typer.Option("--require-signed", help="Fail unless validly signed.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check values, digest and signature. An intact unsigned card passes (says 'unsigned')
    unless --key or --require-signed is given."""
    try:
        card = LoRACard.open(file)
        v = _verification(card, _trusted_keys(key), require_signed)
    except LoraflightError as e:
        if as_json:
            _echo_json({"file": str(file), "ok": False, "error": str(e), "kind": type(e).__name__})
            raise typer.Exit(1) from None
        raise
    if as_json:
        _echo_json(
            {
                "file": str(file),
                "ok": True,
                "ref": card.ref,
                "digest": v.digest,
                "signed": v.signed,
                "signer": v.signer,
                "trusted": v.trusted,
                "status": v.status,
            }
        )
    else:
        typer.echo(printable(f"ok: {card.ref} {v.digest} {v.status}"))


@card_app.command("sign")
def sign_cmd(
    file: Annotated[Path, typer.Argument(help="A .lora.arrow card.")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key file (or its directory).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of in place.")] = None,
    force: Annotated[bool, Force] = False,
) -> None:
    """Sign a card (after verifying it); writes atomically, in place by default."""
    if out is not None:
        check_overwrite(out, force)
    priv = keyfiles.load_private(key)
    card = LoRACard.open(file)
    card.verify()
    signed = card.sign(priv)
    dest = signed.write(out or file)
    typer.echo(printable(f"signed {signed.ref} by {signed.header.signer}: {dest}"))


def _format_words(card: LoRACard) -> str:
    if card.format_major >= 2:
        n = len(card.header.pieces)
        return f"format 2: {n} BLAKE3 piece{'s' if n != 1 else ''}"
    return "format 1: one sha256 digest; 'loraflight card upgrade' converts it"


@card_app.command("upgrade")
def upgrade_cmd(
    file: Annotated[Path, typer.Argument(help="A format-1 .lora.arrow card.")],
    out: Annotated[Path, typer.Argument(help="Where to write the format-2 card.")],
    key: Annotated[
        Path | None, typer.Option("--key", help="Ed25519 private key file (or its directory) to sign with.")
    ] = None,
) -> None:
    """Rewrite a format-1 card as format 2 (BLAKE3 pieces), after verifying it.

    Same tensors and header fields; a new digest, with `upgraded_from` naming the old one.
    A signed card needs --key: the old signature covers the old digest only.
    """
    priv = keyfiles.load_private(key) if key is not None else None
    card = LoRACard.open(file)
    card.verify()
    if card.header.signature is not None and priv is None:
        raise ConfigError(
            f"{card.ref} is signed by {card.header.signer}; pass --key KEY to sign the upgraded card "
            "(the old signature covers the old digest only)"
        )
    new = card.upgrade(priv)
    dest = new.write(out)
    signed = f", signed by {new.header.signer}" if new.header.signer else ", unsigned"
    typer.echo(
        f"upgraded {new.ref} to format {new.header.format}: {new.digest} (from {card.digest}){signed}: {dest}"
    )
    if card.header.signer is not None and new.header.signer != card.header.signer:
        typer.echo(
            f"note: the old card was signed by {card.header.signer}, the new one by {new.header.signer}; "
            "stores treat the two as one card only when the signer is the same"
        )


def _tags(tags: list[str] | None) -> list[str]:
    return [t.strip() for group in tags or [] for t in group.split(",") if t.strip()]


@card_app.command("from-peft")
def from_peft_cmd(
    directory: Annotated[
        Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + safetensors).")
    ],
    out: Annotated[Path, typer.Argument(help=f"Output card ({CARD_SUFFIX}).")],
    name: Annotated[str | None, typer.Option(help="Card name (default: the folder's name).")] = None,
    version: Annotated[int, typer.Option(help="Card version (a positive integer).")] = 1,
    description: Annotated[str, typer.Option(help="What the adapter does (the router reads it).")] = "",
    tags: Annotated[
        list[str] | None, typer.Option("--tags", help="Tags, comma-separated; repeatable.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Base model id (default: from adapter_config.json).")
    ] = None,
    author: Annotated[str, typer.Option(help="Author.")] = "",
    key: Annotated[Path | None, typer.Option("--key", help="Also sign with this private key.")] = None,
    force: Annotated[bool, Force] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Import a PEFT LoRA adapter folder as a card, exactly (refuses what a card cannot hold)."""
    from loraflight.engine.peft_io import from_peft, sanitize_name

    check_overwrite(out, force)
    meta = CardMeta(
        name=name if name is not None else sanitize_name(directory.resolve().name),
        version=version,
        description=description,
        tags=tuple(_tags(tags)),
        base_model=base_model,
        author=author,
    )
    card = from_peft(directory, meta=meta)
    if key is not None:
        card = card.sign(keyfiles.load_private(key))
    card.write(out)
    if as_json:
        _echo_json({"ref": card.ref, "digest": card.digest, "modules": len(card), "dtype": card.dtype,
                    "path": str(out)})  # fmt: skip
        return
    typer.echo(f"wrote {card.ref} ({len(card)} modules, {card.dtype}) {card.digest}: {out}")


@card_app.command("to-peft")
def to_peft_cmd(
    file: Annotated[Path, typer.Argument(help="A .lora.arrow card.")],
    directory: Annotated[Path, typer.Argument(help="Output PEFT adapter folder (new or empty).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an earlier PEFT export there.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Export a card (after verifying it) as a PEFT adapter folder."""
    from loraflight.engine.peft_io import to_peft

    check_peft_folder(directory, force)
    card = LoRACard.open(file)
    to_peft(card, directory)
    if as_json:
        _echo_json({"ref": card.ref, "digest": card.digest, "path": str(directory)})
        return
    typer.echo(f"wrote {card.ref} as a PEFT adapter: {directory}")


def example_card(
    *,
    name: str = "example",
    version: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    rank: int = 4,
    description: str = "An example adapter made by 'loraflight card example'.",
) -> LoRACard:
    """A small deterministic adapter on q/v projections of a `layers`-layer, `hidden`-wide model."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise CardError(f"dtype {dtype!r} is not one of float32, float16, bfloat16")
    rng = np.random.default_rng(seed)
    mods = []
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            a = (rng.standard_normal((rank, hidden)) / np.sqrt(hidden)).astype(np.float32)
            b = (rng.standard_normal((hidden, rank)) * 0.01).astype(np.float32)
            a, b = from_float(a, dtype), from_float(b, dtype)  # bf16: round to nearest even, as words
            mods.append(ModuleLoRA(f"model.layers.{i}.self_attn.{proj}", rank, float(2 * rank), a, b))
    return LoRACard.build(
        mods,
        name=name,
        version=version,
        dtype=dtype,
        description=description,
        tags=("example",),
        base_fingerprint=base_fingerprint((m.module, hidden, hidden) for m in mods),
        author="loraflight",
        created="2026-01-01T00:00:00Z",
    )


@card_app.command("example")
def example_cmd(
    out: Annotated[Path, typer.Argument(help=f"Output card ({CARD_SUFFIX}).")],
    name: Annotated[str, typer.Option(help="Card name.")] = "example",
    version: Annotated[int, typer.Option(help="Card version.")] = 1,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed (the card is deterministic).")] = 0,
    key: Annotated[Path | None, typer.Option("--key", help="Also sign with this private key.")] = None,
    force: Annotated[bool, Force] = False,
) -> None:
    """Write a small example adapter card (2 layers, q/v projections, hidden 64, rank 4)."""
    check_overwrite(out, force)
    card = example_card(name=name, version=version, dtype=dtype, seed=seed)
    if key is not None:
        card = card.sign(keyfiles.load_private(key))
    card.write(out)
    typer.echo(f"wrote {card.ref} ({len(card)} modules, {card.dtype}) {card.digest}: {out}")


@keys_app.command("new")
def keys_new_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory for loraflight.key and loraflight.pub.")],
) -> None:
    """Create an Ed25519 signing key pair (refuses to overwrite one)."""
    priv, pub = keyfiles.write_keypair(directory)
    b64 = keyfiles.public_b64_from_file(pub)
    typer.echo(f"private key: {priv} (keep it secret; mode 0600)")
    typer.echo(f"public key:  {pub}")
    typer.echo(f"public key (base64): {b64}")
    typer.echo(f"signer id: {keyfiles.signer_id(b64)}")


__all__ = [
    "example_card",
    "example_cmd",
    "from_peft_cmd",
    "inspect_cmd",
    "keys_new_cmd",
    "sign_cmd",
    "to_peft_cmd",
    "upgrade_cmd",
    "verify_cmd",
]

"""`loraflight train | extract | compose | route`: make skills and pick the right one for a query.

torch and transformers load inside the commands, never when the CLI starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraflight.engine.card import CARD_SUFFIX, CardMeta, LoRACard
from loraflight.errors import ConfigError

from ._app import app
from .outputs import Force, card_out_path, plain

_out = Console(highlight=False, soft_wrap=True)

_BUILTIN_PREFIX = "builtin:"


def _key(path: Path | None) -> Any:
    if path is None:
        return None
    from loraflight.engine.keys import load_private

    return load_private(path)


def _out_path(out: Path | None, name: str, version: int, force: bool = False) -> Path:
    """Where the card goes (see outputs.card_out_path); the name is checked first, before any work."""
    from loraflight.engine.card.header import check_name

    try:
        check_name(name)
    except ValueError as e:
        raise ConfigError(f"--name {name!r}: {e}") from None
    return card_out_path(out, name, version, force=force)


def _card_doc(card: LoRACard, path: Path) -> dict[str, Any]:
    h = card.header
    return {"ref": card.ref, "name": h.name, "version": h.version, "digest": card.digest, "path": str(path),
            "base_model": h.base_model, "signer": h.signer, "modules": len(card)}  # fmt: skip


def _fmt(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4f}"


@app.command("train")
def train_cmd(
    data: Annotated[
        str, typer.Argument(help="JSONL dataset, or builtin:ops-runbook for the demo skill's pairs.")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Card name.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Card file, or a folder to write NAME-vVERSION.lora.arrow into."),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="pairs (contrastive, embedding model; default) or completion (causal LM)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="minilm, tiny (pairs), tiny-llama (completion), or a local HF model folder."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file of TrainConfig fields; flags override it.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA input.")] = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Target Linear name/suffix (repeat).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (training is deterministic for a seed).")] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(help="Upper bound on optimiser steps; training also ends after --epochs (say both)."),
    ] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Held-out share for before/after eval.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Max tokens per text.")] = None,
    scaling: Annotated[str | None, typer.Option(help="standard (alpha/r) or rslora (alpha/sqrt r).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Card dtype: float32, float16, bfloat16.")] = None,
    version: Annotated[int, typer.Option(help="Card version.")] = 1,
    description: Annotated[str, typer.Option(help="What the skill does (the router embeds this).")] = "",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeat).")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key file: sign the card.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    created: Annotated[
        str | None,
        typer.Option(
            help="Card creation time, 2026-01-31T12:00:00Z (default: $SOURCE_DATE_EPOCH, else the data file's time)."
        ),
    ] = None,
    force: Annotated[bool, Force] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (no tables).")] = False,
) -> None:
    """Train a LoRA card from examples; print held-out metrics before and after."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loraflight.engine.authoring import data as builtin
    from loraflight.engine.authoring.models import load_causal_model, load_embedding_model
    from loraflight.engine.authoring.records import creation_time
    from loraflight.engine.authoring.train import TrainConfig, load_dataset, train_card

    raw: dict[str, Any] = {}
    if data.startswith(_BUILTIN_PREFIX):
        raw = builtin.demo_config().to_dict()
    if config is not None:
        try:
            loaded = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{config}: cannot read the training config: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config}: the training config must be a JSON object")
        raw.update(loaded)
    flags = {
        "kind": kind,
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": tuple(target) if target else None,
        "learning_rate": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "max_steps": max_steps,
        "eval_fraction": eval_fraction,
        "max_length": max_length,
        "scaling": scaling,
        "dtype": dtype,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    cfg = TrainConfig.from_dict(raw)
    if data.startswith(_BUILTIN_PREFIX):
        records = builtin.builtin_dataset(data[len(_BUILTIN_PREFIX) :])
        if not description:
            description = str(builtin.DEMO_CARD["description"])
    else:
        records = load_dataset(Path(data), cfg.kind)
    meta = CardMeta(name=name, version=version, description=description, tags=tuple(tag or ()))
    signing_key = _key(key)
    path = _out_path(out, name, version, force)
    stamp = creation_time(created, None if data.startswith(_BUILTIN_PREFIX) else Path(data))

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    spec = model or ("minilm" if cfg.kind == "pairs" else "tiny-llama")
    loader = load_embedding_model if cfg.kind == "pairs" else load_causal_model
    net, tok, base_id = loader(spec)
    if not as_json:
        _out.print(f"training {escape(name)} on {len(records)} {cfg.kind} records with {escape(base_id)}")
    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=_out,
        transient=False,
        disable=as_json,
    ) as bar:
        task = bar.add_task("train", total=None, loss="—")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        result = train_card(
            net,
            tok,
            records,
            cfg,
            meta=meta.replace(base_model=base_id),
            key=signing_key,
            progress=progress,
            created=stamp,
        )
    result.card.write(path)
    if as_json:
        doc = _card_doc(result.card, path)
        typer.echo(json.dumps({**doc, "metric": result.metric, "eval_size": result.eval_size,
                               "before": result.before, "after": result.after, "steps": result.steps,
                               "note": result.note, "created": result.card.header.created}))  # fmt: skip
        return
    table = Table(title=f"held-out evaluation ({result.eval_size} records)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for k in result.before:
        table.add_row(
            k + (" *" if k == result.metric else ""), _fmt(result.before[k]), _fmt(result.after.get(k))
        )
    _out.print(table)
    _out.print(result.summary())
    _out.print(f"parameters: {result.report}")
    signed = f", signed by {result.card.header.signer}" if result.card.header.signature else ""
    _out.print(f"wrote {escape(str(path))}: {result.card.ref} digest {result.card.digest}{signed}")


def _load_weights(path: Path) -> dict[str, Any]:
    """A state dict from a .safetensors file or a folder of them (never pickle)."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{path}: no .safetensors files in this folder")
    elif path.suffix == ".safetensors" and path.is_file():
        files = [path]
    else:
        raise ConfigError(
            f"{path}: expected a .safetensors file or a folder holding them (pickled checkpoints are refused)"
        )
    state: dict[str, Any] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{f}: cannot read safetensors: {e}") from None
    return state


@app.command("extract")
def extract_cmd(
    base: Annotated[Path, typer.Argument(help="Base weights: .safetensors file or folder.")],
    tuned: Annotated[Path, typer.Argument(help="Fine-tuned weights: .safetensors file or folder.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Card name.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Card file, or a folder to write NAME-vVERSION.lora.arrow into."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Fixed rank per module.")] = None,
    energy: Annotated[float | None, typer.Option(help="Smallest rank keeping this share of energy.")] = None,
    module: Annotated[
        list[str] | None, typer.Option("--module", help="Module name or glob (repeat).")
    ] = None,
    allow_other_changes: Annotated[bool, typer.Option(help="Leave out changed non-Linear params.")] = False,
    dtype: Annotated[str, typer.Option(help="Card dtype.")] = "float32",
    version: Annotated[int, typer.Option(help="Card version.")] = 1,
    description: Annotated[str, typer.Option(help="What the skill does.")] = "",
    base_model: Annotated[str | None, typer.Option(help="Base model id recorded in the card.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeat).")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key file: sign the card.")] = None,
    force: Annotated[bool, Force] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (no tables).")] = False,
) -> None:
    """Extract a card from a weight delta by truncated SVD; print the kept energy per module."""
    from loraflight.engine.authoring.extract import extract_card

    signing_key = _key(key)
    path = _out_path(out, name, version, force)
    result = extract_card(
        _load_weights(base),
        _load_weights(tuned),
        rank=rank,
        energy=energy,
        modules=module or None,
        meta=CardMeta(
            name=name, version=version, description=description, tags=tuple(tag or ()), base_model=base_model
        ),
        dtype=dtype,
        allow_other_changes=allow_other_changes,
        key=signing_key,
    )
    if as_json:
        result.card.write(path)
        mods = [{"module": m.module, "rank": m.rank, "energy": m.energy} for m in result.modules]
        typer.echo(json.dumps({**_card_doc(result.card, path), "module_ranks": mods,
                               "unchanged": list(result.unchanged)}))  # fmt: skip
        return
    table = Table(title="extracted modules")
    for col in ("module", "rank", "energy kept", "delta rank", "‖ΔW‖"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in result.modules:
        table.add_row(
            escape(m.module), str(m.rank), f"{m.energy:.6f}", str(m.full_rank), f"{m.delta_norm:.4g}"
        )
    _out.print(table)
    if result.unchanged:
        _out.print(f"unchanged (left out): {escape(', '.join(result.unchanged))}")
    result.card.write(path)
    _out.print(f"wrote {escape(str(path))}: {result.card.ref} digest {result.card.digest}")


@app.command("compose")
def compose_cmd(
    cards: Annotated[list[Path], typer.Argument(help="Card files.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the new card.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Card file, or a folder to write NAME-vVERSION.lora.arrow into."),
    ] = None,
    weight: Annotated[
        list[float] | None, typer.Option("--weight", "-w", help="Weight per card (repeat).")
    ] = None,
    interpolate: Annotated[float | None, typer.Option(help="t for (1-t)·A + t·B (two cards).")] = None,
    child_of: Annotated[
        Path | None, typer.Option(help="Stack the one card given on this parent card.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Re-compress to this rank by SVD.")] = None,
    version: Annotated[int, typer.Option(help="Card version.")] = 1,
    description: Annotated[str, typer.Option(help="What the skill does.")] = "",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeat).")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key file: sign the card.")] = None,
    force: Annotated[bool, Force] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Combine cards: weighted sum (default), interpolation, or a child stacked on a parent."""
    from loraflight.engine.authoring.compose import compose_add, compose_interpolate, make_child

    modes = sum(x is not None for x in (weight or None, interpolate, child_of))
    if modes > 1:
        raise ConfigError("use one of --weight, --interpolate, --child-of")
    dest = _out_path(out, name, version, force)
    loaded = [LoRACard.open(p) for p in cards]
    for c in loaded:
        c.verify()
    signing_key = _key(key)
    meta = CardMeta(name=name, version=version, description=description, tags=tuple(tag or ()))
    if child_of is not None:
        if len(loaded) != 1 or rank is not None:
            raise ConfigError("--child-of takes exactly one card (the child's modules) and no --rank")
        parent = LoRACard.open(child_of)
        parent.verify()
        card = make_child(parent, loaded[0], meta=meta, key=signing_key)
    elif interpolate is not None:
        if len(loaded) != 2:
            raise ConfigError(f"--interpolate needs exactly two cards, got {len(loaded)}")
        card = compose_interpolate(loaded[0], loaded[1], interpolate, meta=meta, rank=rank, key=signing_key)
    else:
        card = compose_add(loaded, weight or None, meta=meta, rank=rank, key=signing_key)
    path = card.write(dest)
    if as_json:
        typer.echo(json.dumps({**_card_doc(card, path), "lineage": list(card.header.lineage)}))
        return
    lineage = f", lineage {', '.join(d[:12] for d in card.header.lineage)}" if card.header.lineage else ""
    _out.print(f"wrote {escape(str(path))}: {card.ref}, {len(card)} modules, digest {card.digest}{lineage}")


def _card_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(p.rglob(f"*{CARD_SUFFIX}")))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such card file or directory")
    return files


@app.command("route")
def route_cmd(
    query: Annotated[str, typer.Argument(help="The request to find a skill for.")],
    paths: Annotated[list[Path] | None, typer.Argument(help="Local card files or directories.")] = None,
    catalog: Annotated[
        list[Path] | None, typer.Option(help="JSON list of card headers from a peer's catalog (repeat).")
    ] = None,
    peer: Annotated[str, typer.Option(help="Location recorded for --catalog entries.")] = "peer",
    k: Annotated[int, typer.Option("-k", help="How many cards to return.")] = 3,
    threshold: Annotated[float | None, typer.Option(help="Minimum cosine similarity.")] = None,
    embedder: Annotated[str, typer.Option(help="auto, minilm or hashing.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rank cards (local files and peers' catalog headers) by how well their description fits the query."""
    from loraflight.engine.authoring.router import HashingEmbedder, MiniLMEmbedder, Router

    if embedder not in ("auto", "minilm", "hashing"):
        raise ConfigError(f"--embedder {embedder!r} is not one of auto, minilm, hashing")
    emb = {"auto": None, "minilm": MiniLMEmbedder(), "hashing": HashingEmbedder()}[embedder]
    router = Router(emb)
    for f in _card_files(paths or []):
        router.add(LoRACard.open(f), local=True, location=str(f))
    for c in catalog or []:
        try:
            entries = json.loads(c.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{c}: cannot read the catalog: {e}") from None
        if not isinstance(entries, list):
            raise ConfigError(
                f"{c}: a catalog file is a JSON list of card headers (or 'loraflight ls --json')"
            )
        for item in entries:  # `ls --json` entries carry the header and where the card is
            if isinstance(item, dict) and isinstance(item.get("header"), dict):
                router.add_catalog([item["header"]], peer=(item.get("locations") or [peer])[0])
            else:
                router.add_catalog([item], peer=peer)
    if not len(router):
        raise ConfigError("no cards to route to: give card files/directories or --catalog")
    routes = router.route(query, k=k, threshold=threshold)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in routes], indent=2))
        return
    if not routes:
        _out.print(f"no card above the threshold for this query (embedder {router.embedder.name})")
        return
    table = Table(title=f"routes ({router.embedder.name})")
    for col in ("card", "score", "where", "digest"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for r in routes:
        where = "local" if r.local else f"peer {r.location}"
        table.add_row(plain(f"{r.name}@{r.version}"), f"{r.score:.3f}", plain(where), plain(r.digest[:16]))
    _out.print(table)


__all__ = ["compose_cmd", "extract_cmd", "route_cmd", "train_cmd"]

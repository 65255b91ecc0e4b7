"""Export of stored cards as PEFT folders `<export_dir>/<name>-v<version>` (what vLLM or
LoRAX read), and their removal when the card leaves the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loraflight.engine.card import LoRACard
from loraflight.files import replace

from ..protocol import CatalogEntry


def export_path(export_dir: str | os.PathLike[str], entry: CatalogEntry) -> Path:
    """The folder a card is exported to."""
    return Path(os.path.expanduser(export_dir)) / f"{entry.name}-v{entry.version}"


def export_card(card_path: Path, entry: CatalogEntry, export_dir: str | os.PathLike[str]) -> Path | None:
    """Write the card at `card_path` as a PEFT folder, built beside it and renamed into place.

    Returns the folder, or None when it exists already (cards are immutable). Raises what
    writing failed with (`LoraflightError`, `OSError`, `ImportError` without the engine
    extras); nothing is left half-written.
    """
    final = export_path(export_dir, entry)
    if final.exists():
        return None
    root = final.parent
    tmp = root / f".tmp-{entry.digest[:16]}"
    try:
        from loraflight.engine.peft_io import to_peft

        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        to_peft(LoRACard.open(card_path), tmp)
        replace(tmp, final, durable=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def unexport_card(entry: CatalogEntry, export_dir: str | os.PathLike[str]) -> None:
    """Remove the card's exported folder (if any)."""
    shutil.rmtree(export_path(export_dir, entry), ignore_errors=True)


__all__ = ["export_card", "export_path", "unexport_card"]

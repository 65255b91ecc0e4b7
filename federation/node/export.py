"""Export of stored cards as PEFT folders (what vLLM, SGLang or LoRAX read), and their removal
when the card leaves the store.

Layout of `export_dir`:

* ``<name>-v<version>/``: one folder per exported card (immutable once written: built in a
  temporary folder beside it, then renamed into place);
* ``<name>``: the stable name, a relative symlink to the newest exported version's folder —
  what vLLM's filesystem resolver looks up (``<dir>/<model name>/adapter_config.json``).

Swapping the stable name: Linux cannot rename a directory over a non-empty one (rename(2)
fails with ENOTEMPTY), and swapping two directories in place (renameat2 RENAME_EXCHANGE)
has no portable Python call. A symlink can be replaced atomically: a new link is created
beside it under a temporary name and renamed over the old one (rename(2) of a non-directory
is atomic), so a lookup of ``<name>/`` resolves either to the old version's folder or to the
new one's, each complete. The old folder stays until its own card leaves the store, so a
reader that resolved the old link keeps reading a whole old version.

Exported files are readable by another user (the server often runs as one): files 0644,
folders 0755; with `group` set, files 0640 and folders 0750 owned by that group.
`adapter_config.json` names the served model id as ``base_model_name_or_path``.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from loraflight.engine.card import LoRACard
from loraflight.errors import ConfigError
from loraflight.files import replace

from ..protocol import CatalogEntry

log = logging.getLogger("loraflight.federation.node")

CONFIG_FILE = "adapter_config.json"
REMOVED_GRACE = 10.0  # seconds a removed version's folder stays (renamed aside) for readers


def export_path(export_dir: str | os.PathLike[str], entry: CatalogEntry) -> Path:
    """The folder a card is exported to."""
    return Path(os.path.expanduser(export_dir)) / f"{entry.name}-v{entry.version}"


def stable_path(export_dir: str | os.PathLike[str], name: str) -> Path:
    """The stable name of an adapter: a symlink to its newest exported version's folder."""
    return Path(os.path.expanduser(export_dir)) / name


def export_refusal(entry: CatalogEntry, model_id: str | None) -> str | None:
    """Why this card is not exported for the served model `model_id` (None: it is).

    With no model id known (no engine and no `export.model_id`), every card is exported.
    """
    bm = entry.header.base_model
    if model_id and bm != model_id:
        return f"it is for base model {bm or '(none)'}, the served model is {model_id}"
    return None


def resolve_group(group: str) -> int | None:
    """The gid of `group` (a name or a number); None when empty. ConfigError when unknown."""
    if not group:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"export.group: no group {group!r} on this machine; give an existing group name or gid "
            "(or leave it empty: exported files are then readable by everyone)"
        ) from None


def _modes(gid: int | None) -> tuple[int, int]:
    """(folder mode, file mode)."""
    return (0o755, 0o644) if gid is None else (0o750, 0o640)


def _open_up(folder: Path, gid: int | None) -> None:
    """Give the folder and its files the export modes (and group)."""
    dmode, fmode = _modes(gid)
    for p in [folder, *folder.iterdir()]:
        if gid is not None:
            os.chown(p, -1, gid)
        os.chmod(p, dmode if p.is_dir() else fmode)


def ensure_root(export_dir: str | os.PathLike[str], gid: int | None = None) -> Path:
    """Create `export_dir` if needed; one this node creates gets the export folder mode."""
    root = Path(os.path.expanduser(export_dir))
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        if gid is not None:
            os.chown(root, -1, gid)
        os.chmod(root, _modes(gid)[0])
    return root


def export_card(
    card_path: Path,
    entry: CatalogEntry,
    export_dir: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    gid: int | None = None,
) -> Path | None:
    """Write the card at `card_path` as a PEFT folder, built beside it and renamed into place.

    `model_id` (when given) is written as ``base_model_name_or_path``; `gid`: see the module.
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

        ensure_root(root, gid)
        shutil.rmtree(tmp, ignore_errors=True)
        # Explicit per-module targets, ranks and alphas (peft_io.peft_config_for): no pattern from
        # the card's header reaches the folder a server (PEFT, vLLM) reads.
        to_peft(LoRACard.open(card_path), tmp, base_model=model_id or None)
        _open_up(tmp, gid)
        replace(tmp, final, durable=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def unexport_card(entry: CatalogEntry, export_dir: str | os.PathLike[str]) -> None:
    """Remove the card's exported folder (if any); `refresh_stable` then repoints its name."""
    shutil.rmtree(export_path(export_dir, entry), ignore_errors=True)


def exported_versions(export_dir: str | os.PathLike[str], name: str) -> list[int]:
    """Versions of `name` with an exported folder, ascending."""
    root = Path(os.path.expanduser(export_dir))
    prefix = f"{name}-v"
    out: list[int] = []
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
            if rest.isdigit() and p.is_dir() and not p.is_symlink():
                out.append(int(rest))
    return sorted(out)


def refresh_stable(
    export_dir: str | os.PathLike[str], name: str, *, without: int | None = None
) -> int | None:
    """Point ``<export_dir>/<name>`` at the newest exported version of `name` other than
    `without` (atomic symlink swap, see the module); remove it when none is left. Returns the
    version pointed at.

    Raises `ConfigError` when ``<name>`` is something this node did not make (a real folder).
    """
    link = stable_path(export_dir, name)
    if link.exists() and not link.is_symlink():
        raise ConfigError(
            f"export_dir: {link} is not a symlink this node made; move it away so the stable name "
            f"of {name!r} can point at its newest version"
        )
    versions = [v for v in exported_versions(export_dir, name) if v != without]
    if not versions:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        return None
    target = f"{name}-v{versions[-1]}"  # relative: the link works where the folder is mounted
    if link.is_symlink() and os.readlink(link) == target:
        return versions[-1]
    tmp = link.parent / f".tmp-link-{secrets.token_hex(6)}"
    os.symlink(target, tmp)
    try:
        replace(tmp, link, durable=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return versions[-1]


def stable_adapters(export_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """name -> the versioned folder its stable name points at (what a server should hold)."""
    root = Path(os.path.expanduser(export_dir))
    out: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") or not p.is_symlink():
                continue
            target = os.readlink(p)
            if target == p.name or "/" in target or not target.startswith(p.name + "-v"):
                continue
            folder = root / target
            if (folder / CONFIG_FILE).is_file():
                out[p.name] = folder
    return out


def server_paths(
    adapters: Mapping[str, Path], export_dir: str | os.PathLike[str], path_prefix: str
) -> dict[str, str]:
    """name -> the folder as the server sees it: under `path_prefix` (where the server mounts
    `export_dir`) when that is set, else the local absolute path."""
    root = Path(os.path.expanduser(export_dir)).absolute()
    out: dict[str, str] = {}
    for name, folder in adapters.items():
        local = Path(folder).absolute()
        if path_prefix:
            out[name] = path_prefix.rstrip("/") + "/" + local.relative_to(root).as_posix()
        else:
            out[name] = str(local)
    return out


class Exporter:
    """The export folder of one node: writes and removes versioned folders, keeps each stable
    name on the newest version, and tells `on_change` (the pusher) after every change.

    `model_id`: the served model id (cards for another base model are not exported; the id
    is written as ``base_model_name_or_path``); None exports every card under its own base.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        group: str = "",
        path_prefix: str = "",
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.export_dir = Path(os.path.expanduser(export_dir))
        self.model_id = model_id or None
        self.gid = resolve_group(group)
        self.path_prefix = path_prefix
        self.on_change = on_change
        self._lock = threading.Lock()
        self._removed: list[tuple[float, Path]] = []  # (when, folder renamed aside) to delete later

    def refresh_all(self) -> None:
        """Point every stable name at its newest folder (a starting node; older exports)."""
        names = set()
        with contextlib.suppress(OSError):
            for p in self.export_dir.iterdir():
                if p.name.startswith((".removed-", ".tmp-")):  # left by a node that stopped
                    if p.is_symlink():
                        p.unlink()
                    else:
                        shutil.rmtree(p, ignore_errors=True)
                    continue
                name, sep, v = p.name.rpartition("-v")
                if sep and name and v.isdigit() and not p.name.startswith(".") and not p.is_symlink():
                    names.add(name)
        for name in sorted(names):
            self._refresh(name)
        self._changed()

    def add(self, card_path: Path, entry: CatalogEntry) -> Path | None:
        """Export one card (if it is for the served model); returns the new folder or None."""
        why = export_refusal(entry, self.model_id)
        if why:
            log.info("not exporting %s: %s", entry.ref, why)
            return None
        with self._lock:
            final = export_card(card_path, entry, self.export_dir, model_id=self.model_id, gid=self.gid)
            self._refresh(entry.name)
        self._changed()
        return final

    def remove(self, entry: CatalogEntry) -> None:
        """The card left the store: its stable name falls back to the newest version left (or
        goes), then its folder is renamed aside and deleted `REMOVED_GRACE` seconds later, so
        a reader that opened it just before finishes reading a whole version."""
        with self._lock:
            self._refresh(entry.name, without=entry.version)
            folder = export_path(self.export_dir, entry)
            if folder.is_dir() and not folder.is_symlink():
                aside = self.export_dir / f".removed-{secrets.token_hex(8)}"
                try:
                    replace(folder, aside, durable=False)
                    self._removed.append((time.monotonic(), aside))
                except OSError as e:
                    log.warning("export: removing %s: %s", folder, e)
                    shutil.rmtree(folder, ignore_errors=True)
            self._sweep(REMOVED_GRACE)
        self._changed()

    def close(self) -> None:
        """Delete every folder removed so far (the node stops)."""
        with self._lock:
            self._sweep(0.0)

    def _sweep(self, grace: float) -> None:
        now = time.monotonic()
        keep = []
        for t, p in self._removed:
            if now - t >= grace:
                shutil.rmtree(p, ignore_errors=True)
            else:
                keep.append((t, p))
        self._removed = keep

    def desired(self) -> dict[str, str]:
        """name -> the newest version's folder as the api.push servers see it."""
        with self._lock:
            self._sweep(REMOVED_GRACE)
            return server_paths(stable_adapters(self.export_dir), self.export_dir, self.path_prefix)

    def _refresh(self, name: str, without: int | None = None) -> None:
        try:
            refresh_stable(self.export_dir, name, without=without)
        except (ConfigError, OSError) as e:
            log.warning("export: stable name of %s not updated: %s", name, e)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


__all__ = [
    "CONFIG_FILE",
    "REMOVED_GRACE",
    "Exporter",
    "ensure_root",
    "export_card",
    "export_path",
    "export_refusal",
    "exported_versions",
    "refresh_stable",
    "resolve_group",
    "server_paths",
    "stable_adapters",
    "stable_path",
    "unexport_card",
]

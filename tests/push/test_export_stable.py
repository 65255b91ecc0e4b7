"""The export folder: a stable `<name>` swapped atomically onto the newest version, the
served model id as base, modes another user can read."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from loraflight.errors import ConfigError
from loraflight.federation.node.export import (
    Exporter,
    export_refusal,
    refresh_stable,
    server_paths,
    stable_adapters,
)
from loraflight.federation.store import Store
from loraflight.testing import TINY_BASE, tiny_card


def _store_with(tmp: Path, *cards):
    store = Store(tmp / "store")
    entries = [store.add(c) for c in cards]
    return store, entries


def _read_whole(link: Path) -> tuple[bytes, bytes] | None:
    """Read config and weights of the folder `link` names, as one snapshot (the folder opened
    once, both files read relative to it). None when there is no folder."""
    try:
        fd = os.open(link, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        out = []
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            f = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                out.append(fh.read())
        return out[0], out[1]
    finally:
        os.close(fd)


def test_stable_folder_never_shows_a_half_written_state(tmp_path: Path) -> None:
    """A reader polling `<export>/skill` while v2 swaps in and out sees a complete v1 or v2, always."""
    v1, v2 = tiny_card("skill", 1, seed=1, rank=4), tiny_card("skill", 2, seed=2, rank=2)
    store, (e1, e2) = _store_with(tmp_path, v1, v2)
    ex = Exporter(tmp_path / "export", model_id=TINY_BASE)
    ex.add(store.path_of(e1.digest), e1)
    link = tmp_path / "export" / "skill"
    whole = {}
    for e in (e1, e2):
        folder = tmp_path / f"ref-{e.version}"
        Exporter(folder, model_id=TINY_BASE).add(store.path_of(e.digest), e)
        d = folder / f"skill-v{e.version}"
        whole[e.version] = (
            (d / "adapter_config.json").read_bytes(),
            (d / "adapter_model.safetensors").read_bytes(),
        )
    assert json.loads(whole[1][0])["r"] == 4 and json.loads(whole[2][0])["r"] == 2

    stop = threading.Event()
    seen: dict[int, int] = {1: 0, 2: 0}
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            got = _read_whole(link)
            version = next((v for v, w in whole.items() if w == got), None)
            if version is None:
                bad.append("neither a whole v1 nor a whole v2")
            else:
                seen[version] += 1

    t = threading.Thread(target=reader, name="stable-reader")
    t.start()
    try:
        for _ in range(60):
            ex.add(store.path_of(e2.digest), e2)  # swap in v2
            ex.remove(e2)  # and out again: v1 takes its place
    finally:
        stop.set()
        t.join(30)
    ex.close()
    assert not bad, bad[:3]
    assert seen[1] > 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["skill", "skill-v1"]
    store.close()


def test_export_names_the_served_model_and_opens_the_modes(tmp_path: Path) -> None:
    card = tiny_card("skill", 1, base_model=TINY_BASE)
    store, (e,) = _store_with(tmp_path, card)
    ex = Exporter(tmp_path / "export", model_id=TINY_BASE)
    folder = ex.add(store.path_of(e.digest), e)
    assert folder == tmp_path / "export" / "skill-v1"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_BASE
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "export" / "skill") == "skill-v1"  # relative: works where mounted
    assert stable_adapters(tmp_path / "export") == {"skill": folder}
    assert server_paths({"skill": folder}, tmp_path / "export", "/mnt/lora/") == {
        "skill": "/mnt/lora/skill-v1"
    }
    assert server_paths({"skill": folder}, tmp_path / "export", "") == {"skill": str(folder.absolute())}
    store.close()


def test_refusal_and_a_foreign_folder_under_the_stable_name(tmp_path: Path) -> None:
    store, (e,) = _store_with(tmp_path, tiny_card("x", 1, base_model="someone/else"))
    assert export_refusal(e, TINY_BASE) and "someone/else" in export_refusal(e, TINY_BASE)
    assert export_refusal(e, None) is None  # no served model known: every card exports
    ex = Exporter(tmp_path / "export", model_id=TINY_BASE)
    assert ex.add(store.path_of(e.digest), e) is None
    assert not (tmp_path / "export").exists()
    (tmp_path / "export" / "y").mkdir(parents=True)
    (tmp_path / "export" / "y-v1").mkdir()
    with pytest.raises(ConfigError, match="not a symlink"):
        refresh_stable(tmp_path / "export", "y")
    with pytest.raises(ConfigError, match=r"export\.group"):
        Exporter(tmp_path / "e2", group="no-such-group-here")
    store.close()

"""A full disk (a small tmpfs in a private mount namespace) gives a clear error and an intact store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from loraflight.federation import Store
from loraflight.testing import make_card

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    root, uri = sys.argv[1], sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", root], check=True)
    sys.path.insert(0, sys.argv[3])
    from loraflight.errors import StoreError
    from loraflight.federation import Client, Store
    from loraflight.testing import make_card
    out = {}
    with Store(root) as s:
        small = s.add(make_card("small", 1, nbytes=64 * 1024))
        out["small"] = small.digest
        with Client(uri) as c:
            try:
                c.fetch("big", store=s)
                out["fetched"] = True
            except StoreError as e:
                out["error"] = str(e)
            try:
                s.add(make_card("big-local", 1, nbytes=6 << 20, modules=3))
            except StoreError as e:
                out["add_error"] = str(e)
    with Store(root) as s:
        out["after"] = [e.ref for e in s.list()]
        for e in s.list():
            s.get(e.digest).verify()
        out["tmp"] = [p.name for p in s.tmp_dir.iterdir()]
        out["files"] = sorted(p.name for p in s.cards_dir.iterdir())
        out["epoch"] = s.epoch
        # and after the failure the store still takes cards that fit
        out["later"] = s.add(make_card("later", 1, nbytes=32 * 1024)).ref
    print(json.dumps(out))
    """
)


def test_full_disk_clear_error_store_intact(tmp_path, make_store, make_server):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed; cannot make a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.strip()}")
    src = make_store("src")
    src.add(make_card("big", 1, nbytes=6 << 20, modules=3))
    srv = make_server(src)
    root = tmp_path / "small-disk"
    root.mkdir()
    import loraflight.federation

    repo = str(__import__("pathlib").Path(loraflight.federation.__file__).parent.parent)
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            SCRIPT,
            str(root),
            srv.location,
            repo,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0 and "mount" in r.stderr and "permission" in r.stderr.lower():
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "fetched" not in out
    assert "disk is full" in out["error"] and "big@1" in out["error"]
    assert "disk is full" in out["add_error"]
    assert out["after"] == ["small@1"] and out["tmp"] == [] and len(out["files"]) == 1
    assert out["epoch"] == 1 and out["later"] == "later@1"
    # the tmpfs lived only in the child's namespace: nothing leaked onto the host directory
    assert list(root.iterdir()) == []
    assert isinstance(Store, type)

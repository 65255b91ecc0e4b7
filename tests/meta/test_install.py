"""The distribution installs one namespace, `loraflight`, in wheel and editable form.

Each install goes into a fresh virtual environment whose other packages come from the running
one (a `.pth` path entry, so that environment's own editable hook stays out), and the checks run
from a temporary folder with `python -I`: the repo root on `sys.path` would hide a broken
package-dir mapping.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CHECK = """
import importlib, importlib.metadata as md, importlib.util, json, sys
import loraflight, loraflight.engine, loraflight.federation, loraflight.engine.card
out = {
    "version": loraflight.__version__,
    "dist_version": md.version("loraflight"),
    "engine_file": loraflight.engine.__file__,
    "engine_top": importlib.util.find_spec("engine") is not None,
    "federation_top": importlib.util.find_spec("federation") is not None,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "grpc")),
}
print(json.dumps(out))
"""


def _source_version() -> str:
    text = (REPO / "loraflight" / "_version.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    assert m, "loraflight/_version.py has no __version__"
    return m.group(1)


def _fresh_env(root: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(root)
    py = root / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # every package folder the running interpreter sees (its own site-packages, and those a
    # .pth of it added), minus this repo (its root on sys.path would hide a broken mapping)
    dirs = [p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p]
    dirs = list(dict.fromkeys([sysconfig.get_paths()["purelib"], *dirs]))
    (Path(site) / "_parent_env.pth").write_text("".join(d + "\n" for d in dirs if Path(d).resolve() != REPO))
    return py


def _pip(py: Path, *args: str, cwd: Path) -> None:
    # pip (and setuptools, for the build) of the running environment, installing into `py`'s
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _check(py: Path, cwd: Path) -> dict:
    import json

    r = subprocess.run([str(py), "-I", "-c", CHECK], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_layout(out: dict, where: str) -> None:
    assert out["version"] == _source_version() == out["dist_version"], out
    assert not out["engine_top"], f"{where}: a top-level 'engine' package is importable"
    assert not out["federation_top"], f"{where}: a top-level 'federation' package is importable"
    assert out["modules"] == [], f"{where}: importing loraflight loaded {out['modules']}"


def test_wheel_installs_one_namespace(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("loraflight-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"loraflight"}, tops
    # every package folder of the source tree is in the wheel (a subpackage missing from
    # pyproject's `packages` list would be silently left out)
    for root, mapped in (
        ("engine", "loraflight/engine"),
        ("federation", "loraflight/federation"),
        ("loraflight", "loraflight"),
    ):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.relative_to(REPO / root).as_posix()
            assert f"{mapped}/{rel}" in names, (
                f"{root}/{rel} is not in the wheel: add its package to pyproject.toml"
            )
    py = _fresh_env(tmp_path / "env")
    _pip(py, str(wheel), cwd=tmp_path)
    out = _check(py, tmp_path)
    assert "site-packages" in out["engine_file"], out
    _assert_layout(out, "wheel")


def test_editable_install_maps_the_folders(tmp_path):
    py = _fresh_env(tmp_path / "env")
    _pip(py, "-e", str(REPO), cwd=tmp_path)
    out = _check(py, tmp_path)
    assert Path(out["engine_file"]) == REPO / "engine" / "__init__.py", out
    _assert_layout(out, "editable")

"""The shell and Python blocks of README.md and docs/*.md run as written.

Blocks of one file run in order in one scratch folder (a later block may use what an earlier one
made), bash with `set -euo pipefail`, Python in a fresh interpreter of this environment. A block
that cannot run here (a GPU server, kubectl, systemd, a daemon that never exits) is preceded by
`<!-- no-run: reason -->`; `test_no_run_blocks_say_why` lists them all with their reasons.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_NO_RUN = re.compile(r"^<!--\s*no-run:\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    no_run: str | None  # the reason, when marked


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marked = _NO_RUN.match(prev.strip())
        if lang in LANGS:
            out.append(
                Block(
                    path,
                    start + 1,
                    LANGS[lang],
                    "\n".join(lines[start + 1 : j]) + "\n",
                    marked.group(1) if marked else None,
                )
            )
        i = j + 1
    return out


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HOME=str(scratch / "home"), LORAFLIGHT_DOCS_TEST="1")
    (scratch / "home").mkdir(exist_ok=True)
    return env


def _run(block: Block, scratch: Path) -> subprocess.CompletedProcess:
    if block.lang == "bash":
        argv = ["bash", "-c", "set -euo pipefail\n" + block.code]
    else:
        argv = [sys.executable, "-c", block.code]
    return subprocess.run(
        argv,
        cwd=scratch,
        env=_env(scratch),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_doc_blocks_run(doc, tmp_path):
    ran = 0
    for b in blocks(doc):
        if b.no_run is not None:
            continue
        r = _run(b, tmp_path)
        where = f"{doc.relative_to(REPO)}:{b.line} ({b.lang})"
        assert r.returncode == 0, (
            f"{where} failed with {r.returncode}:\n{b.code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
        )
        ran += 1
    if ran == 0:
        pytest.skip(f"{doc.name}: no runnable block")


def test_no_run_blocks_say_why(capsys):
    skipped = [b for d in DOCS for b in blocks(d) if b.no_run is not None]
    for b in skipped:
        assert b.no_run, f"{b.path.relative_to(REPO)}:{b.line}: a no-run mark must say why"
    with capsys.disabled():
        print(f"\n{len(skipped)} doc blocks marked no-run:")
        for b in skipped:
            print(f"  {b.path.relative_to(REPO)}:{b.line} ({b.lang}): {b.no_run}")

"""Shared pieces of the serving benchmark: texts, adapter names, ports, child processes, versions.

Torch-free on purpose: the load generator's process imports this and never loads a model, so
its CPU goes to sending requests, not to an idle thread pool.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench._machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 256  # MiniLM's sentence_bert_config.json max_seq_length
RANK = 8
# Every nn.Linear of MiniLM's encoder layers (query/key/value, attention.output.dense,
# intermediate.dense, output.dense); the pooler is left out: mean pooling never reads it.
TARGET_MODULES = ["query", "key", "value", "intermediate.dense", "output.dense"]

_WORD_LIST = (
    "the a small large quick slow river mountain city market garden window engine signal "
    "student teacher doctor farmer pilot writer old new bright dark quiet loud cold warm "
    "green blue red silver golden wooden broken hidden distant ancient modern simple strange "
    "walks runs builds finds opens closes carries watches paints reads writes sells buys "
    "answers explains repairs follows leaves visits measures collects protects shares "
    "under over near behind across through beside inside toward after before during "
    "today tonight tomorrow yesterday slowly quickly carefully often rarely always never "
    "bridge harbor forest valley station library kitchen office bakery hospital museum "
    "letter ticket basket lantern compass notebook bicycle camera blanket mirror ladder "
    "storm rain snow wind sunlight shadow morning evening winter summer autumn spring"
)
_WORDS = _WORD_LIST.split()


def adapter_names(n: int = 4) -> list[str]:
    return [f"skill{i}" for i in range(n)]


def make_texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    """`n` distinct sentences of about `words` words, the same for a given seed everywhere."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = words + rng.randint(-2, 2)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(k)) + f" {i}.")
    return out


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for programs that take a port, not a socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(threads: int) -> dict[str, str]:
    """Environment of every child: offline, the same thread count, the repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


class Children:
    """Every subprocess the benchmark starts; `close()` kills them all (also on Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(
        self, argv: Sequence[str], *, env: dict[str, str], log: Path, stdin: bool = False
    ) -> subprocess.Popen:
        f = open(log, "wb")  # noqa: SIM115  (kept open for the child's lifetime)
        p = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE if stdin else f,
            stderr=f,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            bufsize=0,  # unbuffered pipes: select() then sees every line the child wrote
            start_new_session=True,
        )
        f.close()
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        self.procs.clear()


def log_tail(path: Path, lines: int = 3) -> str:
    """The last few non-empty lines of a child's log, on one line (for 'not available: ...')."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def versions() -> str:
    names = (
        "torch",
        "transformers",
        "peft",
        "sentence-transformers",
        "fastapi",
        "uvicorn",
        "httpx",
        "pyarrow",
    )
    parts = []
    for n in names:
        try:
            parts.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{n} -")
    try:
        ours = importlib.metadata.version("loraflight")
    except importlib.metadata.PackageNotFoundError:
        ours = "?"
    return f"python {platform.python_version()}, loraflight {ours}, " + ", ".join(parts)


def machine(when: str = "now") -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"nproc {os.cpu_count()}, CPU {cpu_model()}, load average {when} {load:.1f}, {sys.platform}"


__all__ = [
    "BASE_ID",
    "MAX_LENGTH",
    "RANK",
    "REPO",
    "TARGET_MODULES",
    "Children",
    "adapter_names",
    "child_env",
    "cpu_model",
    "free_port",
    "log_tail",
    "machine",
    "make_texts",
    "versions",
]

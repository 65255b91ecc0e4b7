"""`--log-format json`: every stderr line of a node that loads a Hugging Face model is one JSON object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from .helpers import exe


def test_every_stderr_line_is_json_while_the_model_loads(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY"):
        env.pop(k, None)  # the CLI must switch them off itself
    proc = subprocess.Popen(
        [*exe(), "node", "run", "--store", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--no-discovery",
         "--log-format", "json", "--log-level", "INFO", "--engine-base-model", "minilm", "--trust-engine", "any"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "serving cards on" in line:
                serving.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert serving.wait(180), "".join(lines)[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        t.join(30)
    assert proc.returncode == 0
    assert any("loading the base model" in x for x in lines)
    for line in lines:
        obj = json.loads(line)  # raises on a progress bar, a blank line or an ANSI table
        assert {"ts", "level", "logger", "msg"} <= set(obj)

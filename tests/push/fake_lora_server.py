"""A stand-in for the runtime LoRA API of vLLM and SGLang, for tests.

vLLM and SGLang need a GPU and cannot run on these machines, so the tests run this small HTTP
server instead. It implements exactly the endpoints `api.push` relies on, as those servers
document them, and records every request it receives:

* vLLM: ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` (200 plain text; **400 when
  the name is loaded already**, or when the folder holds no adapter), ``POST
  /v1/unload_lora_adapter {"lora_name"}`` (200; 404 when the name is not loaded);
* SGLang: ``POST /load_lora_adapter`` and ``POST /unload_lora_adapter`` with the same bodies
  (JSON answers ``{"success": ...}``; 400 on a duplicate load or an unknown name);
* both: ``GET /v1/models``: the base model (no ``parent``) and every adapter (``parent`` = the
  base model, ``root`` = its path).

On a load it reads the adapter folder's files at once (what the real server does) and keeps
their bytes, so a test can check exactly what the server would have served. `mounts` maps a
path prefix as the server sees it to the local folder (a container mount).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROUTES = {
    "vllm": {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"},
    "sglang": {"/load_lora_adapter": "load", "/unload_lora_adapter": "unload"},
}


class FakeLoraServer:
    """One fake vLLM or SGLang server on 127.0.0.1; `start()` / `stop()` (restart: a new one)."""

    def __init__(
        self,
        kind: str,
        *,
        base_model: str = "base",
        port: int = 0,
        token: str | None = None,
        mounts: dict[str, Path] | None = None,
        hide_adapters: bool = False,
    ) -> None:
        self.kind = kind
        self.base_model = base_model
        self.port = port
        self.token = token
        self.mounts = mounts or {}
        self.hide_adapters = hide_adapters  # a /v1/models that lags behind (duplicate loads happen)
        self.adapters: dict[str, str] = {}  # name -> path as given
        self.files: dict[str, dict[str, bytes]] = {}  # name -> file name -> bytes read at load
        self.requests: list[tuple[str, str, Any, int]] = []  # (method, path, body, status answered)
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.kind}+http://127.0.0.1:{self.port}"

    def start(self) -> FakeLoraServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _answer(self, status: int, body: Any, method: str, req: Any) -> None:
                with server.lock:
                    server.requests.append((method, self.path, req, status))
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(body, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self, method: str) -> bool:
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._answer(401, {"error": "unauthorized"}, method, None)
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorized("GET"):
                    return
                if self.path != "/v1/models":
                    self._answer(404, {"error": "not found"}, "GET", None)
                    return
                with server.lock:
                    listed = {} if server.hide_adapters else dict(server.adapters)
                data = [
                    {"id": server.base_model, "object": "model", "root": server.base_model, "parent": None}
                ]
                data += [
                    {"id": n, "object": "model", "root": p, "parent": server.base_model}
                    for n, p in sorted(listed.items())
                ]
                self._answer(200, {"object": "list", "data": data}, "GET", None)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    req = json.loads(self.rfile.read(n) or b"null")
                except ValueError:
                    req = None
                if not self._authorized("POST"):
                    return
                op = ROUTES[server.kind].get(self.path)
                if op is None or not isinstance(req, dict) or not isinstance(req.get("lora_name"), str):
                    self._answer(404 if op is None else 400, {"error": "bad request"}, "POST", req)
                    return
                status, body = server._handle(op, req)
                self._answer(status, body, "POST", req)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-lora", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def local(self, path: str) -> Path:
        """Where a path as the server sees it lies on this machine (through `mounts`)."""
        for prefix, folder in self.mounts.items():
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return folder / path[len(prefix) :].lstrip("/")
        return Path(path)

    def _handle(self, op: str, req: dict[str, Any]) -> tuple[int, Any]:
        name = req["lora_name"]
        ok: Any = "Success" if self.kind == "vllm" else {"success": True}
        with self.lock:
            if op == "unload":
                if name not in self.adapters:
                    if self.kind == "vllm":
                        return 404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}}
                    return 400, {"success": False, "error_message": f"LoRA adapter {name} is not loaded"}
                del self.adapters[name]
                self.files.pop(name, None)
                return 200, ok
            if name in self.adapters:
                if self.kind == "vllm":
                    return 400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}}
                return 400, {"success": False, "error_message": f"LoRA adapter {name} is already loaded"}
            path = req.get("lora_path")
            folder = self.local(path) if isinstance(path, str) else None
            if folder is None or not (folder / "adapter_config.json").is_file():
                return 400, {"error": {"message": f"no adapter at {path!r}"}}
            self.files[name] = {p.name: p.read_bytes() for p in folder.iterdir()}
            self.adapters[name] = path
            return 200, ok

    def loads(self) -> list[tuple[str, str]]:
        """(name, path) of every load request answered 200, in order."""
        with self.lock:
            return [
                (b["lora_name"], b["lora_path"])
                for m, p, b, s in self.requests
                if m == "POST" and s == 200 and p.endswith("/load_lora_adapter")
            ]

    def calls(self) -> list[tuple[str, str, int]]:
        """(op, name, status) of every load/unload request, in order."""
        with self.lock:
            return [
                ("load" if p.endswith("/load_lora_adapter") else "unload", b.get("lora_name"), s)
                for m, p, b, s in self.requests
                if m == "POST" and isinstance(b, dict)
            ]

    def held(self) -> dict[str, str]:
        with self.lock:
            return dict(self.adapters)


__all__ = ["ROUTES", "FakeLoraServer"]

"""The API server: uvicorn in a thread of the node process, beside the Flight server.

`start_api` binds the socket itself (so a taken port is a ConfigError at once and port 0
reads back), starts uvicorn on it in a thread and returns once it accepts connections.
`ApiServer.stop()` stops accepting, lets requests in flight finish (bounded), then stops the
batcher and joins every thread it started. TLS uses the node's ``tls.cert``/``tls.key``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError

from .app import create_app
from .checks import parse_listen
from .generation import GenerationService
from .limits import ApiLimits, header_deadline_protocol
from .service import EmbedService

log = logging.getLogger(__name__)

_START_S = 20.0  # bound on waiting for uvicorn to start


class ApiServer:
    """A running HTTP API (see the module doc): `.port`, `.url`, `.service`, `.stop()`."""

    def __init__(
        self,
        service: EmbedService | None,
        listen: str,
        *,
        read_tokens: tuple[str, ...] = (),
        max_body_bytes: int = 8 * 1024 * 1024,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        owns_service: bool = True,
        stop_timeout_s: float = 10.0,
        generation: GenerationService | None = None,
        owns_generation: bool = True,
        limits: ApiLimits | None = None,
        max_connections: int = 256,
        keep_alive_s: float = 5.0,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        import uvicorn

        problems: list[str] = []
        where = parse_listen(listen, "api.listen", problems)
        if where is None:
            raise ConfigError("; ".join(problems))
        self.service = service
        self.generation = generation
        self._owns_generation = owns_generation
        self._owns = owns_service
        self._stop_timeout = stop_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="loraflight-api-admit")
        self.tls = bool(tls_cert)
        self.sock = _bind(where)
        self.uds = where if isinstance(where, str) else None
        self._addr: tuple[Any, ...] = () if self.uds is not None else tuple(self.sock.getsockname())  # kept
        lim = limits or ApiLimits(max_body_bytes=max_body_bytes)
        app = create_app(
            service,
            read_tokens=read_tokens,
            max_body_bytes=max_body_bytes,
            admission=self._pool,
            generation=generation,
            limits=lim,
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            timeout_graceful_shutdown=int(max(1, stop_timeout_s)),
            # connections and requests at once (beyond: 503), idle keep-alive, header size and
            # the request line + headers deadline (serving/limits.py)
            limit_concurrency=max_connections,
            timeout_keep_alive=max(1, round(keep_alive_s)),
            h11_max_incomplete_event_size=max_header_bytes,
            http=header_deadline_protocol(lim.header_timeout_s),
        )
        self._server = uvicorn.Server(config)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loraflight-api", daemon=True)
        self._stopped = False

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self.sock]))
        except BaseException as e:  # reported by start()
            self._failed = e
            log.exception("the API server stopped with an error")

    def start(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + _START_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(
                    f"the API server did not start on {self.url}: {self._failed or 'timed out'}"
                )
            time.sleep(0.01)
        log.info("serving the OpenAI-compatible API on %s", self.url)
        return self

    @property
    def port(self) -> int | None:
        if self.uds is not None:
            return None
        return int(self._addr[1])

    @property
    def host(self) -> str:
        if self.uds is not None:
            return "localhost"
        h = str(self._addr[0])
        if h in ("0.0.0.0", "::"):
            h = "127.0.0.1"
        return f"[{h}]" if ":" in h else h

    @property
    def url(self) -> str:
        """The base URL (``http(s)://host:port``; for a Unix socket ``http+unix://`` and its path)."""
        if self.uds is not None:
            return f"http+unix://{self.uds}"
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop accepting, finish requests in flight (bounded), stop the batcher; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._stop_timeout + 2.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2.0)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.uds is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.uds)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns and self.service is not None:
            self.service.close(self._stop_timeout)
        if self._owns_generation and self.generation is not None:
            self.generation.close(self._stop_timeout)

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(where: tuple[str, int] | str) -> socket.socket:
    if isinstance(where, str):
        p = Path(where)
        if p.is_socket():
            p.unlink()  # a stale socket of an earlier run
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(where)
        except OSError as e:
            s.close()
            raise ConfigError(f"api.listen: cannot bind the Unix socket {where}: {e.strerror or e}") from None
    else:
        host, port = where
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise ConfigError(f"api.listen: cannot listen on {host}:{port}: {e.strerror or e}") from None
    s.listen(1024)
    s.setblocking(False)
    return s


def start_api(
    *,
    model: Any = None,
    config: Any,
    registry: Any = None,
    service: EmbedService | None = None,
    router_embedder: Any = None,
    generation: GenerationService | None = None,
) -> ApiServer:
    """Start the API of `config.api` (a `NodeConfig`) around `model` (a `ServingModel`).

    Give `service` to share one `EmbedService` with the Flight exchange (the caller closes it
    then); else one is made with `config`'s limits and metrics on `registry`, and stopped
    with the server. Give `generation` (a `GenerationService`, for a causal-LM base; the
    caller closes it) to serve completions and chat, with or without embeddings.
    Read tokens and TLS are the node's (``tokens.read``, ``tls.cert``/``key``).
    """
    if not config.api.listen:
        raise ConfigError("api.listen is empty: give HOST:PORT (flag --api-listen) to serve the API")
    if service is None and model is None and generation is None:
        raise ConfigError(
            "api.listen needs an engine to serve: set engine.base_model (or give the node an engine)"
        )
    owns = service is None and model is not None
    svc = service
    if svc is None and model is not None:
        svc = EmbedService.from_config(model, config, registry=registry, router_embedder=router_embedder)
    tls = config.tls
    try:
        server = ApiServer(
            svc,
            config.api.listen,
            read_tokens=tuple(config.tokens.read),
            max_body_bytes=config.api.max_body_bytes,
            limits=ApiLimits(
                max_body_bytes=config.api.max_body_bytes,
                body_timeout_s=config.api.body_timeout,
                header_timeout_s=config.api.header_timeout,
                rate=config.api.rate,
                burst=config.api.burst,
            ),
            max_connections=config.api.max_connections,
            keep_alive_s=config.api.keep_alive,
            max_header_bytes=config.api.max_header_bytes,
            tls_cert=os.path.expanduser(tls.cert) if tls.cert else None,
            tls_key=os.path.expanduser(tls.key) if tls.key else None,
            owns_service=owns,
            generation=generation,
            owns_generation=False,
        )
    except BaseException:
        if owns and svc is not None:
            svc.close()
        raise
    return server.start()


class Serving:
    """What a node runs to serve its model: an `EmbedService` (encoder bases) with its Flight
    ``exchange`` handler, or a `GenerationService` (causal-LM bases), and the HTTP API when
    ``api.listen`` is set (`api` is None otherwise)."""

    def __init__(
        self,
        service: EmbedService | None,
        api: ApiServer | None,
        generation: GenerationService | None = None,
    ) -> None:
        from .exchange import make_exchange_handler

        self.service = service
        self.generation = generation
        self.api = api
        self.exchange = make_exchange_handler(service) if service is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the API (requests in flight finish), then the batcher or the decode loop.
        Call after the Flight server stopped."""
        if self.api is not None:
            self.api.stop()
        if self.service is not None:
            self.service.close(timeout)
        if self.generation is not None:
            self.generation.close(timeout)


def start_serving(
    *,
    model: Any = None,
    config: Any,
    registry: Any = None,
    router_embedder: Any = None,
    generation: GenerationService | None = None,
) -> Serving:
    """The node's one call: an `EmbedService` on `model` (a `ServingModel`) with `config`'s
    limits (metrics on `registry`) and its Flight exchange handler — or `generation` for a
    causal-LM base — and the HTTP API when ``api.listen`` is set.

    ``Serving.exchange`` goes to ``CardServer(exchange=...)`` (None for generation);
    ``Serving.stop()`` after the Flight server stops; it closes `generation` too.
    """
    if model is None and generation is None:
        if config.api.listen:
            raise ConfigError(
                "api.listen needs an engine to serve: set engine.base_model (or give the node an engine)"
            )
        raise ConfigError("serving needs a model: build one with build_serving_model(engine.base_model)")
    service = (
        EmbedService.from_config(model, config, registry=registry, router_embedder=router_embedder)
        if model is not None
        else None
    )
    try:
        api = start_api(config=config, service=service, generation=generation) if config.api.listen else None
    except BaseException:
        if service is not None:
            service.close()
        if generation is not None:
            generation.close()
        raise
    return Serving(service, api, generation)


__all__ = ["ApiServer", "Serving", "start_api", "start_serving"]

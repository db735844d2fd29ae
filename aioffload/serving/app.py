"""OpenAI-compatible HTTP API: routes, auth, body limits, and `run_server`.

Every handler is wrapped so that a refused request is an OpenAI-style error object and an
unexpected exception a logged, generic 500. The generation itself (one engine request per
prompt, SSE or JSON, abort on disconnect) is `handlers` and `stream.Generation`; the small routes
are in `routes`. CORS is off unless `--allowed-origins` names origins.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from aioffload.config import EngineConfig, ServerConfig
from aioffload.serving.dashboard import dashboard_data, static_endpoints
from aioffload.serving.handlers import CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS, chat, completions
from aioffload.serving.metrics import Metrics
from aioffload.serving.protocol import ApiError, error_body, error_response, json_response
from aioffload.serving.routes import detokenize, list_models, openapi_json, retrieve_model, tokenize, version
from aioffload.serving.state import ServerState
from aioffload.serving.stream import internal_error

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

log = logging.getLogger("aioffload.http")

__all__ = ["CHAT_DEFAULT_MAX_TOKENS", "COMPLETION_DEFAULT_MAX_TOKENS", "ServerState", "build_app", "run_server"]


Handler = Callable[[ServerState, Request], Awaitable[Any]]


def _endpoint(state: ServerState, handler: Handler, auth: bool) -> Callable[[Request], Awaitable[Any]]:
    async def endpoint(request: Request) -> Any:
        try:
            if auth and state.config.api_key is not None:
                _check_api_key(request, state.config.api_key)
            return await handler(state, request)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            log.debug("client left during %s %s", request.method, request.url.path)
            return Response(status_code=400)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return internal_error()

    return endpoint


def _check_api_key(request: Request, api_key: str) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None,
                       {"WWW-Authenticate": "Bearer"})


async def _health(state: ServerState, request: Request) -> Response:
    if state.engine is None:
        return json_response({"status": "loading"}, 503)
    if state.draining:
        return json_response({"status": "shutting_down"}, 503)
    if state.engine.is_dead:
        return json_response({"status": "engine_failed"}, 503)
    return json_response({"status": "ok"})


async def _metrics(state: ServerState, request: Request) -> Response:
    if state.engine is not None:
        state.metrics.update_engine_stats(state.engine.stats())
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return json_response(error_body(f"{request.method} {request.url.path}: {exc}", None, status), status)


def build_app(
    engine: Engine | None, server_config: ServerConfig, metrics: Metrics | None = None
) -> Starlette:
    """The ASGI app; with `engine=None` it answers 503 until `app.state.server.engine` is set."""
    state = ServerState(server_config, metrics or Metrics(), engine)
    index, static_file = static_endpoints(server_config.api_key is not None)
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/v1/dashboard", _endpoint(state, dashboard_data, True), methods=["GET"]),
        Route("/v1/completions", _endpoint(state, completions, True), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(state, chat, True), methods=["POST"]),
        Route("/v1/models", _endpoint(state, list_models, True), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _endpoint(state, retrieve_model, True), methods=["GET"]),
        Route("/tokenize", _endpoint(state, tokenize, True), methods=["POST"]),
        Route("/detokenize", _endpoint(state, detokenize, True), methods=["POST"]),
        Route("/version", _endpoint(state, version, False), methods=["GET"]),
        Route("/openapi.json", _endpoint(state, openapi_json, False), methods=["GET"]),
        Route("/health", _endpoint(state, _health, False), methods=["GET"]),
        Route("/metrics", _endpoint(state, _metrics, False), methods=["GET"]),
    ]
    middleware = []
    if server_config.allowed_origins:  # CORS is off unless origins are named
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(server_config.allowed_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_exception})
    app.state.server = state
    return app


class _HealthAtDebug(logging.Filter):
    """uvicorn logs every request at INFO; a load balancer polling /health would fill the log.
    Its access lines become DEBUG records (dropped unless the logger is enabled for DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn: (client, method, path with query, http version, status)
        if isinstance(args, tuple) and len(args) >= 3 and str(args[2]).split("?", 1)[0] == "/health":
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _Server(uvicorn.Server):
    """uvicorn.Server that drains the engine before closing connections; signals exit with status 0.
    A second SIGINT/SIGTERM during the drain aborts the in-flight requests at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._second_signal: asyncio.Event | None = None  # set while draining

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises captured signals after shutdown (status 130/143); we want a clean 0.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self.should_exit:  # the second one: stop draining, skip waiting for connections
            self.force_exit = True
            if self._second_signal is not None:
                self._second_signal.set()
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting before draining
        self.state.draining = True
        engine = self.state.engine
        if engine is not None:
            if self.force_exit:
                await engine.shutdown(0.0)
            else:
                await self._drain(engine, self.state.config.shutdown_timeout_s)
        await super().shutdown(sockets)

    async def _drain(self, engine: Engine, timeout_s: float) -> None:
        """engine.shutdown(timeout_s), cut short by a second signal."""
        log.info("draining: in-flight requests get up to %.1f s (a second Ctrl-C stops them now)", timeout_s)
        self._second_signal = asyncio.Event()
        drain = asyncio.ensure_future(engine.shutdown(timeout_s))
        second = asyncio.ensure_future(self._second_signal.wait())
        try:
            await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            second.cancel()
        if not drain.done():
            log.info("second signal: aborting the in-flight requests now")
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await engine.shutdown(0.0)
        else:
            drain.result()  # re-raise what the drain raised


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking call in a daemon thread (a model load must not keep a stopping process alive)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            result: tuple[bool, Any] = (True, fn())
        except BaseException as e:
            result = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name="aioffload-load", daemon=True).start()
    return await fut


async def _load_engine(engine_config: EngineConfig, state: ServerState, server: _Server) -> bool:
    from aioffload.engine.async_engine import Engine  # lazy: importing torch is slow

    try:
        engine = await _in_daemon_thread(lambda: Engine.from_config(engine_config))
        if server.should_exit:
            return True
        await engine.start()
    except Exception:
        log.exception("failed to load the model")
        server.should_exit = True
        return False
    state.engine = engine
    cfg = state.config
    log.info("model %s loaded; serving on http://%s:%d", engine.model_name, cfg.host, cfg.port)
    return True


async def _serve(engine_config: EngineConfig, server_config: ServerConfig) -> tuple[int, bool]:
    """Returns (exit status, whether the model was still loading when the server stopped)."""
    app = build_app(None, server_config)
    state: ServerState = app.state.server
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, lifespan="off",
                            log_config=None, timeout_graceful_shutdown=5)  # logging is the CLI's
    server = _Server(config, state)
    health_filter = _HealthAtDebug()
    logging.getLogger("uvicorn.access").addFilter(health_filter)
    loader = asyncio.create_task(_load_engine(engine_config, state, server))
    try:
        await server.serve()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        return (e.code if isinstance(e.code, int) else 1), not loader.done()
    finally:
        loading = not loader.done()
        loader.cancel()
        logging.getLogger("uvicorn.access").removeFilter(health_filter)
    if loading or loader.cancelled():
        return 0, loading
    return (0 if loader.result() else 1), False


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM, loading the model meanwhile (/health is 503 until loaded).

    On a signal: stop accepting, let in-flight requests finish for up to
    `server_config.shutdown_timeout_s` (then abort them; a second signal aborts them at once), and
    return 0. Returns 1 when the model fails to load or the address cannot be bound.
    """
    status, loading = asyncio.run(_serve(engine_config, server_config))
    if loading:
        # The loader thread is inside torch; a normal interpreter exit would abort in its
        # C++ destructors (SIGABRT). Nothing else is running: flush and leave now.
        log.info("stopped while the model was still loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status

"""The FastAPI app: create_app(engine or engine factory) with the OpenAI and SGLang-native APIs.

Given a factory, the engine is built in a background thread after the server starts, so /health
answers 503 while the model loads and compiles, then 200.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxradix import __version__
from jaxradix.server.errors import APIError, BodyTooLarge, install_error_handlers
from jaxradix.server.native_api import native_router
from jaxradix.server.openai_api import openai_router
from jaxradix.server.state import ServerState

logger = logging.getLogger("jaxradix.server")

MAX_REQUEST_BYTES = 32 << 20
OPEN_PATHS = frozenset({"/health"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
FAULT_POLICIES = ("recover", "exit")


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:80" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class GuardMiddleware:
    """API key (Authorization: Bearer KEY, all paths but /health) and the request body size limit."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        hosts = self.state.allowed_hosts
        if hosts is not None and host_name(headers.get("host", "")) not in hosts:
            # a page on another site that resolves its name to this address (DNS rebinding) is refused
            await _send_error(scope, send, APIError(f"Host header {headers.get('host', '')!r} is not served here "
                                                    f"(--allowed-hosts)", 400, code="invalid_host"))
            return
        key = self.state.api_key
        if key and scope.get("path") not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode(), key.encode()):
                await _send_error(scope, send, APIError("Invalid or missing API key: send 'Authorization: Bearer KEY'",
                                                 401, code="invalid_api_key"))
                return
        limit = self.state.max_request_bytes
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await _send_error(scope, send, _too_large(limit))
            return

        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:  # the app's own answer to the failed read is replaced by a 413
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if too_large:
            await _send_error(scope, send, _too_large(limit))


def _too_large(limit: int) -> APIError:
    return APIError(f"request body too large: the limit is {limit} bytes", 413, code="request_too_large")


async def _send_error(scope: Scope, send: Send, err: APIError) -> None:
    await err.response()(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def begin_shutdown(state: ServerState, grace_s: float) -> None:
    """The server is stopping (SIGTERM): refuse new requests at once and abort those in flight after
    grace_s seconds (0: now); each client gets a final chunk with finish reason abort."""
    if state.stopping:
        return
    state.stopping = True

    def abort() -> None:
        if state.client is not None:
            logger.info("shutting down: aborting the requests in flight")
            state.client.abort_all()

    if grace_s <= 0:
        abort()
    else:
        timer = threading.Timer(grace_s, abort)
        timer.daemon = True
        timer.start()


def create_app(engine_or_factory: Any, api_key: str | None = None, *, enable_metrics: bool = False,
               served_model_name: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               warmup: bool = False, on_ready: Callable[[ServerState], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None, max_prompt_chars: int | None = None,
               allow_client_chat_template: bool = False, allowed_hosts: frozenset[str] | None = None,
               on_engine_fault: str = "recover") -> FastAPI:
    """engine_or_factory: an Engine (used as is and never shut down here; no warmup) or a zero-argument
    callable that builds one (built in the background at start-up, shut down with the server).
    on_engine_fault: after a failed engine step (its requests fail with 500 and /health answers 503
    for a while), "recover" serves on; "exit" calls on_error so the process can exit."""
    if on_engine_fault not in FAULT_POLICIES:
        raise ValueError(f"on_engine_fault: must be one of {FAULT_POLICIES}, got {on_engine_fault!r}")
    state = ServerState(api_key=api_key, enable_metrics=enable_metrics, served_model_name=served_model_name,
                        max_request_bytes=max_request_bytes, max_prompt_chars=max_prompt_chars,
                        allow_client_chat_template=allow_client_chat_template, allowed_hosts=allowed_hosts)

    def on_fault(why: str) -> None:  # on the engine's loop thread
        broken = getattr(state.engine, "broken", None)
        if (on_engine_fault == "exit" or broken) and on_error is not None:
            logger.error("engine fault (%s): stopping the server", why)
            on_error(RuntimeError(why))

    def attach(engine: Any) -> None:
        if hasattr(engine, "on_fault"):
            engine.on_fault = on_fault
    is_factory = isinstance(engine_or_factory, type) or not hasattr(engine_or_factory, "async_generate")
    stopping = threading.Event()

    def prepare(engine: Any) -> None:
        if warmup:  # one tiny generation before /health says ready, as SGLang's server warmup
            ids = engine.encode("The capital city of France is") if engine.tokenizer is not None else [0]
            engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0})
        attach(engine)
        state.set_engine(engine)
        if on_ready is not None:
            on_ready(state)

    def build() -> None:
        try:
            engine = engine_or_factory()
            if stopping.is_set():
                engine.shutdown()
                return
            prepare(engine)
        except BaseException as e:  # noqa: BLE001 - reported through /health and on_error
            logger.exception("failed to start the engine")
            state.load_error = f"{type(e).__name__}: {e}"
            if on_error is not None:
                on_error(e)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if is_factory:
            threading.Thread(target=build, name="jaxradix-engine-build", daemon=True).start()
        elif on_ready is not None:
            on_ready(state)
        try:
            yield
        finally:
            stopping.set()
            state.stopping = True
            if state.client is not None:
                state.client.abort_all()
            if state.prep is not None:
                state.prep.close()
            if is_factory and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    if not is_factory:
        attach(engine_or_factory)
        state.set_engine(engine_or_factory)
    app = FastAPI(title="jaxradix", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(native_router(state))
    app.include_router(openai_router(state))
    app.add_middleware(GuardMiddleware, state=state)
    return app

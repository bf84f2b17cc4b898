"""What the routes share: the engine once it is ready, the served model names, metrics, token texts."""

from __future__ import annotations

import os
import time
from typing import Any

from jaxradix.server.engine_client import EngineClient
from jaxradix.server.errors import APIError
from jaxradix.server.metrics import Metrics
from jaxradix.server.preprocess import Preprocessor

DEFAULT_MODEL_NAME = "default"
FAULT_HEALTH_WINDOW_S = 10.0  # /health answers 503 this long after a failed engine step (then recovered)


def model_path_of(engine: Any) -> str:
    path = getattr(engine.config, "model_path", None)
    if path is not None:
        return str(path)
    try:
        from jaxradix.models.embedded import embedded_model_path

        return str(embedded_model_path())
    except Exception:  # noqa: BLE001 - only a name for display
        return "SmolLM2-135M-Instruct"


class TokenTexts:
    """Token id -> its text, decoded alone (what logprob entries show); cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        t = self._cache.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            if len(self._cache) < 1 << 18:
                self._cache[token_id] = t
        return t


class _ServerTemplate:
    """The tokenizer as the chat API uses it: rendering with the server's --chat-template."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = template

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


class ServerState:
    def __init__(self, *, api_key: str | None, enable_metrics: bool, served_model_name: str | None,
                 max_request_bytes: int, max_prompt_chars: int | None = None,
                 allow_client_chat_template: bool = False, allowed_hosts: frozenset[str] | None = None) -> None:
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_prompt_chars = max_prompt_chars
        self.allow_client_chat_template = allow_client_chat_template
        self.allowed_hosts = allowed_hosts  # Host header names accepted (None: any)
        self.prep: Preprocessor | None = None
        self._blocks: dict[str, Any] | None = None
        self.stopping = False  # shutting down: new requests get 503
        self.fault_health_window_s = FAULT_HEALTH_WINDOW_S
        self.served_model_name = served_model_name
        self.engine: Any = None
        self.client: EngineClient | None = None
        self.load_error: str | None = None
        self.model_path = ""
        self.served_names: list[str] = [DEFAULT_MODEL_NAME]
        self.token_text: TokenTexts | None = None
        self.metrics: Metrics | None = Metrics(lambda: self.engine) if enable_metrics else None
        self.chat_template: str | None = None  # replaces the tokenizer's template in /v1/chat/completions
        self.tool_call_parser: str | None = None  # None: chosen from the chat template
        self.reasoning_parser: str | None = None

    def configure(self, *, chat_template: str | None = None, tool_call_parser: str | None = None,
                  reasoning_parser: str | None = None) -> None:
        """The chat options of launch_server's flags (--chat-template, --tool-call-parser, --reasoning-parser)."""
        self.chat_template = chat_template
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser

    def set_engine(self, engine: Any) -> None:
        self.model_path = model_path_of(engine)
        base = os.path.basename(self.model_path.rstrip("/")) or self.model_path
        names = [self.served_model_name or base, DEFAULT_MODEL_NAME, base, self.model_path]
        self.served_names = list(dict.fromkeys(names))
        self.token_text = TokenTexts(engine.tokenizer)
        self.prep = Preprocessor(engine, max_prompt_chars=self.max_prompt_chars,
                                 allow_client_chat_template=self.allow_client_chat_template)
        self.client = EngineClient(engine, self.metrics)
        self.engine = engine  # last: routes treat a set engine as ready

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    @property
    def model_basename(self) -> str:
        """What the API shows of the model's location (never the server's absolute path)."""
        return os.path.basename(self.model_path.rstrip("/")) or self.model_path

    def chat_template_blocks(self) -> dict[str, Any] | None:
        """The chat template as per-role text blocks (lang.ChatTemplate's fields), so a frontend-language
        client renders roles like this server without the model's files (the API shows no paths)."""
        if self._blocks is None:
            from dataclasses import asdict

            from jaxradix.lang.chat_template import ChatTemplate

            tokenizer: Any = self.engine.tokenizer
            if self.chat_template is not None and tokenizer is not None:
                tokenizer = _ServerTemplate(tokenizer, self.chat_template)
            try:
                blocks = asdict(ChatTemplate.from_tokenizer(tokenizer, name=self.model_name))
                blocks.pop("name")
            except Exception:  # noqa: BLE001 - no template, or one that cannot be split into roles
                blocks = {}
            self._blocks = blocks
        return self._blocks or None

    def health_problem(self) -> str | None:
        """Why the server cannot serve now (None when it can)."""
        if self.stopping:
            return "the server is shutting down"
        engine = self.engine
        if engine is None:
            return f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
        broken = getattr(engine, "broken", None)
        if broken:
            return f"the engine is out of service: {broken}"
        fault = getattr(engine, "fault", None)
        if fault and time.monotonic() - getattr(engine, "fault_time", 0.0) < self.fault_health_window_s:
            return f"the engine's last step failed: {fault}"
        thread = getattr(engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            return "the engine loop is not running"
        return None

    def require(self) -> EngineClient:
        if self.stopping:
            raise APIError("the server is shutting down", 503)
        if self.client is None or self.engine is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(why, 503)
        return self.client

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name == "":
            return self.model_name
        if name not in self.served_names:
            raise APIError(f"The model `{name}` does not exist. This server serves "
                           f"{self.served_names[:2]}.", 404, param="model", code="model_not_found")
        return name

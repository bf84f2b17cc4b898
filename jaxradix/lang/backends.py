"""Where programs run: an Engine in this process, or a jaxradix (or SGLang) server over HTTP.

Both speak the native /generate contract: text (or a list of texts) plus sampling_params in, the
output dict {"text", "output_ids", "meta_info"} out. Logprob entries are normalized to
(logprob, token_id) tuples whatever the transport.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from jaxradix.lang.chat_template import NAMED_TEMPLATES, ChatTemplate

logger = logging.getLogger("jaxradix.lang")

_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
_TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


class BackendError(RuntimeError):
    """A backend failed: unreachable, refused the request, or the generation failed."""


def normalize_output(out: dict[str, Any]) -> dict[str, Any]:
    meta = dict(out.get("meta_info") or {})
    for k in _LOGPROB_KEYS:
        if k in meta:
            meta[k] = [(e[0], int(e[1])) for e in meta[k]]
    for k in _TOP_KEYS:
        if k in meta:
            meta[k] = [None if row is None else [(e[0], int(e[1])) for e in row] for row in meta[k]]
    return {"text": out.get("text", ""), "output_ids": list(out.get("output_ids") or []), "meta_info": meta}


class Backend:
    """What the interpreter needs from a backend."""

    def generate(self, text: str | list[str], sampling_params: dict[str, Any], *, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0) -> Any:
        """One text -> one output dict; a list of texts -> a list of them."""
        raise NotImplementedError

    def generate_stream(self, text: str, sampling_params: dict[str, Any], *, return_logprob: bool = False,
                        top_logprobs_num: int = 0) -> Iterator[dict[str, Any]]:
        """Cumulative output dicts; the last one has meta_info.finish_reason set."""
        raise NotImplementedError

    def cache_prefix(self, text: str) -> dict[str, Any]:
        """Compute (and cache) the KV of `text` without generating."""
        return self.generate(text, {"max_new_tokens": 0})

    @property
    def chat_template(self) -> ChatTemplate:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _check(out: dict[str, Any]) -> dict[str, Any]:
    err = out.get("meta_info", {}).get("error")
    if err:
        raise BackendError(f"generation failed: {err}")
    return normalize_output(out)


class EngineBackend(Backend):
    """Runs programs on an in-process Engine (built from engine_kwargs when none is given, then owned)."""

    def __init__(self, engine: Any = None, **engine_kwargs: Any) -> None:
        if engine is None:
            from jaxradix.engine.engine import Engine

            engine = Engine(**engine_kwargs)
            self._owned = True
        else:
            if engine_kwargs:
                raise TypeError("pass an engine or engine arguments, not both")
            self._owned = False
        self.engine = engine
        self._template: ChatTemplate | None = None

    def generate(self, text: str | list[str], sampling_params: dict[str, Any], *, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0) -> Any:
        sps = [dict(sampling_params) for _ in text] if isinstance(text, list) else dict(sampling_params)
        out = self.engine.generate(text, sps, return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                                   top_logprobs_num=top_logprobs_num)
        return [_check(o) for o in out] if isinstance(text, list) else _check(out)

    def generate_stream(self, text: str, sampling_params: dict[str, Any], *, return_logprob: bool = False,
                        top_logprobs_num: int = 0) -> Iterator[dict[str, Any]]:
        for out in self.engine.generate(text, dict(sampling_params), return_logprob=return_logprob,
                                        top_logprobs_num=top_logprobs_num, stream=True):
            yield _check(out)

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            if self.engine.tokenizer is None:
                raise ValueError("this engine's model has no tokenizer: role blocks need a chat template")
            self._template = ChatTemplate.from_tokenizer(self.engine.tokenizer)
        return self._template

    def close(self) -> None:
        if self._owned:
            self.engine.shutdown()

    def __repr__(self) -> str:
        return f"EngineBackend({getattr(self.engine, 'loaded', None) and self.engine.loaded.source})"


class RuntimeEndpoint(Backend):
    """A server with the native /generate API at base_url (jaxradix's scripts/serve.py, or SGLang).

    chat_template: a ChatTemplate, a name ("chatml"), or a local tokenizer path (HF dir or .gguf); by
    default the server's tokenizer_path when it exists on this machine, else ChatML.
    """

    def __init__(self, base_url: str, api_key: str | None = None, chat_template: ChatTemplate | str | None = None,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=10.0),
                                    limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128))
        self._template_arg = chat_template
        self._template: ChatTemplate | None = None
        self._lock = threading.Lock()
        self.model_info = self._request("GET", "/get_model_info")

    # -- transport ---------------------------------------------------------------------------------
    def _fail(self, e: Exception) -> BackendError:
        return BackendError(f"cannot reach the server at {self.base_url}: {type(e).__name__}: {e}")

    def _status_error(self, path: str, status: int, body: str) -> BackendError:
        try:
            msg = json.loads(body)
            msg = msg.get("error", {}).get("message", msg) if isinstance(msg, dict) else msg
        except json.JSONDecodeError:
            msg = body
        return BackendError(f"{self.base_url}{path} answered {status}: {msg}")

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            r = self._client.request(method, path, json=payload)
        except httpx.HTTPError as e:
            raise self._fail(e) from e
        if r.status_code != 200:
            raise self._status_error(path, r.status_code, r.text)
        return r.json()

    def _payload(self, text: Any, sampling_params: dict[str, Any], return_logprob: bool, logprob_start_len: int,
                 top_logprobs_num: int, stream: bool = False) -> dict[str, Any]:
        return {"text": text, "sampling_params": sampling_params, "return_logprob": return_logprob,
                "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num, "stream": stream}

    # -- Backend -----------------------------------------------------------------------------------
    def generate(self, text: str | list[str], sampling_params: dict[str, Any], *, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0) -> Any:
        out = self._request("POST", "/generate", self._payload(text, sampling_params, return_logprob,
                                                                logprob_start_len, top_logprobs_num))
        return [_check(o) for o in out] if isinstance(text, list) else _check(out)

    def generate_stream(self, text: str, sampling_params: dict[str, Any], *, return_logprob: bool = False,
                        top_logprobs_num: int = 0) -> Iterator[dict[str, Any]]:
        payload = self._payload(text, sampling_params, return_logprob, -1, top_logprobs_num, stream=True)
        try:
            with self._client.stream("POST", "/generate", json=payload) as r:
                if r.status_code != 200:
                    raise self._status_error("/generate", r.status_code, r.read().decode(errors="replace"))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        raise BackendError(f"{self.base_url}/generate: {obj['error'].get('message', obj['error'])}")
                    yield _check(obj)
        except httpx.HTTPError as e:
            raise self._fail(e) from e

    @property
    def chat_template(self) -> ChatTemplate:
        with self._lock:
            if self._template is None:
                self._template = self._load_template()
            return self._template

    def _load_template(self) -> ChatTemplate:
        arg = self._template_arg
        if isinstance(arg, ChatTemplate):
            return arg
        if isinstance(arg, str) and arg in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[arg]
        blocks = self.model_info.get("chat_template_blocks")
        if not arg and blocks:  # a jaxradix server sends its template's role blocks
            return ChatTemplate(name=str(self.model_info.get("served_model_name", "server")), **blocks)
        path = arg or self.model_info.get("tokenizer_path") or self.model_info.get("model_path")
        if path and os.path.exists(path):
            from jaxradix.tokenizer import load_tokenizer

            return ChatTemplate.from_tokenizer(load_tokenizer(path), name=str(path))
        if arg:
            raise ValueError(f"chat_template: {arg!r} is neither a template name {sorted(NAMED_TEMPLATES)} "
                             f"nor a local tokenizer path")
        logger.warning("the server's tokenizer %r is not on this machine; using the ChatML template "
                       "(pass chat_template= to choose another)", path)
        return NAMED_TEMPLATES["chatml"]

    def flush_cache(self) -> None:
        try:
            r = self._client.post("/flush_cache")
        except httpx.HTTPError as e:
            raise self._fail(e) from e
        if r.status_code != 200:
            raise self._status_error("/flush_cache", r.status_code, r.text)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"


def connect(url: str | None = None, api_key: str | None = None, **engine_kwargs: Any) -> Backend:
    """A RuntimeEndpoint for url, else an EngineBackend on a new in-process Engine(**engine_kwargs)."""
    if url:
        if engine_kwargs:
            raise TypeError(f"engine arguments {sorted(engine_kwargs)} make no sense with a server url")
        return RuntimeEndpoint(url, api_key=api_key)
    return EngineBackend(**engine_kwargs)

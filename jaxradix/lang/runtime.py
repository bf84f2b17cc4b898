"""Runtime: SGLang's `sgl.Runtime(model_path=...)`, here an Engine in this process.

    rt = jr.Runtime(model_path="/path/to/hf_dir")     # or no model_path: the embedded SmolLM2
    jr.set_default_backend(rt)                         # programs now run on rt.engine
    print(rt.generate("Hello", {"max_new_tokens": 8}))  # a JSON string, like SGLang's Runtime
    rt.shutdown()

SGLang's Runtime starts an HTTP server in a child process; jaxradix needs no server for the
frontend, so the engine runs in this process (serve it with scripts/serve.py when HTTP is wanted).
"""

from __future__ import annotations

import json
from typing import Any

from jaxradix.lang.backends import EngineBackend


class Runtime:
    def __init__(self, model_path: str | None = None, *, log_level: str = "error", **engine_kwargs: Any) -> None:
        from jaxradix.engine.engine import Engine

        self.engine = Engine(model_path=model_path, log_level=log_level, **engine_kwargs)
        self.endpoint = EngineBackend(self.engine)

    def generate(self, prompt: str | list[str], sampling_params: dict[str, Any] | None = None,
                 return_logprob: bool = False, logprob_start_len: int = -1, top_logprobs_num: int = 0) -> str:
        sps = [dict(sampling_params or {}) for _ in prompt] if isinstance(prompt, list) else sampling_params
        out = self.engine.generate(prompt, sps, return_logprob=return_logprob,
                                   logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num)
        return json.dumps(out)

    async def async_generate(self, prompt: str, sampling_params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.engine.async_generate(prompt, sampling_params)

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

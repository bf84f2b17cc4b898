"""The user-facing API: @function, gen, select, roles, fork, and the default backend."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from jaxradix.lang.backends import Backend, EngineBackend
from jaxradix.lang.choices import validate_choices
from jaxradix.lang.interpreter import ProgramState, ProgramStateGroup
from jaxradix.lang.ir import Expr, ExprList, Gen, RoleBegin, RoleEnd, SamplingArgs, Select
from jaxradix.lang.run import run_batch, run_program

_default_backend: Backend | None = None
_lock = threading.Lock()


def as_backend(backend: Any) -> Backend:
    """A Backend as is; an Engine wrapped in an EngineBackend; a Runtime's backend."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(getattr(backend, "endpoint", None), Backend):  # jaxradix.lang.Runtime
        return backend.endpoint
    if callable(getattr(backend, "generate", None)) and hasattr(backend, "async_generate") \
            and hasattr(backend, "tokenizer"):  # an Engine (duck-typed: importing it here would pull in JAX)
        return EngineBackend(backend)
    raise TypeError(f"set_default_backend: expected an Engine, Runtime, EngineBackend or RuntimeEndpoint, got "
                    f"{type(backend).__name__}")


def set_default_backend(backend: Any) -> None:
    """backend: an Engine, a Runtime, an EngineBackend or a RuntimeEndpoint (None clears it)."""
    global _default_backend
    if backend is not None:
        backend = as_backend(backend)
    with _lock:
        _default_backend = backend


def get_default_backend() -> Backend | None:
    return _default_backend


def _backend(backend: Any) -> Backend:
    b = as_backend(backend) if backend is not None else _default_backend
    if b is None:
        raise RuntimeError("no backend: call set_default_backend(EngineBackend(engine) or RuntimeEndpoint(url)) "
                           "or pass backend=")
    return b


def _defaults(max_new_tokens: int | None, stop: str | list[str] | None, stop_token_ids: list[int] | None,
              temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
              frequency_penalty: float | None, presence_penalty: float | None, repetition_penalty: float | None,
              ignore_eos: bool | None, seed: int | None) -> dict[str, Any]:
    args = SamplingArgs(max_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
                        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                        ignore_eos=ignore_eos, seed=seed)
    return args.to_engine()


class Function:
    """A program: `def f(s, ...)` decorated with @function."""

    def __init__(self, func: Callable[..., Any], bind: dict[str, Any] | None = None) -> None:
        self.func = func
        self.bound = dict(bind or {})
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> Function:
        return Function(self.func, {**self.bound, **kwargs})

    def run(self, *args: Any, max_new_tokens: int | None = None, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, repetition_penalty: float | None = None,
            ignore_eos: bool | None = None, seed: int | None = None, stream: bool = False,
            backend: Backend | None = None, **kwargs: Any) -> ProgramState:
        """Run the program; the sampling arguments are defaults for its gen calls. stream=True returns
        at once, with the program running in a thread: read it with state.text_iter()."""
        defaults = _defaults(max_new_tokens, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                             frequency_penalty, presence_penalty, repetition_penalty, ignore_eos, seed)
        return run_program(self.func, args, {**self.bound, **kwargs}, _backend(backend), defaults, stream=stream)

    def run_batch(self, batch_kwargs: list[dict[str, Any]], *, max_new_tokens: int | None = None,
                  stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  min_p: float | None = None, frequency_penalty: float | None = None,
                  presence_penalty: float | None = None, repetition_penalty: float | None = None,
                  ignore_eos: bool | None = None, seed: int | None = None, backend: Backend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  warm_prefix: bool = True) -> list[ProgramState]:
        """Run one program per dict of arguments, in parallel; states come back in input order.
        warm_prefix: compute the batch's common prompt prefix once before the programs' first calls."""
        defaults = _defaults(max_new_tokens, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                             frequency_penalty, presence_penalty, repetition_penalty, ignore_eos, seed)
        batch = [{**self.bound, **kw} if isinstance(kw, dict) else kw for kw in batch_kwargs]
        return run_batch(self.func, batch, _backend(backend), defaults, num_threads=num_threads,
                         progress_bar=progress_bar, warm_prefix=warm_prefix)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside another program, `f(s, ...)` runs f's body on s; elsewhere it is f.run(...)."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **{**self.bound, **kwargs})
        return self.run(*args, **kwargs)


def function(func: Callable[..., Any] | None = None) -> Any:
    """Decorator: `@function` or `@function()` on `def f(s, ...)`."""
    if func is None:
        return Function
    return Function(func)


def gen(name: str | None = None, max_tokens: int | None = None, stop: str | list[str] | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        min_p: float | None = None, regex: str | None = None, json_schema: Any = None,
        choices: list[str] | None = None, *, stop_token_ids: list[int] | None = None,
        frequency_penalty: float | None = None, presence_penalty: float | None = None,
        repetition_penalty: float | None = None, ignore_eos: bool | None = None, seed: int | None = None,
        ebnf: str | None = None, return_logprob: bool = False, top_logprobs_num: int = 0) -> Gen:
    """Generate text at the end of the program and store it as s[name]. regex / json_schema (a dict,
    a JSON string or a pydantic model class) / ebnf / choices constrain decoding in the engine; to
    score fixed alternatives by their logprobs use select()."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"gen: name must be a string, got {type(name).__name__}")
    if choices is not None:
        choices = list(validate_choices(choices))
    args = SamplingArgs(max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
                        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                        ignore_eos=ignore_eos, seed=seed, regex=regex, json_schema=json_schema, ebnf=ebnf,
                        choices=choices)
    return Gen(name, args, return_logprob=return_logprob, top_logprobs_num=top_logprobs_num)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0) -> Select:
    """Append the choice with the highest token-length-normalized logprob given the text so far
    (greedy: temperature is accepted for SGLang compatibility and must be 0)."""
    if temperature != 0:
        raise ValueError(f"select: only greedy selection (temperature=0) is supported, got {temperature}")
    return Select(name, validate_choices(choices))


def _role(role: str, expr: str | Expr | None) -> ExprList:
    if expr is None:
        return ExprList((RoleBegin(role), RoleEnd(role)))
    return ExprList.of(RoleBegin(role), expr, RoleEnd(role))


def system(expr: str | Expr | None = None) -> ExprList:
    return _role("system", expr)


def user(expr: str | Expr | None = None) -> ExprList:
    return _role("user", expr)


def assistant(expr: str | Expr | None = None) -> ExprList:
    return _role("assistant", expr)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")


def fork(s: ProgramState, n: int = 1) -> ProgramStateGroup:
    """fork(s, n) == s.fork(n)."""
    return s.fork(n)

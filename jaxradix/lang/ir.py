"""The language's expressions: what `s += ...` accepts.

A program appends strings and expressions to its state; expressions concatenate with `+` (so
`"Q: " + gen("a")` is one expression) and are immutable, so one expression can be appended to many
forks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

ROLES = ("system", "user", "assistant")

# gen() argument -> engine sampling_params key
SAMPLING_KEYS: dict[str, str] = {
    "max_tokens": "max_new_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "seed": "seed",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf",
    "choices": "choices",
}


class Expr:
    """Base of every expression; `+` builds an ExprList."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList.of(self, other)

    def __radd__(self, other: Any) -> ExprList:
        return ExprList.of(other, self)


@dataclass(frozen=True, eq=False)
class ExprList(Expr):
    items: tuple[str | Expr, ...]

    @staticmethod
    def of(*parts: Any) -> ExprList:
        items: list[str | Expr] = []
        for p in parts:
            if isinstance(p, ExprList):
                items.extend(p.items)
            elif isinstance(p, str | Expr):
                items.append(p)
            else:
                raise TypeError(f"cannot append {type(p).__name__} to a program: use a str or an expression")
        return ExprList(tuple(items))


@dataclass(frozen=True)
class SamplingArgs:
    """gen()'s sampling arguments; None means "the program's default" (run(...) arguments, then the engine's)."""

    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: Any = None
    ebnf: str | None = None
    choices: list[str] | None = None

    def to_engine(self) -> dict[str, Any]:
        """The arguments that are set, under the engine's sampling_params names."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[SAMPLING_KEYS[f.name]] = v
        schema = out.get("json_schema")
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
            out["json_schema"] = schema.model_json_schema()
        return out


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    name: str | None
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass(frozen=True, eq=False)
class Select(Expr):
    name: str | None
    choices: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class CachePrefix(Expr):
    """Send the state's text with max_new_tokens=0 so later requests (forks) find it in the radix cache."""

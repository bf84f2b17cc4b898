"""Request, SamplingParams and finish reasons: what a caller asks for and what it gets back."""

from __future__ import annotations

import enum
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_LOGIT_BIAS = 512
MAX_TOP_LOGPROBS = 20


class FinishReason(enum.StrEnum):
    STOP = "stop"  # eos, a stop token or string, or a completed grammar
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"


MAX_REGEX_REPEAT = 10_000  # the largest {n} / {n,m} bound a regex constraint may use
_REPEAT = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_regex_repeats(regex: str) -> None:
    """Refuse a repetition bound the grammar engine cannot build (it gives up mid-generation)."""
    for m in _REPEAT.finditer(regex):
        n = max(int(m.group(1)), int(m.group(2) or 0))
        if n > MAX_REGEX_REPEAT:
            raise ValueError(f"sampling_params.regex: the repetition {m.group(0)} exceeds the limit of "
                             f"{MAX_REGEX_REPEAT}")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    # constrained decoding, at most one of these
    regex: str | None = None
    json_schema: Any = None
    ebnf: str | None = None
    choices: list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"sampling_params.{name}: {why}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            return float(v)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an integer >= 0")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (-1 or 0 disables it)")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not 0 < number("repetition_penalty") <= 2:
            raise bad("repetition_penalty", "must be in (0, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise bad("n", "must be an integer in [1, 128]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, list)
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            raise bad("stop", "must be a non-empty string or a list of them")
        if self.stop_token_ids is not None and (
                not isinstance(self.stop_token_ids, list)
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be a list of token ids")
        if self.stop_token_ids and vocab_size is not None and max(self.stop_token_ids) >= vocab_size:
            raise bad("stop_token_ids", f"token ids must be in [0, {vocab_size})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"must be a dict of at most {MAX_LOGIT_BIAS} token id -> bias")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise bad("logit_bias", "must map integer token ids to numbers") from e
            if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
                raise bad("logit_bias", "biases must be in [-100, 100]")
            if vocab_size is not None and any(not 0 <= k < vocab_size for k in self.logit_bias):
                raise bad("logit_bias", f"token ids must be in [0, {vocab_size})")
        constraints = [n for n in ("regex", "json_schema", "ebnf", "choices") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise ValueError(f"sampling_params: at most one constraint per request, got {constraints}")
        if self.choices is not None and (not isinstance(self.choices, list) or not self.choices
                                         or not all(isinstance(c, str) for c in self.choices)):
            raise bad("choices", "must be a non-empty list of strings")
        if isinstance(self.regex, str):
            check_regex_repeats(self.regex)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_state(self) -> bool:
        """Whether sampling reads the per-slot device state (penalties, logit bias)."""
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0 \
            or self.repetition_penalty != 1

    @property
    def constraint(self) -> tuple[str, Any] | None:
        for name in ("regex", "json_schema", "ebnf", "choices"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None


@dataclass
class LogprobOptions:
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # prompt logprobs from this prompt position; -1 = none

    def validate(self, prompt_len: int) -> None:
        if isinstance(self.top_logprobs_num, bool) or not isinstance(self.top_logprobs_num, int) \
                or not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num: must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.top_logprobs_num!r}")
        if isinstance(self.logprob_start_len, bool) or not isinstance(self.logprob_start_len, int) \
                or not -1 <= self.logprob_start_len < prompt_len:
            raise ValueError(f"logprob_start_len: must be an integer in [-1, {prompt_len}) (the prompt has "
                             f"{prompt_len} tokens), got {self.logprob_start_len!r}")


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: LogprobOptions = field(default_factory=LogprobOptions)
    extra_key: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    seed: int = 0  # resolved seed (a random one when params.seed is None)

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    finish_detail: Any = None  # the matched stop string or token id
    cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    first_token_time: float | None = None
    finish_time: float | None = None
    grammar: Any = None  # constrained.GrammarMatcher when the request has a constraint
    num_retractions: int = 0

    # scheduler state, valid while running
    slot: int = -1  # request slot (row of the sampler's device state)
    pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # pool pages of this request
    kv_len: int = 0  # tokens whose K/V is in the pool (or is being written by a launched step)
    pending: int = 0  # tokens sampled by launched steps that the host has not read yet (overlap)
    prefix_len: int = 0  # leading tokens owned by the radix tree (locked via last_node)
    last_node: Any = None
    admitted_once: bool = False
    admit_seq: int = 0  # admission order, for choosing whom to retract
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def known_len(self) -> int:
        """seq_len plus the sampled tokens still on the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def will_finish(self) -> bool:
        """Its pending tokens reach max_new_tokens: no further step is needed."""
        return self.pending > 0 and len(self.output_ids) + self.pending >= self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""select(): pick the choice whose tokens have the highest mean logprob given the prefix.

Token healing. `prefix + choice` is tokenized jointly (the model never saw the prefix's last
token cut where the program's text happens to end: "...is " + "Paris" is read as "...is" + " Paris").
The boundary is where the joint ids of the choice first differ from the prefix's own ids; all
choices are scored from the earliest boundary among them, so every choice re-scores the same
prefix tail and the scores stay comparable. With no healing the boundary is the prefix length and
each choice is scored on exactly its own tokens.

Requests (any backend, text in, ids read from the logprob entries):
  1. the prefix with max_new_tokens=0: its token count, and its KV cached for step 2;
  2. one batch of [prefix, prefix + c for c in choices] with prompt logprobs from a few tokens before
     the prefix's end, which gives the ids on both sides of the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jaxradix.lang.backends import Backend

HEAL_WINDOW = 3  # prefix tokens before the end whose joint re-tokenization is looked at


@dataclass
class ChoiceDecision:
    choice: str
    index: int
    normalized_logprobs: list[float]  # per choice: mean logprob of its scored tokens
    token_logprobs: list[list[tuple[float, int]]]  # per choice: the scored (logprob, token id)
    boundary: int  # prompt position scoring starts at (< prefix_tokens when token healing moved it)
    prefix_tokens: int
    cached_tokens: list[int] = field(default_factory=list)

    def meta_info(self) -> dict[str, Any]:
        return {"choice": self.choice, "index": self.index,
                "normalized_prompt_logprobs": self.normalized_logprobs,
                "input_token_logprobs": self.token_logprobs, "boundary": self.boundary,
                "prefix_tokens": self.prefix_tokens, "token_healing": self.boundary < self.prefix_tokens,
                "cached_tokens": self.cached_tokens}


def validate_choices(choices: Any) -> tuple[str, ...]:
    if isinstance(choices, str) or not choices:
        raise ValueError("select: choices must be a non-empty list of strings")
    out = tuple(choices)
    if not all(isinstance(c, str) and c for c in out):
        raise ValueError(f"select: every choice must be a non-empty string, got {list(out)!r}")
    return out


def _common_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choose(backend: Backend, prefix: str, choices: tuple[str, ...] | list[str]) -> ChoiceDecision:
    choices = validate_choices(choices)
    if not prefix:
        raise ValueError("select: the program's text is empty; a choice is scored given a prefix")
    head = backend.generate(prefix, {"max_new_tokens": 0})
    p = int(head["meta_info"]["prompt_tokens"])
    start = max(p - HEAL_WINDOW, 0)
    outs = backend.generate([prefix] + [prefix + c for c in choices], {"max_new_tokens": 0},
                            return_logprob=True, logprob_start_len=start)
    prefix_ids = [t for _, t in outs[0]["meta_info"]["input_token_logprobs"]]
    entries = [o["meta_info"]["input_token_logprobs"] for o in outs[1:]]
    boundary = start + min(_common_len(prefix_ids, [t for _, t in e]) for e in entries)
    boundary = max(boundary, 1)  # position 0 has no logprob
    scores, scored = [], []
    for e in entries:
        toks = e[boundary - start:]
        vals = [lp for lp, _ in toks if lp is not None]
        scored.append(toks)
        scores.append(sum(vals) / len(vals) if vals else -math.inf)
    best = max(range(len(choices)), key=lambda i: scores[i])
    return ChoiceDecision(choices[best], best, scores, scored, boundary, p,
                          [int(o["meta_info"].get("cached_tokens", 0)) for o in outs[1:]])

"""SGLang's native sampling_params: every key SGLang's SamplingParams takes, mapped onto the engine's.

The engine's SamplingParams covers the sampling itself; what SGLang adds on top is settled here:
  sampling_seed          -> seed (the engine's per-request seed)
  top_k >= 1 << 30       -> -1 (SGLang's "whole vocabulary")
  None for any key       -> that key's default (SGLang's rule)
  no_stop_trim           -> the matched stop string is kept in the text (server side)
  stop_regex             -> a regex over the output text ends the request (server side)
  min_new_tokens         -> two engine requests: the first ignores eos and stops, the second continues
  stream_interval        -> stream a chunk every k tokens (server side)
  spaces_between_special_tokens, custom_params -> accepted, no effect (documented in docs/features.md:
                            fast tokenizers decode without the former; there are no custom logit processors)
  structural_tag         -> 400: not supported
Any other key is a 400 naming it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from jaxradix.engine.request import SamplingParams
from jaxradix.server.errors import bad_request, from_value_error

TOP_K_ALL = 1 << 30
ENGINE_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
SERVER_KEYS = frozenset({"sampling_seed", "no_stop_trim", "stop_regex", "min_new_tokens", "stream_interval",
                         "spaces_between_special_tokens", "custom_params", "structural_tag"})


@dataclass
class NativeSampling:
    """One prompt's sampling_params, split into what the engine runs and what the server adds."""

    engine: dict[str, Any]  # valid engine SamplingParams kwargs
    no_stop_trim: bool = False
    stop_regex: list[re.Pattern[str]] = field(default_factory=list)
    min_new_tokens: int = 0
    stream_interval: int = 1

    @property
    def n(self) -> int:
        return int(self.engine.get("n", 1))

    @property
    def max_new_tokens(self) -> int:
        return int(self.engine.get("max_new_tokens", 128))

    @property
    def server_side(self) -> bool:
        """Whether the server must watch the request's output (otherwise the engine does it all)."""
        return bool(self.stop_regex) or self.min_new_tokens > 0 or self.no_stop_trim


def _int(sp: dict[str, Any], key: str, minimum: int) -> int:
    v = sp[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise bad_request(f"sampling_params.{key}: must be an integer >= {minimum}, got {v!r}",
                          f"sampling_params.{key}")
    return v


def parse_native(sp: dict[str, Any] | None) -> NativeSampling:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise bad_request("sampling_params: must be an object", "sampling_params")
    sp = {k: v for k, v in sp.items() if v is not None}
    unknown = sorted(set(sp) - ENGINE_KEYS - SERVER_KEYS)
    if unknown:
        raise bad_request(f"sampling_params: unknown key(s) {unknown}", "sampling_params")
    if "structural_tag" in sp:
        raise bad_request("sampling_params.structural_tag: is not supported; use json_schema, regex or ebnf",
                          "sampling_params.structural_tag")
    engine = {k: v for k, v in sp.items() if k in ENGINE_KEYS}
    if "sampling_seed" in sp:
        engine.setdefault("seed", _int(sp, "sampling_seed", 0))
    if isinstance(engine.get("top_k"), int) and engine["top_k"] >= TOP_K_ALL:
        engine["top_k"] = -1
    if isinstance(engine.get("stop_token_ids"), list):
        engine["stop_token_ids"] = sorted({t for t in engine["stop_token_ids"] if t is not None}) or None
        if engine["stop_token_ids"] is None:
            del engine["stop_token_ids"]
    try:
        SamplingParams(**engine)
    except TypeError as e:
        raise bad_request(f"sampling_params: {e}", "sampling_params") from e
    except ValueError as e:
        raise from_value_error(e) from e
    out = NativeSampling(engine)
    if "no_stop_trim" in sp:
        if not isinstance(sp["no_stop_trim"], bool):
            raise bad_request("sampling_params.no_stop_trim: must be a boolean", "sampling_params.no_stop_trim")
        out.no_stop_trim = sp["no_stop_trim"]
    if "spaces_between_special_tokens" in sp and not isinstance(sp["spaces_between_special_tokens"], bool):
        raise bad_request("sampling_params.spaces_between_special_tokens: must be a boolean",
                          "sampling_params.spaces_between_special_tokens")
    if "custom_params" in sp and not isinstance(sp["custom_params"], dict):
        raise bad_request("sampling_params.custom_params: must be an object", "sampling_params.custom_params")
    if "stop_regex" in sp:
        pats = sp["stop_regex"] if isinstance(sp["stop_regex"], list) else [sp["stop_regex"]]
        for p in pats:
            if not isinstance(p, str) or not p:
                raise bad_request("sampling_params.stop_regex: must be a regex or a list of them",
                                  "sampling_params.stop_regex")
            try:
                out.stop_regex.append(re.compile(p))
            except re.error as e:
                raise bad_request(f"sampling_params.stop_regex: {p!r} is not a valid regex: {e}",
                                  "sampling_params.stop_regex") from e
    if "min_new_tokens" in sp:
        out.min_new_tokens = _int(sp, "min_new_tokens", 0)
        if out.min_new_tokens > out.max_new_tokens:
            raise bad_request(f"sampling_params.min_new_tokens: must be <= max_new_tokens ({out.max_new_tokens}), "
                              f"got {out.min_new_tokens}", "sampling_params.min_new_tokens")
        if out.min_new_tokens and SamplingParams(**engine).constraint is not None:
            raise bad_request("sampling_params.min_new_tokens: cannot be combined with a constraint",
                              "sampling_params.min_new_tokens")
    if "stream_interval" in sp:
        out.stream_interval = _int(sp, "stream_interval", 1)
    return out

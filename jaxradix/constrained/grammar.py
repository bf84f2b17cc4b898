"""Grammar-constrained decoding with llguidance: regex, JSON schema, EBNF/Lark and choices.

A GrammarBackend owns the llguidance tokenizer (built once per engine, ~1 s) and a cache of compiled
grammars. `matcher(kind, value)` validates eagerly (a bad grammar raises ValueError on the caller's
thread), then compiles on a small thread pool; the GrammarMatcher it returns waits for that compile
the first time the scheduler asks it for a mask. Each request gets a deep copy of the compiled
grammar's start-state matcher, which shares the compiled lexer and parser tables.

The mask is the device's packed layout: row[w] bit j allows token 32 * w + j, one row of
ceil(vocab_size / 32) uint32 words, where vocab_size is the model's (it may exceed the tokenizer's).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
from llguidance import LLMatcher, LLParserLimits
from llguidance.numpy import fill_next_token_bitmask_par

logger = logging.getLogger("jaxradix")

GRAMMAR_KINDS = ("regex", "json_schema", "ebnf", "choices")


def _words(n: int) -> int:
    return (n + 31) // 32


def canonical_text(kind: str, value: Any) -> str:
    """The cache key text of a constraint: a schema as a dict, its JSON string or a pydantic model
    map to the same text. Key order is kept: it is the order the grammar emits properties in."""
    if kind not in GRAMMAR_KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}; expected one of {GRAMMAR_KINDS}")
    if kind in ("regex", "ebnf"):
        if not isinstance(value, str):
            raise ValueError(f"{kind}: must be a string, got {type(value).__name__}")
        return value
    if kind == "choices":
        if not isinstance(value, list | tuple) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("choices: must be a non-empty list of strings")
        return json.dumps(list(value), ensure_ascii=False)
    # json_schema
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic BaseModel subclass
        value = value.model_json_schema()
    elif isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema: not valid JSON: {e}") from e
    if not isinstance(value, dict | bool):
        raise ValueError(f"json_schema: must be a JSON object, a JSON string or a pydantic model class, "
                         f"got {type(value).__name__}")
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema: not serializable as JSON: {e}") from e


@dataclass
class CompiledGrammar:
    """One compiled constraint, shared by every request that uses it."""

    kind: str
    text: str  # canonical constraint text (the cache key with kind)
    grammar: str  # the llguidance grammar definition
    future: Future  # -> LLMatcher in the start state; only ever deep-copied
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.future.done()

    def new_matcher(self) -> LLMatcher:
        """A fresh matcher in the start state (waits for the compile; re-raises its error)."""
        template = self.future.result()
        with self._lock:
            return template.deep_copy()


class GrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, compile_threads: int = 2, *, cache_size: int = 1024,
                 json_whitespace_flexible: bool = False, mask_threads: int | None = None) -> None:
        """tokenizer: jaxradix.tokenizer.Tokenizer; vocab_size: the model's vocab (the mask width)."""
        hf = tokenizer.hf
        self.vocab_size = vocab_size
        self.tokenizer_vocab = min(tokenizer.vocab_size, vocab_size)  # ids a grammar may ever allow
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        eos += sorted(int(t) for t in tokenizer.stop_token_ids if int(t) not in eos)
        # llguidance allows these at accepting states (and only there), and stops on any of them
        self.eos_token_ids = [t for t in eos if t < self.tokenizer_vocab]
        if not self.eos_token_ids:
            raise ValueError("constrained decoding needs a tokenizer with an EOS or stop token")
        try:
            self.lltok = llguidance.hf.from_tokenizer(hf, n_vocab=max(vocab_size, tokenizer.vocab_size),
                                                      eos_token=self.eos_token_ids)
        except Exception as e:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
            raise ValueError(f"llguidance cannot use this tokenizer: {e}") from e
        self.mask_words = _words(vocab_size)
        self._ll_words = _words(self.lltok.vocab_size)
        self._limits = LLParserLimits(verbose_errors=False)
        self._json_defaults = {"whitespace_flexible": json_whitespace_flexible}
        self._pool = ThreadPoolExecutor(max(1, compile_threads), thread_name_prefix="jaxradix-grammar")
        self._mask_threads = mask_threads  # None: llguidance's default (80% of the cores, at most 32)
        self._executor: llguidance.LLExecutor | None = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.stats = {"compiles": 0, "cache_hits": 0}

    # == compile =====================================================================================
    def matcher(self, kind: str, value: Any) -> GrammarMatcher:
        """A matcher for one request; ValueError (with llguidance's message) for an invalid constraint."""
        return GrammarMatcher(self.compile(kind, value), self)

    def compile(self, kind: str, value: Any) -> CompiledGrammar:
        """The cached compiled grammar of a constraint; a miss validates now and compiles on the pool."""
        key = (kind, canonical_text(kind, value))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return hit
        grammar = self._grammar(kind, key[1])
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, self.lltok, limits=self._limits)
        if is_error:
            raise ValueError(f"invalid {kind}: {msgs[0] if msgs else 'rejected by llguidance'}")
        with self._lock:
            hit = self._cache.get(key)  # another thread may have compiled it meanwhile
            if hit is not None:
                return hit
            compiled = CompiledGrammar(kind, key[1], grammar, self._pool.submit(self._build, grammar))
            self._cache[key] = compiled
            self.stats["compiles"] += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)  # matchers already made keep their grammar alive
        return compiled

    def _grammar(self, kind: str, text: str) -> str:
        try:
            if kind == "regex":
                return LLMatcher.grammar_from_regex(text)
            if kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(text, defaults=self._json_defaults)
            if kind == "ebnf":  # GBNF (root ::= ...) or Lark (start: ...)
                return llguidance.grammar_from("ebnf", text)
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text))
            return LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise ValueError(f"invalid {kind}: {e}") from e

    def _build(self, grammar: str) -> LLMatcher:
        m = LLMatcher(self.lltok, grammar, log_level=0, limits=self._limits)
        if m.is_error():
            raise ValueError(m.get_error())
        # the first mask builds the lexer states of the start; do it here, off the scheduler's path
        m.compute_bitmask()
        return m

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # == masks =======================================================================================
    def fill_masks(self, matchers: Sequence[GrammarMatcher | None], masks: np.ndarray) -> None:
        """The batch form of GrammarMatcher.fill_mask: masks[i] for matchers[i] (None rows are left as
        they are), the live rows computed in parallel on llguidance's own thread pool."""
        assert masks.dtype == np.uint32 and masks.ndim == 2 and masks.shape[1] == self.mask_words
        assert masks.flags.c_contiguous and len(matchers) <= len(masks)
        par: list[tuple[LLMatcher, int]] = []
        for i, gm in enumerate(matchers):
            if gm is None:
                continue
            m = gm._matcher()
            if m is None or gm._terminated or self._ll_words != self.mask_words:
                gm.fill_mask(masks[i])
            else:
                par.append((m, i))
        if par:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(self._mask_threads)
            fill_next_token_bitmask_par(self._executor, par, masks.view(np.int32))
            for _, i in par:
                self._clear_tail(masks[i])

    def fill_eos_only(self, row: np.ndarray) -> None:
        row[:] = 0
        for t in self.eos_token_ids:
            row[t >> 5] |= np.uint32(1 << (t & 31))

    def _clear_tail(self, row: np.ndarray) -> None:
        """Tokens >= the tokenizer's vocab (model padding rows) are never allowed."""
        n = self.tokenizer_vocab
        if n < 32 * len(row):
            w = n >> 5
            if n & 31:
                row[w] &= np.uint32((1 << (n & 31)) - 1)
                w += 1
            row[w:] = 0


class GrammarMatcher:
    """The grammar state of one request. Used from the engine loop thread only."""

    def __init__(self, compiled: CompiledGrammar, backend: GrammarBackend) -> None:
        self.compiled = compiled
        self._backend = backend
        self._m: LLMatcher | None = None
        self._terminated = False
        self.error: str | None = None  # why the matcher gave up (compile failure, rejected token)
        self._scratch: np.ndarray | None = None

    def _matcher(self) -> LLMatcher | None:
        if self._m is None and self.error is None:
            try:
                self._m = self.compiled.new_matcher()
            except Exception as e:  # noqa: BLE001 - validated at submission, so a resource limit
                self._fail(f"grammar compile failed: {e}")
        return self._m

    def _fail(self, why: str) -> None:
        logger.warning("constrained decoding (%s) stopped: %s", self.compiled.kind, why)
        self.error = why
        self._terminated = True

    def fill_mask(self, row: np.ndarray) -> None:
        """row: [ceil(V/32)] uint32, C-contiguous; overwritten with the allowed tokens."""
        b = self._backend
        assert row.dtype == np.uint32 and row.shape == (b.mask_words,) and row.flags.c_contiguous
        m = self._matcher()
        if m is None or self._terminated:
            b.fill_eos_only(row)  # let the model end; the engine stops it right after anyway
            return
        if b._ll_words == b.mask_words:
            m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        else:  # the tokenizer's vocab is larger than the model's: compute the full mask, keep the head
            if self._scratch is None:
                self._scratch = np.zeros(b._ll_words, np.uint32)
            m.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
            row[:] = self._scratch[: b.mask_words]
        b._clear_tail(row)

    def consume(self, token: int) -> None:
        """Advance by a sampled token; a token the grammar rejects terminates the matcher."""
        if self._terminated:
            return
        m = self._matcher()
        if m is None:
            return
        if token in self._backend.eos_token_ids:
            if not m.is_accepting():
                self._fail(f"end of sequence (token {token}) before the grammar completed")
            self._terminated = True
            return
        if not 0 <= token < self._backend.tokenizer_vocab or not m.consume_token(token):
            self._fail(f"token {token} rejected: {m.get_error() or 'out of the tokenizer vocabulary'}")
        elif m.is_stopped():
            self._terminated = True

    def is_terminated(self) -> bool:
        return self._terminated

    def is_accepting(self) -> bool:
        m = self._matcher()
        return m is not None and not self.error and m.is_accepting()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (jump-forward); [] when none or when terminated."""
        if self._terminated:
            return []
        m = self._matcher()
        return [] if m is None else list(m.compute_ff_tokens())

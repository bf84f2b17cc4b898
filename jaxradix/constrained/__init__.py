"""Constrained decoding: regex, JSON schema, EBNF/Lark and choices, compiled by llguidance into
per-step packed token bitmasks (see grammar.py)."""

from jaxradix.constrained.grammar import (
    GRAMMAR_KINDS,
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
    canonical_text,
)

__all__ = ["GRAMMAR_KINDS", "CompiledGrammar", "GrammarBackend", "GrammarMatcher", "canonical_text"]

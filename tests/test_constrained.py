"""Constrained decoding (llguidance): the backend's masks on the embedded tokenizer, then the engine
sampling at temperature 1.0 under JSON schemas, regexes, EBNF/Lark grammars and choices."""

from __future__ import annotations

import datetime
import json
import re
import threading
from typing import Literal

import jsonschema
import numpy as np
import pydantic
import pytest
from conftest import get_engine

from jaxradix import SamplingParams
from jaxradix.constrained import GrammarBackend

V = 49152  # SmolLM2's vocab (model and tokenizer)


@pytest.fixture(scope="module")
def tok():
    from jaxradix.models.embedded import embedded_model_path
    from jaxradix.tokenizer import load_tokenizer

    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def backend(tok):
    return GrammarBackend(tok, V)


@pytest.fixture(scope="module")
def token_texts(tok):
    """Decoded text of every non-special token ('' for special ones)."""
    special = set(tok.hf.all_special_ids)
    return ["" if i in special else tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]


def allowed(m, words: int = V // 32) -> set[int]:
    row = np.full(words, 0xFFFFFFFF, np.uint32)
    m.fill_mask(row)
    return set(np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0].tolist())


def consume_text(tok, m, text: str) -> None:
    for t in tok.encode(text, add_special_tokens=False):
        m.consume(t)


# == the backend ===================================================================================
@pytest.mark.parametrize("regex,words", [("[0-9]{3}", None), ("(yes|no|maybe)", ["yes", "no", "maybe"])])
def test_first_tokens_are_exactly_the_grammar_prefixes(backend, token_texts, regex, words):
    got = allowed(backend.matcher("regex", regex))
    if words is None:
        want = {i for i, s in enumerate(token_texts) if re.fullmatch("[0-9]{1,3}", s)}
    else:
        want = {i for i, s in enumerate(token_texts) if s and any(w.startswith(s) for w in words)}
    assert got == want and len(want) >= 3


def test_eos_only_at_accepting_states_and_termination(backend, tok):
    eos = set(backend.eos_token_ids)
    assert tok.eos_token_id in eos and eos <= tok.stop_token_ids
    m = backend.matcher("choices", ["yes", "yesterday"])
    assert not allowed(m) & eos
    consume_text(tok, m, "yes")
    assert not m.is_terminated() and m.is_accepting()
    mask = allowed(m)
    assert eos <= mask and len(mask) > len(eos)  # may stop or go on to "yesterday"
    m.consume(tok.eos_token_id)
    assert m.is_terminated() and m.error is None

    m = backend.matcher("regex", "[0-9]{3}")
    consume_text(tok, m, "12")
    assert not m.is_terminated() and not allowed(m) & eos
    consume_text(tok, m, "3")
    assert m.is_terminated() and m.error is None  # the grammar cannot continue: no EOS step needed


def test_rejected_token_terminates_without_raising(backend, tok):
    m = backend.matcher("regex", "[0-9]{3}")
    consume_text(tok, m, "x")
    assert m.is_terminated() and "rejected" in m.error
    assert allowed(m) == set(backend.eos_token_ids)
    m.consume(5)  # no-op after termination
    m = backend.matcher("regex", "[0-9]{3}")
    m.consume(tok.eos_token_id)  # EOS before the grammar completed
    assert m.is_terminated() and m.error


def test_tokens_beyond_the_tokenizer_vocab_are_never_allowed(tok):
    b = GrammarBackend(tok, V + 40)  # a model vocab padded past the tokenizer's
    assert b.mask_words == (V + 40 + 31) // 32
    got = allowed(b.matcher("regex", "(.|\n){0,64}"), b.mask_words)
    assert max(got) < V and len(got) > 40000 and set(b.eos_token_ids) <= got
    b.close()


def test_batch_fill_matches_row_fill(backend, tok):
    ms = [backend.matcher("regex", "[0-9]{3}"), None, backend.matcher("choices", ["yes", "no"]),
          backend.matcher("json_schema", {"type": "array", "items": {"type": "integer"}}),
          backend.matcher("regex", "a")]
    consume_text(tok, ms[0], "1")
    consume_text(tok, ms[4], "b")  # terminated: EOS only
    masks = np.full((len(ms) + 1, V // 32), 0xFFFFFFFF, np.uint32)
    backend.fill_masks(ms, masks)
    for i, m in enumerate(ms):
        want = np.full(V // 32, 0xFFFFFFFF, np.uint32)
        if m is not None:
            m.fill_mask(want)
        np.testing.assert_array_equal(masks[i], want)
    assert (masks[-1] == 0xFFFFFFFF).all()


def test_forced_tokens_jump_forward(backend, tok):
    m = backend.matcher("json_schema", {"type": "object", "properties": {"name": {"type": "string"}},
                                        "required": ["name"], "additionalProperties": False})
    forced = m.forced_tokens()
    assert tok.decode(forced).startswith('{"name')
    for t in forced:
        m.consume(t)
    assert not m.is_terminated()
    assert backend.matcher("regex", "[0-9]").forced_tokens() == []


@pytest.mark.parametrize("kind,value,match", [
    ("regex", "(", "unclosed group"),
    ("regex", "[z-a]", "regex"),
    ("json_schema", {"type": "foo"}, "foo"),
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("json_schema", 42, "JSON object"),
    ("ebnf", "start: x", "unknown name"),
    ("ebnf", 'root ::= "a', "GBNF"),
    ("ebnf", "root ::= other", "not found"),
    ("choices", [], "non-empty"),
    ("choices", ["a", 1], "strings"),
    ("xml", "<a/>", "unknown constraint kind"),
])
def test_invalid_constraints_raise_value_error(backend, kind, value, match):
    with pytest.raises(ValueError, match=match):
        backend.matcher(kind, value)


def test_two_constraints_at_once_raise():
    with pytest.raises(ValueError, match="at most one constraint"):
        SamplingParams(regex="a", choices=["a"])


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_compiled_grammars_are_cached(backend):
    schema = Person.model_json_schema()
    before = backend.stats["compiles"]
    a = backend.compile("json_schema", schema)
    assert backend.compile("json_schema", json.dumps(schema, indent=2)) is a
    assert backend.compile("json_schema", Person) is a
    assert backend.matcher("json_schema", schema).compiled is a
    assert backend.compile("regex", "[ab]") is backend.compile("regex", "[ab]")
    assert backend.compile("choices", ["x", "y"]) is not backend.compile("choices", ["y", "x"])
    assert backend.stats["compiles"] == before + 4
    a.future.result(timeout=30)
    assert a.ready


def test_concurrent_matchers_share_one_compile(backend, tok):
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(backend.matcher("json_schema", schema)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m.compiled) for m in out}) == 1
    masks = [allowed(m) for m in out]  # each request has its own state
    consume_text(tok, out[0], '{"k":')
    assert allowed(out[1]) == masks[1] != allowed(out[0])


# == the engine ====================================================================================
@pytest.fixture(scope="module")
def engine():
    return get_engine()


def _s(maxlen: int = 12, **kw) -> dict:
    return {"type": "string", "maxLength": maxlen} | kw


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["cat", "dog", "fish"]
    legs: int = pydantic.Field(ge=0, le=8)
    name: str = pydantic.Field(max_length=10)


POINT = _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
              "y": {"type": "integer", "minimum": -9, "maximum": 9}})
SCHEMAS: dict[str, dict | type] = {
    "person": _obj({"name": _s(16), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "nested_address": _obj({"name": _s(), "address": _obj({"city": _s(), "zip": _s(pattern="^[0-9]{5}$")})}),
    "tags_enum_array": _obj({"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                      "minItems": 1, "maxItems": 3}}),
    "int_array_bounds": _obj({"scores": {"type": "array", "minItems": 2, "maxItems": 4,
                                         "items": {"type": "integer", "minimum": 0, "maximum": 100}}}),
    "enum": _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}),
    "number_bounds": _obj({"price": {"type": "number", "minimum": 0, "maximum": 100},
                           "rating": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    "bool_null": _obj({"active": {"type": "boolean"}, "note": {"type": "null"}}),
    "date": _obj({"event": _s(), "date": {"type": "string", "format": "date"}}),
    "pattern": _obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
                     "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
    "optional_fields": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "nickname": _s(8),
                             "vip": {"type": "boolean"}}, required=["id"]),
    "const": _obj({"version": {"const": 2}, "kind": {"const": "user"}, "name": _s()}),
    "any_of": _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, _s(6)]}}),
    "array_of_objects": _obj({"points": {"type": "array", "items": POINT, "minItems": 1, "maxItems": 3}}),
    "three_levels": _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 9}})})}),
    "string_lengths": _obj({"code": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "formats": _obj({"email": {"type": "string", "format": "email", "maxLength": 30},
                     "ip": {"type": "string", "format": "ipv4"}}),
    "int_exclusive_and_multiple": _obj({
        "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        "m": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50}}),
    "top_level_array": {"type": "array", "items": {"enum": ["apple", "pear", "plum"]}, "minItems": 2,
                        "maxItems": 2},
    "refs": {"$defs": {"point": POINT}, **_obj({"start": {"$ref": "#/$defs/point"},
                                                "end": {"$ref": "#/$defs/point"}})},
    "pydantic_model": Pet,
    "nullable": _obj({"middle_name": {"type": ["string", "null"], "maxLength": 10},
                      "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}}),
    "one_of_objects": _obj({"shape": {"oneOf": [
        _obj({"type": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 9}}),
        _obj({"type": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}})]}}),
}


def _schema_dict(s: dict | type) -> dict:
    return s if isinstance(s, dict) else s.model_json_schema()


def _check_finished_stop(out: dict) -> None:
    fin = out["meta_info"]["finish_reason"]
    assert fin["type"] == "stop", (out["text"], fin)


def test_json_schemas_at_temperature_one(engine):
    assert len(SCHEMAS) >= 20
    seeds = (1, 2)
    names, prompts, params = [], [], []
    for name, schema in SCHEMAS.items():
        for seed in seeds:
            names.append(name)
            prompts.append(f"Return JSON matching this schema: {json.dumps(_schema_dict(schema))}\nJSON:")
            params.append(SamplingParams(temperature=1.0, seed=seed, max_new_tokens=160, json_schema=schema))
    outs = engine.generate(prompts, params)
    checker = jsonschema.FormatChecker()
    for name, out in zip(names, outs, strict=True):
        _check_finished_stop(out)
        value = json.loads(out["text"])
        jsonschema.validate(value, _schema_dict(SCHEMAS[name]), format_checker=checker)
        if name == "date":
            datetime.date.fromisoformat(value["date"])
        if name == "pydantic_model":
            Pet.model_validate(value)


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(cat|dog|bird)s?",
    r"[A-Z][a-z]{2,8}",
    r"(0?[1-9]|1[0-2]):[0-5][0-9] (AM|PM)",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    r"(true|false)",
    r"-?[0-9]{1,4}\.[0-9]{2}",
    r"#[0-9a-f]{6}",
]


def test_regex_outputs_fullmatch(engine):
    prompts, params = [], []
    for rx in REGEXES:
        for seed in (3, 4):
            prompts.append(f"Write a string matching the regular expression {rx}:")
            params.append(SamplingParams(temperature=1.0, seed=seed, max_new_tokens=48, regex=rx))
    outs = engine.generate(prompts, params)
    for p, out in zip(params, outs, strict=True):
        _check_finished_stop(out)
        assert re.fullmatch(p.regex, out["text"]), (p.regex, out["text"])


GBNF = r"""
root ::= "(" item ("," item){0,3} ")"
item ::= [0-9] [0-9]? | "x"
"""
LARK_GREETING = r"""
start: greeting " " NAME "!"
greeting: "Hello" | "Hi" | "Hey"
NAME: /[A-Z][a-z]{1,8}/
"""
LARK_ARITH = r"""
start: expr
expr: term (OP term){0,2}
term: NUMBER | "(" expr ")"
OP: " + " | " * "
NUMBER: /[1-9][0-9]?/
"""


def _parse_arith(s: str) -> int:
    """A recursive-descent parser (and evaluator) of LARK_ARITH; raises on anything else."""
    pos = 0

    def expr() -> int:
        nonlocal pos
        value, ops = term(), 0
        while s.startswith((" + ", " * "), pos) and ops < 2:
            op = s[pos + 1]
            pos += 3
            rhs = term()
            value = value + rhs if op == "+" else value * rhs
            ops += 1
        return value

    def term() -> int:
        nonlocal pos
        if s.startswith("(", pos):
            pos += 1
            value = expr()
            assert s.startswith(")", pos), (s, pos)
            pos += 1
            return value
        m = re.compile(r"[1-9][0-9]?").match(s, pos)
        assert m, (s, pos)
        pos = m.end()
        return int(m.group())

    value = expr()
    assert pos == len(s), (s, pos)
    return value


def test_ebnf_and_lark_outputs_parse(engine):
    cases = [(GBNF, "A list of numbers in parentheses:",
              lambda t: re.fullmatch(r"\((\d\d?|x)(,(\d\d?|x)){0,3}\)", t)),
             (LARK_GREETING, "Greet someone:", lambda t: re.fullmatch(r"(Hello|Hi|Hey) [A-Z][a-z]{1,8}!", t)),
             (LARK_ARITH, "An arithmetic expression:", lambda t: _parse_arith(t) > 0)]
    prompts, params, checks = [], [], []
    for grammar, prompt, check in cases:
        for seed in (5, 6, 7):
            prompts.append(prompt)
            params.append(SamplingParams(temperature=1.0, seed=seed, max_new_tokens=64, ebnf=grammar))
            checks.append(check)
    outs = engine.generate(prompts, params)
    for check, out in zip(checks, outs, strict=True):
        _check_finished_stop(out)
        assert check(out["text"]), out["text"]


def test_choices(engine):
    cases = [(["yes", "no"], "Is the sky blue? Answer:"),
             (["New York", "New Delhi", "Paris", "Tokyo"], "Name a big city:"),
             (["cat", "category", "catalog"], "A word starting with cat:"),
             (['say "hi"', "a\\b", "ünïcödé ✓"], "Pick one:")]
    prompts, params = [], []
    for choices, prompt in cases:
        prompts.append(prompt)
        params.append(SamplingParams(temperature=1.0, seed=8, max_new_tokens=16, choices=choices, n=3))
    outs = engine.generate(prompts, params)
    assert len(outs) == 3 * len(cases)
    for i, out in enumerate(outs):
        _check_finished_stop(out)
        assert out["text"] in cases[i // 3][0], out["text"]


def test_invalid_constraint_is_rejected_at_submission(engine):
    with pytest.raises(ValueError, match="unclosed group"):
        engine.generate("x", SamplingParams(regex="("))
    with pytest.raises(ValueError, match="json_schema"):
        engine.generate("x", {"json_schema": "{oops"})


def test_grammar_and_unconstrained_rows_share_a_batch(engine):
    params = [SamplingParams(temperature=0, max_new_tokens=8),
              SamplingParams(temperature=1.0, seed=9, max_new_tokens=8, regex="[0-9]{4}"),
              SamplingParams(temperature=0, max_new_tokens=8)]
    outs = engine.generate(["The capital of France is", "A year:", "The capital of France is"], params)
    assert outs[0]["output_ids"] == outs[2]["output_ids"]
    assert re.fullmatch("[0-9]{4}", outs[1]["text"])
    alone = engine.generate("The capital of France is", params[0])
    assert alone["output_ids"] == outs[0]["output_ids"]

"""OpenAI tool calling and reasoning output with the official `openai` client.

The small model knows none of these formats, so chat templates written for the tests
(tests/data/chat_templates: Qwen2.5 <tool_call>, Llama 3.1 JSON, Mistral [TOOL_CALLS]) render the tools
and the tool turns, and tool_choice="required" / a named function make the calls by constrained
decoding: every sampled call must parse and validate against its function's schema.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from conftest import get_engine, serving

from jaxradix.server import create_app
from jaxradix.server.reasoning import PARSERS as REASONING
from jaxradix.server.reasoning import ReasoningStream, split
from jaxradix.server.tool_calls import PARSERS, Function, ToolStream, format_for

TEMPLATES = pathlib.Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    app = create_app(get_engine())
    with serving(app) as url:
        yield app.state.server, url


@pytest.fixture
def oai(server):
    state, url = server
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    state.configure()


def use(server, parser: str | None, reasoning: str | None = None) -> None:
    template = (TEMPLATES / f"{parser}.jinja").read_text() if parser else None
    server[0].configure(chat_template=template, tool_call_parser=parser, reasoning_parser=reasoning)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(args, schema)
    return args


# == parsers, no engine ============================================================================
def test_parsers_read_their_formats():
    names = {"get_weather", "get_time"}
    q = PARSERS["qwen25"].parse('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', names)
    assert q.content == "Sure." and [c.name for c in q.calls] == ["get_weather", "get_time"]
    assert json.loads(q.calls[0].arguments) == {"city": "Oslo"}
    ll = PARSERS["llama3"].parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                                 '{"name": "get_time", "parameters": {}}', names)
    assert [c.name for c in ll.calls] == ["get_weather", "get_time"] and ll.content == ""
    m = PARSERS["mistral"].parse('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', names)
    assert [c.name for c in m.calls] == ["get_time"]
    assert PARSERS["qwen25"].parse("no call here", names).calls == []
    assert PARSERS["llama3"].parse('{"name": "unknown_fn", "parameters": {}}', names).calls == []
    assert format_for(None, (TEMPLATES / "mistral.jinja").read_text()).name == "mistral"
    assert format_for(None, (TEMPLATES / "llama3.jinja").read_text()).name == "llama3"
    assert format_for(None, (TEMPLATES / "qwen25.jinja").read_text()).name == "qwen25"


def test_tool_stream_holds_the_call_back():
    text = 'Let me check. <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    ts = ToolStream(PARSERS["qwen25"], {"get_time"})
    sent = "".join(ts.content_delta(text[:i]) for i in range(1, len(text) + 1))
    assert sent == "Let me check. "
    rest, calls = ts.finish(text)
    assert rest == "" and [c.name for c in calls] == ["get_time"]


def test_grammars_compile_for_every_format():
    from llguidance import LLMatcher, grammar_from

    fns = [Function(t["function"]["name"], t["function"]["parameters"]) for t in TOOLS]
    for fmt in {id(p): p for p in PARSERS.values()}.values():
        for parallel in (True, False):
            assert LLMatcher.validate_grammar(grammar_from("ebnf", fmt.grammar(fns, parallel))) == ""


def test_reasoning_split_and_stream():
    text = "<think>\nTwo and two.\n</think>\n\nFour."
    for name in ("qwen3", "deepseek-r1"):
        whole = split(REASONING[name], text)
        assert (whole.reasoning, whole.content) == ("Two and two.\n", "Four.")
        rs = ReasoningStream(REASONING[name])
        parts = [rs.update(text[:i], i == len(text)) for i in range(1, len(text) + 1)]
        assert "".join(p.reasoning for p in parts) == whole.reasoning
        assert "".join(p.content for p in parts) == whole.content
    assert split(REASONING["deepseek-r1"], "Hmm.</think>Four.").reasoning == "Hmm."
    assert split(REASONING["qwen3"], "Just an answer.").content == "Just an answer."
    assert split(REASONING["deepseek-r1"], "still thinking").content == ""
    # qwen3 without an opening tag streams answer text; a late </think> neither repeats it as reasoning
    # nor loses what follows the tag
    late = "Two and two make four</think>Four."
    rs = ReasoningStream(REASONING["qwen3"])
    parts = [rs.update(late[:i], i == len(late)) for i in range(1, len(late) + 1)]
    assert "".join(p.reasoning for p in parts) == ""
    assert "".join(p.content for p in parts) == "Two and two make fourFour."


# == through the server ============================================================================
def _round_trip(url: str, template: str) -> None:
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                    temperature=0, max_tokens=96, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    check_call(call)
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    final = oai.chat.completions.create(model="default", messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=4)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    prompt = get_engine().tokenizer.apply_chat_template(messages, chat_template=template, tools=TOOLS,
                                                        tokenize=False)
    assert "18 degrees and sunny" in prompt and call.function.name in prompt


def test_round_trip_call_result_answer_for_each_parser():
    """One server per parser on the shared engine, run at once so the engine batches them."""
    parsers = ["qwen25", "llama3", "mistral"]
    with contextlib.ExitStack() as stack:
        jobs = []
        for p in parsers:
            app = create_app(get_engine())
            template = (TEMPLATES / f"{p}.jinja").read_text()
            app.state.server.configure(chat_template=template, tool_call_parser=p)
            jobs.append((stack.enter_context(serving(app)), template))
        with ThreadPoolExecutor(len(jobs)) as pool:
            for f in [pool.submit(_round_trip, url, t) for url, t in jobs]:
                f.result()


def test_required_always_yields_a_valid_call_at_temperature_1(server, oai):
    use(server, "qwen25")
    r = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                    temperature=1.0, max_tokens=96, n=8, seed=1, parallel_tool_calls=False)
    assert len(r.choices) == 8
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])


def test_named_tool_choice_and_streaming_deltas(server, oai):
    use(server, "mistral")
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="default", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=96)
    calls: dict[int, dict] = {}
    finish = None

    def streamed() -> None:
        nonlocal finish
        for chunk in oai.chat.completions.create(**kw, stream=True):
            for ch in chunk.choices:
                for d in ch.delta.tool_calls or []:
                    c = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    if d.function.name:
                        c["name"] += d.function.name
                    c["arguments"] += d.function.arguments or ""
                finish = ch.finish_reason or finish

    with ThreadPoolExecutor(1) as pool:  # the stream runs beside the whole response
        done = pool.submit(streamed)
        whole = oai.chat.completions.create(**kw).choices[0].message.tool_calls
        done.result()
    assert [c.function.name for c in whole] == ["get_weather"]
    check_call(whole[0])
    assert finish == "tool_calls"
    assert calls == {0: {"name": "get_weather", "arguments": whole[0].function.arguments}}


def test_reasoning_content_split_in_chat(server, oai):
    use(server, None, reasoning="deepseek-r1")
    kw = dict(model="default", messages=ASK, temperature=0, max_tokens=32,
              extra_body={"regex": r"Let me think\.</think>It is sunny\."})
    msg = oai.chat.completions.create(**kw).choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let me think." and msg.content == "It is sunny."
    reasoning = content = ""
    for chunk in oai.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == ("Let me think.", "It is sunny.")


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]}, "strng"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}}}]}, "required"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]},
     "arguments"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_tools_and_tool_messages_get_a_400(server, extra, needle):
    body = {"model": "default", "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(f"{server[1]}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_auto_parses_calls_and_streams_the_content_before_them(server, oai):
    use(server, "qwen25")
    forced = r'Checking\. <tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>'
    kw = dict(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=48, extra_body={"regex": forced})
    choice = oai.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    content, names, finish = "", [], None
    for chunk in oai.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            assert not (ch.delta.content and names), "content after a tool call began"
            content += ch.delta.content or ""
            names += [d.function.name for d in ch.delta.tool_calls or [] if d.function.name]
            finish = ch.finish_reason or finish
    assert (content, names, finish) == ("Checking. ", ["get_time"], "tool_calls")

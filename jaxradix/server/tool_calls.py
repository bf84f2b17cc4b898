"""OpenAI tool calling: the request's tools, the model's tool-call formats, and their grammars.

Formats (--tool-call-parser, SGLang's names; default: guessed from the chat template):
  llama3   {"name": "f", "parameters": {...}} objects, optionally after <|python_tag|>, joined by ";"
  qwen25   <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call> blocks (Qwen2.5, Qwen3, Hermes)
  mistral  [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]
tool_choice "required" or a named function is enforced by constrained decoding: a Lark grammar (run by
the llguidance backend as an `ebnf` constraint) whose calls are JSON objects validated by each
function's parameters schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jaxradix.server.errors import bad_request

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


@dataclass(frozen=True)
class ToolRequest:
    """The validated tools of a chat request; `forced` is the grammar's functions when a call is required."""

    functions: list[Function]
    choice: str  # "auto" | "required" | "named"
    named: str | None
    parallel: bool

    @property
    def forced(self) -> list[Function] | None:
        if self.choice == "required":
            return self.functions
        if self.choice == "named":
            return [f for f in self.functions if f.name == self.named]
        return None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# == request validation ============================================================================
def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise bad_request(f"{where}: must be a JSON schema object", where)
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    for x in types:
        if x not in JSON_TYPES:
            raise bad_request(f"{where}.type: {x!r} is not a JSON schema type {sorted(JSON_TYPES)}", where)
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise bad_request(f"{where}.properties: must be an object", where)
        for k, v in props.items():
            _check_schema(v, f"{where}.properties.{k}")
    req = schema.get("required")
    if req is not None and (not isinstance(req, list) or not all(isinstance(r, str) for r in req)):
        raise bad_request(f"{where}.required: must be a list of property names", where)
    if isinstance(req, list) and isinstance(props, dict) and (missing := [r for r in req if r not in props]):
        raise bad_request(f"{where}.required: {missing} are not in properties", where)
    if "items" in schema and isinstance(schema["items"], dict):
        _check_schema(schema["items"], f"{where}.items")


def parse_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolRequest | None:
    """None when the model is not to call tools (no tools, or tool_choice "none")."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise bad_request("tool_choice: needs tools", "tool_choice")
    if not tools or tool_choice == "none":
        return None
    functions: list[Function] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(t.get("function"), dict):
            raise bad_request(f"{where}: must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad_request(f"{where}.function.name: must be 1-64 letters, digits, _ . or -, got {name!r}", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        _check_schema(params, f"{where}.function.parameters")
        if params.get("type", "object") != "object":
            raise bad_request(f"{where}.function.parameters.type: must be \"object\"", "tools")
        if any(f.name == name for f in functions):
            raise bad_request(f"{where}.function.name: {name!r} is defined twice", "tools")
        functions.append(Function(name, params))
    named = None
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        named = tool_choice["function"].get("name")
        if named not in {f.name for f in functions}:
            raise bad_request(f"tool_choice.function.name: {named!r} is not one of the tools", "tool_choice")
        choice = "named"
    else:
        raise bad_request("tool_choice: must be \"none\", \"auto\", \"required\" or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    return ToolRequest(functions, choice, named, parallel and choice != "named")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: tool-call arguments as objects; checked."""
    ids: set[str] = set()
    out = []
    for j, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise bad_request(f"messages[{j}].tool_calls: only an assistant message has a list of tool calls",
                                  "messages")
            fixed = []
            for k, c in enumerate(calls):
                where = f"messages[{j}].tool_calls[{k}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"{where}.function.name: is required", "messages")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args or "{}")
                    except json.JSONDecodeError as e:
                        raise bad_request(f"{where}.function.arguments: not valid JSON: {e}", "messages") from e
                if not isinstance(args, dict):
                    raise bad_request(f"{where}.function.arguments: must be a JSON object", "messages")
                if c.get("id"):
                    ids.add(c["id"])
                fixed.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            m["tool_calls"] = fixed
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                raise bad_request(f"messages[{j}].tool_call_id: a tool message must name the call it answers",
                                  "messages")
            if ids and tid not in ids:
                raise bad_request(f"messages[{j}].tool_call_id: {tid!r} answers no earlier tool call", "messages")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


# == formats =======================================================================================
def _call_schema(functions: list[Function], args_key: str) -> dict[str, Any]:
    alts = [{"type": "object", "properties": {"name": {"const": f.name}, args_key: f.parameters},
             "required": ["name", args_key], "additionalProperties": False} for f in functions]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def _json_objects(text: str) -> list[tuple[Any, int, int]]:
    """Every top-level JSON value in text: (value, start, end)."""
    dec = json.JSONDecoder()
    found, i = [], 0
    while i < len(text):
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            break
        try:
            value, end = dec.raw_decode(text, j)
        except json.JSONDecodeError:
            i = j + 1
            continue
        found.append((value, j, end))
        i = end
    return found


def _call(obj: Any, args_key: str, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


@dataclass
class Parsed:
    content: str
    calls: list[ToolCall]


class ToolFormat:
    name = ""
    start = ""  # where a tool call begins in the output (content before it streams as text)
    args_key = "arguments"

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        raise NotImplementedError

    def parse(self, text: str, names: set[str]) -> Parsed:
        raise NotImplementedError

    def definite(self, rest: str) -> bool:
        """Whether text from may_start's index is certainly a tool call (then the rest is held)."""
        return rest.startswith(self.start)

    def may_start(self, text: str) -> int:
        """Index in text where a tool call may begin (content before it is safe to stream); -1: none yet."""
        i = text.find(self.start)
        if i >= 0:
            return i
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return len(text) - k
        return -1


class Qwen25Format(ToolFormat):
    name, start = "qwen25", "<tool_call>"

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        schema = json.dumps(_call_schema(functions, self.args_key))
        rep = ' ("\\n" call)*' if parallel else ""
        return f'start: call{rep}\ncall: "<tool_call>\\n" args "\\n</tool_call>"\nargs: %json {schema}\n'

    def parse(self, text: str, names: set[str]) -> Parsed:
        calls, spans = [], []
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
            try:
                c = _call(json.loads(m.group(1)), self.args_key, names)
            except json.JSONDecodeError:
                c = None
            if c is not None:
                calls.append(c)
                spans.append(m.span())
        if not calls:
            return Parsed(text, [])
        return Parsed(text[:spans[0][0]].strip(), calls)


class Llama3Format(ToolFormat):
    name, start, args_key = "llama3", "{", "parameters"

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        schema = json.dumps(_call_schema(functions, self.args_key))
        rep = ' (";" call)*' if parallel else ""
        return f"start: call{rep}\ncall: %json {schema}\n"

    def may_start(self, text: str) -> int:
        body = text.lstrip()
        if body.startswith("<|python_tag|>") or body.startswith("{") or "<|python_tag|>".startswith(body):
            return len(text) - len(body)
        return -1

    def definite(self, rest: str) -> bool:
        return rest.startswith("{") or rest.startswith("<|python_tag|>")

    def parse(self, text: str, names: set[str]) -> Parsed:
        body = text.replace("<|python_tag|>", "")
        found = [(c, s) for v, s, _ in _json_objects(body) if (c := _call(v, self.args_key, names)) is not None]
        if not found:
            return Parsed(text, [])
        return Parsed(body[:found[0][1]].strip(), [c for c, _ in found])


class MistralFormat(ToolFormat):
    name, start = "mistral", "[TOOL_CALLS]"

    def may_start(self, text: str) -> int:
        body = text.lstrip()
        if body.startswith("[") or body.startswith("[{"[:len(body)]):  # the bare array (marker skipped)
            return len(text) - len(body)
        return super().may_start(text)

    def definite(self, rest: str) -> bool:
        return rest.startswith(self.start) or rest.startswith("[{")

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        schema = {"type": "array", "items": _call_schema(functions, self.args_key), "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        return f'start: "[TOOL_CALLS]" " "? calls\ncalls: %json {json.dumps(schema)}\n'

    def parse(self, text: str, names: set[str]) -> Parsed:
        i = text.find(self.start)
        if i < 0:
            if not text.lstrip().startswith("[{"):  # [TOOL_CALLS] is a special token: skipped when decoding
                return Parsed(text, [])
            i = len(text) - len(text.lstrip()) - len(self.start)
        calls = []
        for v, _, _ in _json_objects(text[i + len(self.start):]):
            for obj in v if isinstance(v, list) else [v]:
                if (c := _call(obj, self.args_key, names)) is not None:
                    calls.append(c)
        return Parsed(text[:max(i, 0)].strip(), calls) if calls else Parsed(text, [])


PARSERS: dict[str, ToolFormat] = {"qwen25": Qwen25Format(), "qwen": Qwen25Format(), "llama3": Llama3Format(),
                                  "mistral": MistralFormat()}


def format_for(parser: str | None, chat_template: str | None) -> ToolFormat:
    """The --tool-call-parser's format, else the one the chat template writes."""
    if parser is not None:
        return PARSERS[parser]
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return PARSERS["mistral"]
    if "<|python_tag|>" in t or "ipython" in t:
        return PARSERS["llama3"]
    return PARSERS["qwen25"]


class ToolStream:
    """Streams a choice's text until a tool call may begin, then holds the rest for the parser."""

    def __init__(self, fmt: ToolFormat, names: set[str]) -> None:
        self.fmt = fmt
        self.names = names
        self.sent = 0  # characters of text sent as content
        self.held = False

    def content_delta(self, text: str) -> str:
        if self.held:
            return ""
        i = self.fmt.may_start(text)
        end = len(text) if i < 0 else i
        if i >= 0 and self.fmt.definite(text[i:]):
            self.held = True
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content not yet sent and the calls, once the choice has ended."""
        parsed = self.fmt.parse(text, self.names)
        if not parsed.calls:
            return text[self.sent:], []
        return parsed.content[self.sent:] if len(parsed.content) > self.sent else "", parsed.calls

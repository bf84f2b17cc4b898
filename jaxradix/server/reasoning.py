"""Reasoning models: `<think>...</think>` split off the answer into `reasoning_content` (--reasoning-parser).

qwen3: the output may open with <think>; text before </think> is reasoning even when the opening tag
was part of the prompt (Qwen3 templates that force thinking). deepseek-r1: the template ends the
prompt inside <think>, so the output starts in reasoning. With no </think> yet, a qwen3 output that
did not open with <think> is answer text; a deepseek-r1 output is all reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    starts_in_reasoning: bool  # the prompt opened the reasoning block


PARSERS = {"qwen3": ReasoningFormat(starts_in_reasoning=False),
           "deepseek-r1": ReasoningFormat(starts_in_reasoning=True)}


@dataclass
class Split:
    reasoning: str
    content: str


def _held(text: str, tag: str) -> int:
    """How many trailing characters of text could be the start of tag (held back while streaming)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def split(fmt: ReasoningFormat, text: str, final: bool = True) -> Split:
    """The reasoning and the answer in text; not final: a partial tag at the end is left out of both."""
    body = text.lstrip()
    if not final and START.startswith(body):  # nothing, or the opening tag still arriving
        return Split("", "")
    opened = body.startswith(START)
    if opened:
        body = body[len(START):]
    end = body.find(END)
    if end >= 0:
        return Split(body[:end].lstrip(), body[end + len(END):].lstrip())
    if opened or fmt.starts_in_reasoning:
        return Split(body[:len(body) - (0 if final else _held(body, END))].lstrip(), "")
    if not final and _held(body, END):
        return Split("", body[:len(body) - _held(body, END)])
    return Split("", text)


class ReasoningStream:
    """Deltas of reasoning and answer text from the cumulative output text of one choice."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.fmt = fmt
        self.sent = Split("", "")

    def update(self, text: str, final: bool) -> Split:
        now = split(self.fmt, text, final)
        if self.sent.content and not self.sent.reasoning and now.reasoning:
            # a </think> after answer text went out (qwen3 without an opening tag): the text before the
            # tag was (or would have been) answer already, so the tag is dropped and the answer goes on
            now = Split("", now.reasoning + now.content)
        # what went out stays out: a late </think> cannot take back text already sent as answer
        now = Split(now.reasoning if now.reasoning.startswith(self.sent.reasoning) else self.sent.reasoning,
                    now.content if now.content.startswith(self.sent.content) else self.sent.content)
        delta = Split(now.reasoning[len(self.sent.reasoning):], now.content[len(self.sent.content):])
        self.sent = now
        return delta

"""Role blocks as text: each role's prefix and suffix, read off the model's own chat template.

The template is rendered with sentinel contents and split around them, so a program that writes
`user(q)` then `assistant(gen(...))` sends exactly the text `apply_chat_template` would render.

Default system message (SmolLM2's template inserts one when the first message is not a system
message; so do Qwen2's and others): as in SGLang, the program's text is what is sent, and a
program whose first role block is not `system` gets the template's default system block written
first, when that block is the first thing in the program. Thus `user(q) + assistant(gen())` is
rendered exactly as the chat API renders `[{"role": "user", ...}]`; a program that starts with
plain text gets no system block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxradix.lang.ir import ROLES

_S, _U, _A = "XJRSYSTEMX", "XJRUSERX", "XJRASSISTANTX"


@dataclass(frozen=True)
class ChatTemplate:
    name: str = field(compare=False)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after its content
    default_system: str = ""  # text the template writes first when the first message is not system
    default_system_content: str | None = None  # that block's content, when it is a system message

    def role_prefix(self, role: str) -> str:
        return self.prefix[_check(role)]

    def role_suffix(self, role: str) -> str:
        return self.suffix[_check(role)]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """What a program writing these messages as role blocks sends."""
        out = self.default_system if messages and messages[0]["role"] != "system" else ""
        out += "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return out + (self.prefix["assistant"] if add_generation_prompt else "")

    @staticmethod
    def from_tokenizer(tokenizer: Any, name: str = "model") -> ChatTemplate:
        """Split the tokenizer's template (jaxradix.tokenizer.Tokenizer or an HF tokenizer)."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template: role blocks (system/user/assistant) "
                             "need one")

        def render(msgs: list[tuple[str, str]], gen_prompt: bool = False) -> str:
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in msgs],
                                                 add_generation_prompt=gen_prompt, tokenize=False)
            return str(text)

        sys_ = [("system", _S)]
        su = sys_ + [("user", _U)]
        r_s, r_su = render(sys_), render(su)
        r_sua = render(su + [("assistant", _A)])
        r_gen = render(su, gen_prompt=True)
        if not (r_su.startswith(r_s) and r_sua.startswith(r_su) and r_gen.startswith(r_su)):
            raise ValueError("cannot split this chat template into per-role blocks (a later message changes "
                             "the text of an earlier one)")
        prefix, suffix = {}, {}
        prefix["system"], suffix["system"] = r_s.split(_S)
        prefix["user"], suffix["user"] = r_su[len(r_s):].split(_U)
        asst_prefix, suffix["assistant"] = r_sua[len(r_su):].split(_A)
        # what the model continues from when it answers
        prefix["assistant"] = r_gen[len(r_su):] or asst_prefix

        head = render([("user", _U)]).split(_U)[0]
        default = head[:-len(prefix["user"])] if prefix["user"] and head.endswith(prefix["user"]) else ""
        content = None
        if default.startswith(prefix["system"]) and default.endswith(suffix["system"]) \
                and len(default) >= len(prefix["system"]) + len(suffix["system"]):
            content = default[len(prefix["system"]):len(default) - len(suffix["system"])]
        return ChatTemplate(name, prefix, suffix, default, content)


def _check(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {ROLES}")
    return role


CHATML = ChatTemplate(
    "chatml",
    prefix={r: f"<|im_start|>{r}\n" for r in ROLES},
    suffix={r: "<|im_end|>\n" for r in ROLES},
)

NAMED_TEMPLATES = {"chatml": CHATML}

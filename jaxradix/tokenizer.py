"""Tokenizer layer: an HF tokenizer (from an HF directory or rebuilt from GGUF metadata), chat
templates, stop tokens, and an incremental detokenizer with stop strings for streaming."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# End-of-turn / end-of-text tokens that stop generation when present in the vocabulary. A chat
# model's GGUF/HF eos is often not the token its template ends a turn with.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>",
)

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A thin wrapper over an HF tokenizer with the few things the engine needs."""

    def __init__(self, hf: PreTrainedTokenizerBase, extra_stop_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        vocab = hf.get_vocab()
        stops = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        stops.update(int(i) for i in extra_stop_ids)
        if hf.eos_token_id is not None:
            stops.add(int(hf.eos_token_id))
        self.stop_token_ids: set[int] = stops

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's template; token ids when `tokenize` (the rendered
        text already holds the template's special tokens, so none are added)."""
        if self.hf.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass a prompt instead of messages")
        text = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
        if not isinstance(text, str):
            raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token_id}, stop={sorted(self.stop_token_ids)})"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From an HF directory / hub id (AutoTokenizer) or a .gguf file (rebuilt from its metadata)."""
    p = Path(path)
    if p.suffix == ".gguf":
        from jaxradix.models.gguf_file import open_gguf  # that module imports this one

        return tokenizer_from_gguf_reader(open_gguf(p))
    hf = AutoTokenizer.from_pretrained(str(path))
    return Tokenizer(hf, extra_stop_ids=_generation_config_eos(p))


def _generation_config_eos(path: Path) -> list[int]:
    """HF chat models often list their end-of-turn ids as eos in generation_config.json."""
    f = path / "generation_config.json"
    if not f.is_file():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


# ---------------------------------------------------------------------------------------------
# Rebuilding a byte-level BPE tokenizer from GGUF metadata
# ---------------------------------------------------------------------------------------------

# tokenizer.ggml.pre -> how text is split before BPE. Patterns are the standard public ones.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
)
_LLAMA3_LIKE = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral", "lfm2"}
)
_QWEN2_LIKE = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
_GPT2_LIKE = frozenset({"gpt-2", "gpt2", "default", "olmo", "jais"})

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    for names, pattern in ((_LLAMA3_LIKE, _LLAMA3_SPLIT), (_QWEN2_LIKE, _QWEN2_SPLIT)):
        if pre in names:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
    if pre not in _GPT2_LIKE and pre is not None:
        logger.warning("GGUF pre-tokenizer %r unknown; using GPT-2's split (ids may differ)", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_from_gguf_reader(reader: GGUFReader) -> Tokenizer:
    """Rebuild the HF fast tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model`
    gpt2), with its special tokens, BOS/EOS behaviour and chat template."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE); "
            "pass an HF model directory instead"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges", [])
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))

    raw = RawTokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    ))
    raw.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    raw.decoder = decoders.ByteLevel()
    # already in the vocabulary, so these keep their ids; they are matched whole in raw text
    raw.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ttype in zip(tokens, token_types, strict=True) if ttype == _TOKEN_TYPE_CONTROL
    ])
    raw.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, ttype in zip(tokens, token_types, strict=True) if ttype == _TOKEN_TYPE_USER_DEFINED
    ])

    def token_id(key: str) -> int | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return int(i) if i is not None and 0 <= i < len(tokens) else None

    def token(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:

        def template(seq: str, type_id: int) -> list[str]:
            return [
                *([f"{bos}:{type_id}"] if add_bos else []),
                f"${seq}:{type_id}",
                *([f"{eos}:{type_id}"] if add_eos else []),
            ]

        raw.post_processor = processors.TemplateProcessing(
            single=template("A", 0),
            pair=template("A", 0) + template("B", 1),
            special_tokens=[(t, i) for t, i in {bos: bos_id, eos: eos_id}.items() if t is not None],
        )
    else:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)

    arch = _field(reader, "general.architecture")
    context = _field(reader, f"{arch}.context_length")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else int(1e30),
    )
    hf.chat_template = _field(reader, "tokenizer.chat_template")
    extra = [_field(reader, f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    return Tokenizer(hf, extra_stop_ids=[i for i in extra if i is not None])


# ---------------------------------------------------------------------------------------------
# Incremental detokenization with stop strings
# ---------------------------------------------------------------------------------------------

# prompt tokens decoded as left context, so the first output token gets its leading space right
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text pieces.

    Two windows over all ids: [prefix_offset, read_offset) is text already emitted (decoded again
    only as left context) and [read_offset, end) is new. A piece is released only when the decoded
    text no longer ends in U+FFFD, i.e. no multi-byte character is cut. Stop strings: the text is cut
    before the first stop string, and any tail that could still grow into one is held back.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = list(prompt_ids or [])
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - _PROMPT_CONTEXT_TOKENS, 0)
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched
        self._pending = ""  # stable text held back because it may start a stop string
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _stable_delta(self, final: bool) -> str:
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def _release(self, delta: str, final: bool) -> str:
        self._pending += delta
        text = self._pending
        hits = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            cut, s = min(hits)
            self.stopped, self.stop_reason = True, s
            out, self._pending = text[:cut], ""
        elif final:
            out, self._pending = text, ""
        else:
            hold = len(text)
            longest = max((len(s) for s in self.stop), default=1)
            for j in range(max(len(text) - longest + 1, 0), len(text)):
                if any(s.startswith(text[j:]) for s in self.stop):
                    hold = j
                    break
            out, self._pending = text[:hold], text[hold:]
        if out:
            self._emitted.append(out)
        return out

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        return self._release(self._stable_delta(final=False), final=False)

    def flush(self) -> str:
        """End of stream: release everything still held back (incomplete bytes included)."""
        if self.stopped:
            return ""
        return self._release(self._stable_delta(final=True), final=True)

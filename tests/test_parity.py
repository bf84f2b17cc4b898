"""Parity with Hugging Face transformers (PyTorch), from references recorded by
scripts/record_hf_reference.py: CI compares against the files and never needs torch."""

from pathlib import Path

import numpy as np
import pytest
from conftest import get_engine
from model_utils import paged_logits

from jaxradix import SamplingParams
from jaxradix.models.loader import load_model

DATA = Path(__file__).parent / "data" / "parity"
TINY = ["tiny_qwen3", "tiny_llama3", "tiny_qwen2", "tiny_mistral"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_models_match_hf(name):
    ref = np.load(DATA / name / "reference.npz")
    loaded = load_model(DATA / name, progress=False)
    ids = [int(t) for t in ref["input_ids"]]
    logits = paged_logits(loaded.model, ids, [len(ids)], page_size=16)
    assert np.max(np.abs(logits - ref["logits"])) <= 1e-3
    assert (logits.argmax(-1) == ref["logits"].argmax(-1)).all()
    # token by token through the paged pool, page size 1
    stepwise = paged_logits(loaded.model, ids, [1] * len(ids), page_size=1)
    assert np.max(np.abs(stepwise - ref["logits"])) <= 1e-3
    # greedy continuation, incremental through the pool
    n0 = int(ref["greedy_prompt_len"])
    new = paged_logits(loaded.model, ids[:n0], [n0], page_size=16, greedy_new=len(ref["greedy_ids"]))
    assert new.tolist() == [int(t) for t in ref["greedy_ids"]]


def test_smollm2_gguf_matches_hf_logits():
    ref = np.load(DATA / "smollm2_gguf" / "reference.npz")
    loaded = get_engine().loaded  # the embedded GGUF, loaded once for the whole session
    ids = loaded.tokenizer.encode(str(ref["prompt"]))
    assert ids == [int(t) for t in ref["input_ids"]]  # no BOS, same BPE
    logits = paged_logits(loaded.model, ids, [len(ids)], page_size=16)
    assert np.max(np.abs(logits - ref["logits"])) <= 1e-3
    assert (logits.argmax(-1) == ref["logits"].argmax(-1)).all()


def test_smollm2_engine_greedy_matches_hf():
    ref = np.load(DATA / "smollm2_gguf" / "reference.npz")
    engine = get_engine()
    sp = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    out = engine.generate(input_ids=[int(t) for t in ref["input_ids"]], sampling_params=sp)
    assert out["output_ids"] == [int(t) for t in ref["greedy_ids"]]
    assert out["text"] == str(ref["greedy_text"])
    chat = engine.generate(input_ids=[int(t) for t in ref["chat_input_ids"]], sampling_params=sp)
    assert chat["output_ids"] == [int(t) for t in ref["chat_greedy_ids"]]
    assert engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True) == str(ref["chat_text"])

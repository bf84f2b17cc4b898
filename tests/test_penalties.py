"""Penalties on the real model must move the output the way they are meant to (not merely run).

Repetition is measured as the count of the output's most frequent token; frequency and presence
penalties count output tokens only (OpenAI's definition), the repetition penalty prompt tokens too."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import get_engine

PROMPT = "one one one one one one one one"  # the model continues "-to-many-to-many-..."
ECHO = "The cat sat on the mat. The cat sat on the mat. The cat"
N = 16


@pytest.fixture(scope="module")
def engine():
    return get_engine()


def greedy(engine, prompt: str = PROMPT, **params) -> list[int]:
    return engine.generate(prompt, {"temperature": 0, "max_new_tokens": N, "ignore_eos": True, **params})[
        "output_ids"]


def repeats(ids: list[int]) -> int:
    return Counter(ids).most_common(1)[0][1]


@pytest.fixture(scope="module")
def plain(engine):
    out = greedy(engine)
    assert repeats(out) >= N // 2, out  # what the penalties below must reduce
    return out


@pytest.mark.parametrize("params", [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.0},
                                    {"presence_penalty": 1.5}])
def test_a_positive_penalty_repeats_less(engine, plain, params):
    out = greedy(engine, **params)
    assert repeats(out) < repeats(plain), (params, out, plain)
    assert len(set(out)) > len(set(plain)), (params, out, plain)


def test_frequency_grows_with_the_count_presence_does_not(engine, plain):
    """The same penalty: presence subtracts it once per token seen, frequency once per occurrence,
    so frequency suppresses a token that keeps coming back much harder."""
    pres, freq = greedy(engine, presence_penalty=2.0), greedy(engine, frequency_penalty=2.0)
    assert repeats(freq) < repeats(pres) < repeats(plain), (freq, pres, plain)


def test_a_negative_frequency_penalty_repeats_more(engine):
    base, neg = greedy(engine, ECHO), greedy(engine, ECHO, frequency_penalty=-2.0)
    assert len(set(neg)) < len(set(base)) and repeats(neg) > repeats(base), (base, neg)

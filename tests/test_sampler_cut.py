"""The sampler's top-k / top-p / min-p cut by threshold search equals the cut by a full sort."""

import jax
import numpy as np
import pytest

from jaxradix.engine.sampler import filter_logits, filter_logits_sorted


def _case(kind: str, B: int = 12, V: int = 3000) -> tuple:
    rng = np.random.default_rng(hash(kind) % 1000)
    x = (rng.standard_normal((B, V)) * rng.uniform(0.5, 6, (B, 1))).astype(np.float32)
    if kind == "ties":
        x = np.round(x)
    elif kind == "masked":  # a grammar mask leaves few tokens
        x[:, 40:] = -np.inf
    elif kind == "peaked":
        x[:, 7] += 30
    top_k = rng.integers(1, 80, B).astype(np.int32)
    top_k[::4] = 0
    top_k[1] = V + 5  # larger than V: off
    top_p = rng.uniform(0.05, 1, B).astype(np.float32)
    top_p[::3] = 1.0
    min_p = np.where(np.arange(B) % 2 == 0, 0.0, rng.uniform(0, 0.3, B)).astype(np.float32)
    return x, top_k, top_p, min_p


@pytest.mark.parametrize("ways", [4, 16])
def test_search_cut_equals_sort_cut(ways):
    cases = [_case(kind) for kind in ("normal", "ties", "masked", "peaked")]
    args = tuple(np.concatenate(parts) for parts in zip(*cases, strict=True))
    got = np.asarray(jax.jit(lambda *a: filter_logits(*a, ways=ways))(*args))
    want = np.asarray(jax.jit(filter_logits_sorted)(*args))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], args[0][np.isfinite(want)])


def test_each_filter_keeps_what_it_says():
    x = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4, np.float32))
    kept = np.isfinite(np.asarray(jax.jit(filter_logits, static_argnames="ways")(
        x, np.array([2, 0, 0, 0], np.int32), np.array([1, 0.8, 1, 1], np.float32),
        np.array([0, 0, 0.25, 0], np.float32), ways=4)))
    assert kept[0].tolist() == [True, True, False, False, False]  # top_k 2
    assert kept[1].tolist() == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 <= + 0.15
    assert kept[2].tolist() == [True, True, True, False, False]  # p >= 0.25 * 0.5
    assert kept[3].all()  # no filter: untouched

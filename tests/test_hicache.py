"""The hierarchical cache: prefixes evicted from a tiny device pool come back from the host tier.

The host engine shares the tiny-pool shapes of test_engine's retraction test, so its steps load from
the persistent compilation cache. The leak invariant (conftest) checks both tiers after each test.
"""

import threading

import pytest
from conftest import get_engine

from jaxradix import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
CHATS = [" ".join(f"chat {c} line {i}." for i in range(16)) for c in range(6)]  # ~100 tokens each


@pytest.fixture(scope="module")
def tiered():
    e = get_engine(max_total_tokens=256, new_token_ratio=0.05, min_new_token_ratio=0.01,
                   enable_hierarchical_cache=True, hicache_ratio=8)
    assert e.host_pool is not None and e.host_pool.capacity == 8 * e.pool.capacity
    return e


def _two_turns(engine) -> list[list[int]]:
    """Each chat's first turn, then (round robin, after the others evicted it) its second turn."""
    first = [engine.generate(p, GREEDY)["output_ids"] for p in CHATS]
    ids = [engine.tokenizer.encode(p) for p in CHATS]
    second = [engine.generate(input_ids=i + o + i[:20], sampling_params=GREEDY)["output_ids"]
              for i, o in zip(ids, first, strict=True)]
    return first + second


def test_eviction_and_reload_keep_greedy_output(tiered):
    expected = _two_turns(get_engine())
    tiered.flush_cache()
    assert _two_turns(tiered) == expected
    st = tiered.cache_stats()
    assert st["host_saved_tokens"] > 0, "the tiny pool never wrote a prefix back"
    assert st["host_hit_tokens"] >= 3 * 96, "second turns did not load their history from the host"
    assert st["host_loaded_tokens"] >= st["host_hit_tokens"]


def test_abort_while_a_load_is_pending(tiered):
    tiered.flush_cache()
    sp = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    for p in CHATS:  # every history ends up on the host
        tiered.generate(p, GREEDY)
    loaded = tiered.cache_stats()["host_loaded_tokens"]
    results: dict[str, dict] = {}

    def run(i: int) -> None:
        results[str(i)] = tiered.generate(CHATS[i] + " more", sp, rid=f"hc-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for i in range(0, len(CHATS), 2):  # abort half, some while admitted with a load just dispatched
        tiered.abort(f"hc-{i}")
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(CHATS)
    kept = [results[str(i)] for i in range(1, len(CHATS), 2)]
    assert all(r["meta_info"]["finish_reason"]["type"] != "abort" for r in kept)
    assert tiered.cache_stats()["host_loaded_tokens"] > loaded
    ref = get_engine().generate([CHATS[i] + " more" for i in range(1, len(CHATS), 2)], sp)
    assert [r["output_ids"] for r in kept] == [r["output_ids"] for r in ref]


def test_a_write_back_does_not_wait_and_lands_before_it_is_read():
    """HostPool.save dispatches the copy and returns; the pages' contents at that point reach host memory
    even when the device overwrites them right after (the copy is ordered before later writes), and a load
    of those host pages reads them; at most one chunk stays in flight."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxradix.cache.host_pool import MAX_BUCKET, HostPool
    from jaxradix.cache.page_pool import PagePool
    from jaxradix.models.model_config import ModelConfig

    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   rms_norm_eps=1e-6, max_position_embeddings=256))
    pool = PagePool(cfg, (2 * MAX_BUCKET + 8) * 4, 4, jnp.float32)  # tokens, page size 4
    rng = np.random.default_rng(0)
    pool.kv = tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in pool.kv)
    want = jax.device_get(pool.kv)
    host = HostPool(pool, 2 * MAX_BUCKET + 8)
    src = np.arange(1, MAX_BUCKET + 3, dtype=np.int32)  # two chunks
    dst = np.arange(5, MAX_BUCKET + 7, dtype=np.int32)
    host.save(src, dst)
    assert len(host._pending) == 1  # the second chunk in flight, the first landed before it was dispatched
    pool.kv = tuple(a.at[src].set(0.0) for a in pool.kv)  # the device reuses the pages at once
    host.load(dst[:3], np.array([100, 101, 102], np.int32))  # lands the pending chunk first
    assert not host._pending
    got = jax.device_get(pool.kv)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g[[100, 101, 102]], w[src[:3]])
    for layer in range(len(want)):
        np.testing.assert_array_equal(host.data[layer][dst], want[layer][src])
    host.save(src[:2], dst[:2])
    host.poll()  # lands it once the device is done (or leaves it for the next save / load)
    jax.block_until_ready(pool.kv)
    host.poll()
    assert not host._pending

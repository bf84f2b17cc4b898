import re

import numpy as np
import pytest
from model_utils import paged_logits, random_model

from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked

TINY = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_hf(TINY))


@pytest.mark.parametrize("page_size", [1, 16])
def test_whole_chunked_and_token_by_token_agree(model, page_size):
    tokens = list(np.random.default_rng(0).integers(0, 128, 37))
    whole = paged_logits(model, tokens, [37], page_size)
    chunked = paged_logits(model, tokens, [16, 5, 16], page_size)
    stepwise = paged_logits(model, tokens, [1] * 37, page_size)
    np.testing.assert_allclose(chunked, whole, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(stepwise, whole, atol=2e-5, rtol=1e-5)


def test_blocked_cpu_path_matches_reference(model):
    tokens = list(np.random.default_rng(1).integers(0, 128, 45))
    ref = paged_logits(model, tokens, [30, 15], 4)
    blocked = paged_logits(model, tokens, [30, 15], 4,
                           lambda *a, **k: ragged_paged_attention_blocked(*a, block_tokens=8, **k))
    np.testing.assert_allclose(blocked, ref, atol=2e-5, rtol=1e-5)


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        ModelConfig.from_hf(TINY | {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf(TINY | {"num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf(TINY | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


_COPY_OPS = ("dynamic-slice", "slice", "copy", "transpose", "gather")


def _weight_shaped_copies(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """Instructions of compiled HLO that produce an array of a weight matrix's shape (leading
    1-dims dropped) by slicing, copying, transposing or gathering: a materialised weight slice."""
    found = []
    for m in re.finditer(r"= \w+\[([\d,]*)\]\S* (" + "|".join(_COPY_OPS) + r")\(", hlo):
        dims = tuple(int(d) for d in m.group(1).split(",") if d)
        while dims and dims[0] == 1:
            dims = dims[1:]
        if dims in shapes:
            found.append(m.group(0))
    return found


def test_step_reads_weights_in_place(model):
    """The compiled serving step never materialises a copy or slice of a layer weight (a scan over
    stacked weights did: XLA dynamic-sliced each layer's matrices out of the stack every step)."""
    import jax
    import jax.numpy as jnp

    from jaxradix.cache.page_pool import PagePool
    from jaxradix.engine.batch import Buckets
    from jaxradix.engine.model_runner import ModelRunner
    from jaxradix.models.llama import layer_param_shapes

    cfg = model.cfg
    shapes = {s for s in layer_param_shapes(cfg).values() if len(s) == 2}
    # The detector sees the copies a scan over stacked weights makes (control: must find them).
    stacked = jnp.zeros((cfg.num_layers, *layer_param_shapes(cfg)["wqkv"]), jnp.float32)
    scan = jax.jit(lambda x, w: jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl[:, :64]), None), x, w)[0])
    control = scan.lower(jnp.zeros((8, 64), jnp.float32), stacked).compile().as_text()
    assert _weight_shaped_copies(control, shapes), "the detector no longer sees scan weight slices"

    pool = PagePool(cfg, 256, 16, jnp.float32)
    runner = ModelRunner(model, pool, Buckets(4, 16), 16, 4, 256, ragged_paged_attention_blocked)
    for bucket in (runner.buckets.all()[0], runner.buckets.all()[-1]):  # decode B=1, a mixed token bucket
        hlo = runner._compile(bucket, False).as_text()
        assert not _weight_shaped_copies(hlo, shapes), bucket

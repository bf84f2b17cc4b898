"""On-device sampling: inside the jitted step (CPU, TPU), or as its own executable compiled per
SamplerPlan (GPU; see SamplerPlan for why).

Per row: logit bias, repetition/frequency/presence penalties (from the per-slot device state),
the grammar bitmask, then greedy or temperature sampling with top-k, top-p and min-p. The random
draw of row b is a pure function of (seed_b, step_b), so a seeded request samples the same tokens
whatever batch it runs in. Logprobs are those of the raw model distribution (before penalties
and temperature), as vLLM and SGLang report by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.engine.request import MAX_TOP_LOGPROBS


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array  # [B] f32, 0 = greedy
    top_p: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32, <= 0 = off
    min_p: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    seed: jax.Array  # [B] uint32
    step: jax.Array  # [B] int32, index of the token being sampled (output length so far)
    slot: jax.Array  # [B] int32, request slot: row of the per-slot state
    use_state: jax.Array  # [B] bool, read penalties/bias from the state and count the sampled token
    keep: jax.Array  # [B] bool, the row's token is kept: stored as its slot's last token
    grammar_mask: jax.Array  # [B, ceil(V/32)] uint32 packed allowed-token bits (all ones = free)
    needs_filter: jax.Array  # [] bool, any row uses top-k/top-p/min-p
    needs_top_logprobs: jax.Array  # [] bool, any row asks for top logprobs
    needs_state: jax.Array  # [] bool, any row reads the per-slot state


PLAN_FIELDS = ("penalties", "draw", "top_k", "top_p", "min_p", "top_logprobs")


@dataclass(frozen=True)
class SamplerPlan:
    """The sampler's work in one step, decided on the host: a static argument, one compiled sampler per
    (plan, rows). Without a plan the sampler skips unneeded work with lax.cond on device flags. XLA's GPU
    runtime runs a conditional by copying its predicate to the host and blocking until the stream gets
    there (ConditionalThunk), which stalls the host's dispatch inside every step and so defeats overlap
    scheduling; with a plan the compiled step has no data-dependent control flow at all."""

    penalties: bool = False  # some row reads the per-slot state (penalties, logit bias)
    draw: bool = False  # some row samples (temperature > 0)
    top_k: bool = False  # some sampling row has top_k > 0
    top_p: bool = False  # ... top_p < 1
    min_p: bool = False  # ... min_p > 0
    top_logprobs: bool = False  # some row asks for top logprobs

    @property
    def filters(self) -> bool:
        return self.top_k or self.top_p or self.min_p

    @staticmethod
    def needed(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
               use_state: np.ndarray, top_logprobs: bool) -> SamplerPlan:
        """What a batch needs, from its host arrays [B] (the one definition: build_step sets the metadata's
        needs_* flags from it). A greedy row's filters are ignored: it takes the argmax."""
        on = temperature > 0
        return SamplerPlan(penalties=bool(use_state.any()), draw=bool(on.any()), top_k=bool((on & (top_k > 0)).any()),
                           top_p=bool((on & (top_p < 1)).any()), min_p=bool((on & (min_p > 0)).any()),
                           top_logprobs=bool(top_logprobs))

    @staticmethod
    def of(md: SamplingMetadata) -> SamplerPlan:
        """From a step's host (numpy) metadata: the plan that does what the lax.cond sampler would."""
        return SamplerPlan.needed(*(np.asarray(a) for a in (md.temperature, md.top_k, md.top_p, md.min_p,
                                                             md.use_state)), bool(np.asarray(md.needs_top_logprobs)))

    def bits(self) -> int:
        return sum(1 << i for i, f in enumerate(PLAN_FIELDS) if getattr(self, f))

    @staticmethod
    def from_bits(bits: int) -> SamplerPlan:
        return SamplerPlan(**{f: bool(bits >> i & 1) for i, f in enumerate(PLAN_FIELDS)})


def _branch(plan: SamplerPlan | None, part: str, pred: jax.Array, yes: Callable, no: Callable, x: Any) -> Any:
    """yes(x) if the step needs `part` (a SamplerPlan field or property): decided by the plan (static) when
    there is one, else on device by lax.cond on pred."""
    if plan is None:
        return jax.lax.cond(pred, yes, no, x)
    return yes(x) if getattr(plan, part) else no(x)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerState:
    """Per request slot, on device, donated with the KV pool."""

    counts: jax.Array  # [R, V] int32, occurrences of each token in the output so far
    seen: jax.Array  # [R, V] bool, token occurs in prompt or output (repetition penalty)
    bias: jax.Array  # [R, V] f32, logit bias
    last: jax.Array  # [R] int32, the token most recently sampled for each slot (the next step's input)

    @staticmethod
    def zeros(num_slots: int, vocab: int) -> SamplerState:
        return SamplerState(jnp.zeros((num_slots, vocab), jnp.int32), jnp.zeros((num_slots, vocab), bool),
                            jnp.zeros((num_slots, vocab), jnp.float32), jnp.zeros(num_slots, jnp.int32))


def resolve_input_ids(
    input_ids: jax.Array,  # [T] int32
    from_slot: jax.Array,  # [T] int32, >= 0: take the last token sampled for that slot
    last: jax.Array,  # [R] int32, SamplerState.last
) -> jax.Array:  # [T] int32
    """Overlap scheduling: a decode row's input can be the token the previous step left on the device."""
    return jnp.where(from_slot >= 0, last[jnp.maximum(from_slot, 0)], input_ids)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] f32, raw logprob of the sampled token
    top_ids: jax.Array  # [B, K] int32
    top_logprobs: jax.Array  # [B, K] f32


def init_slot(
    state: SamplerState,
    slot: jax.Array,  # [] int32
    prompt_ids: jax.Array,  # [C] int32, padded with -1
    output_ids: jax.Array,  # [C] int32, padded with -1
    bias_ids: jax.Array,  # [NB] int32, padded with -1
    bias_values: jax.Array,  # [NB] f32
) -> SamplerState:
    """(Re)build one slot's state when a request that uses penalties or logit_bias is admitted."""
    V = state.counts.shape[1]

    def scatter(ids: jax.Array, values: jax.Array, base: jax.Array, add: bool) -> jax.Array:
        ok = ids >= 0
        idx = jnp.where(ok, ids, V)  # out of range: dropped
        vals = jnp.where(ok, values, 0).astype(base.dtype)
        return base.at[idx].add(vals, mode="drop") if add else base.at[idx].set(vals, mode="drop")

    counts = scatter(output_ids, jnp.ones_like(output_ids), jnp.zeros(V, jnp.int32), add=True)
    seen = scatter(prompt_ids, jnp.ones_like(prompt_ids), jnp.zeros(V, jnp.int32), add=False) > 0
    bias = scatter(bias_ids, bias_values, jnp.zeros(V, jnp.float32), add=False)
    return SamplerState(state.counts.at[slot].set(counts), state.seen.at[slot].set(seen | (counts > 0)),
                        state.bias.at[slot].set(bias), state.last)


def unpack_mask(packed: jax.Array, vocab: int) -> jax.Array:  # [B, W] uint32 -> [B, V] bool
    bits = (packed[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)[None, None, :]) & 1
    return bits.reshape(packed.shape[0], -1)[:, :vocab].astype(bool)


def search_ways() -> int:
    """Thresholds tested per pass of the cut search (ceil(32 / log2(ways)) passes over [B, V]).
    scripts/bench_sampler.py at B = 64, V = 128256: 4 ways is the fastest on CPU and on an H200 too
    (0.94 ms vs 1.07 ms at 16 ways and 1.36 ms for the full sort); TPU is unmeasured."""
    return 4


def _sortable(x: jax.Array) -> jax.Array:  # f32 -> uint32 with the same order (no NaNs)
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _unsortable(u: jax.Array) -> jax.Array:  # the inverse of _sortable
    b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _search(
    u: jax.Array,  # [B, V] uint32 sortable keys
    holds: Callable[[jax.Array], jax.Array],  # [B, W] thresholds -> [B, W] bool, true below a cut
    ways: int,
) -> jax.Array:  # [B] uint32: the largest threshold t where holds(t)
    """A ways-ary search over the 2^32 keys: each pass tests ways - 1 thresholds in one sweep of [B, V].
    holds(t) must be monotone (true, then false as t grows), true at min(u) and false above max(u)."""
    lo = jnp.min(u, axis=-1)
    hi = jnp.max(u, axis=-1) + 1  # +inf's key is 0xFF800000: no overflow
    j = jnp.arange(ways + 1, dtype=jnp.uint32)
    passes = -(-32 // (ways.bit_length() - 1))

    def one_pass(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        d = hi - lo
        t = lo[:, None] + (d // ways)[:, None] * j + ((d % ways)[:, None] * j) // ways  # [B, ways + 1]
        c = jnp.sum(holds(t[:, 1:-1]), axis=-1)  # [B] thresholds that hold: a prefix
        return (jnp.take_along_axis(t, c[:, None], axis=-1)[:, 0],
                jnp.take_along_axis(t, c[:, None] + 1, axis=-1)[:, 0])

    return jax.lax.fori_loop(0, passes, one_pass, (lo, hi), unroll=True)[0]  # no loop predicate to sync


def filter_logits(
    scaled: jax.Array,  # [B, V] f32, logits / temperature
    top_k: jax.Array,  # [B] int32, <= 0: off
    top_p: jax.Array,  # [B] f32, 1: off
    min_p: jax.Array,  # [B] f32, 0: off
    ways: int | None = None,
    plan: SamplerPlan | None = None,
) -> jax.Array:  # [B, V] f32, -inf outside the kept set
    """Top-k, top-p and min-p without sorting V, with the cut of filter_logits_sorted:
    top-k keeps values >= the k-th largest (ties included); top-p keeps the smallest set of the
    largest values whose probability mass reaches top_p (ties of its last value included), computed
    on the whole distribution; min-p keeps probabilities >= min_p * the largest. The k-th value and
    the top-p cut are found by a search over the float keys (counts and masses above thresholds),
    exact for top-k and exact up to the float rounding of the mass sums for top-p. Rows that ask
    for none of them are left untouched. plan: which cuts any row needs (else decided on device)."""
    B, V = scaled.shape
    ways = ways or search_ways()
    u = _sortable(scaled)  # [B, V]
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1
    zero = jnp.zeros(B, jnp.uint32)

    def k_cut(u: jax.Array) -> jax.Array:  # the key of the k-th largest value
        k = jnp.where(use_k, top_k, 1)[:, None]
        return _search(u, lambda t: jnp.sum(u[:, :, None] >= t[:, None, :], axis=1) >= k, ways)

    def p_cut(u: jax.Array) -> jax.Array:  # the key of the smallest value kept by top-p
        probs = jax.nn.softmax(scaled, axis=-1)  # [B, V]

        def holds(t: jax.Array) -> jax.Array:  # the mass of the keys >= t reaches top_p
            mass = jnp.sum(jnp.where(u[:, :, None] >= t[:, None, :], probs[:, :, None], 0.0), axis=1)
            return mass >= top_p[:, None]

        # the largest such t is a value whose strictly-greater mass stays below top_p: the last one kept
        return _search(u, holds, ways)

    cut_k = _branch(plan, "top_k", jnp.any(use_k), k_cut, lambda u: zero, u)
    cut_p = _branch(plan, "top_p", jnp.any(use_p), p_cut, lambda u: zero, u)
    cut = jnp.maximum(jnp.where(use_k, cut_k, 0), jnp.where(use_p, cut_p, 0))  # [B] key, 0: keep all
    cut_value = jnp.where(cut > 0, _unsortable(cut), -jnp.inf)[:, None]  # [B, 1]
    min_p_cut = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p[:, None])  # prob >= min_p * max prob
    return jnp.where(scaled >= jnp.maximum(cut_value, min_p_cut), scaled, -jnp.inf)


def filter_logits_sorted(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """The same cut by a full sort of V (the reference; what the sampler did before the search)."""
    V = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p[:, None]
    p_cut = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    p_cut = jnp.where(top_p[:, None] < 1, p_cut, -jnp.inf)
    min_p_cut = sorted_desc[:, :1] + jnp.log(min_p[:, None])  # prob >= min_p * max prob
    cut = jnp.maximum(jnp.maximum(kth, p_cut), min_p_cut)
    return jnp.where(scaled >= cut, scaled, -jnp.inf)


def sample(
    logits: jax.Array,  # [B, V] f32
    md: SamplingMetadata,
    state: SamplerState,
    plan: SamplerPlan | None = None,
) -> tuple[SampleOutput, SamplerState]:
    """One token per row. plan (static): what this step needs, from SamplerPlan.of(md) on the host; None
    decides each optional part on device with lax.cond (same outputs; no host sync on CPU and TPU)."""
    B, V = logits.shape

    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]

    def penalize(x: jax.Array) -> jax.Array:  # reads [B, V] of state: only when a row asks for it
        use = md.use_state[:, None]
        counts = state.counts[md.slot]  # [B, V]
        seen = state.seen[md.slot]  # [B, V]
        x = x + jnp.where(use, state.bias[md.slot], 0.0)
        rep = md.repetition_penalty[:, None]
        x = jnp.where(use & seen, jnp.where(x > 0, x / rep, x * rep), x)
        return x - jnp.where(use, md.frequency_penalty[:, None] * counts
                             + md.presence_penalty[:, None] * (counts > 0), 0.0)

    x = _branch(plan, "penalties", md.needs_state, penalize, lambda x: x, logits)
    x = jnp.where(unpack_mask(md.grammar_mask, V), x, -jnp.inf)

    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [B]
    temp = jnp.where(md.temperature > 0, md.temperature, 1.0)[:, None]
    scaled = x / temp

    def filtered(scaled: jax.Array) -> jax.Array:
        on = md.temperature > 0  # greedy rows take the argmax of x
        return filter_logits(scaled, jnp.where(on, md.top_k, 0), jnp.where(on, md.top_p, 1.0),
                             jnp.where(on, md.min_p, 0.0), plan=plan)

    scaled = _branch(plan, "filters", md.needs_filter, filtered, lambda s: s, scaled)

    def draw(scaled: jax.Array) -> jax.Array:  # gumbel-max: one categorical draw per row
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(md.seed, md.step)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)  # [B, V]
        return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)

    sampled = _branch(plan, "draw", jnp.any(md.temperature > 0), draw, lambda s: greedy, scaled)
    tokens = jnp.where(md.temperature > 0, sampled, greedy)  # [B]

    logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    K = MAX_TOP_LOGPROBS
    top_lp, top_ids = _branch(
        plan, "top_logprobs", md.needs_top_logprobs, lambda lp: tuple(jax.lax.top_k(lp, K)),
        lambda lp: (jnp.zeros((B, K), lp.dtype), jnp.zeros((B, K), jnp.int32)), raw_logprobs)

    R = state.last.shape[0]
    add = md.use_state.astype(jnp.int32)
    new_state = SamplerState(
        counts=state.counts.at[md.slot, tokens].add(add),
        seen=state.seen.at[md.slot, tokens].max(md.use_state),
        bias=state.bias,
        last=state.last.at[jnp.where(md.keep, md.slot, R)].set(tokens, mode="drop"),
    )
    return SampleOutput(tokens, logprobs, top_ids.astype(jnp.int32), top_lp), new_state

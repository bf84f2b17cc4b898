"""The only part of the engine that touches the device: one jitted step per bucket.

The step runs the model over a ragged batch, writes new K/V into the pool (donated, updated in
place), and samples one token per row on device. Every bucket is compiled ahead of time; a
shape outside the compiled set raises instead of compiling while serving.

Two ways to sample (``sampler_mode``): ``fused`` puts the sampler in the step, its optional parts
behind lax.cond (CPU, TPU: a conditional runs on the device or the host thread without a sync);
``split`` (GPU) runs the forward, then a sampler compiled for the step's SamplerPlan, so neither
executable has data-dependent control flow (on a GPU each lax.cond blocks the dispatching thread
until the stream reaches it, which serialises host and device).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxradix.cache.page_pool import PagePool
from jaxradix.engine.batch import Bucket, Buckets, StepInput, free_grammar_mask
from jaxradix.engine.request import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from jaxradix.engine.sampler import (
    SampleOutput,
    SamplerPlan,
    SamplerState,
    SamplingMetadata,
    init_slot,
    resolve_input_ids,
    sample,
)
from jaxradix.models.llama import LlamaForCausalLM
from jaxradix.parallel.multihost import CMD_INIT_SLOT, CMD_STEP, Command, StepChannel
from jaxradix.parallel.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PromptLogprobs:
    logprobs: jax.Array  # [T] f32, logprob of lp_targets[t] after tokens [..t]
    top_ids: jax.Array  # [T, K] int32
    top_logprobs: jax.Array  # [T, K] f32


@dataclass
class StepResult:
    """Host copies of a step's outputs."""

    tokens: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B] f32
    top_ids: np.ndarray  # [B, K]
    top_logprobs: np.ndarray  # [B, K]
    prompt: PromptLogprobs | None  # numpy leaves, only for prompt-logprob steps


class LaunchedStep:
    """A step dispatched to the device: its outputs stay there until result() copies them to the host."""

    def __init__(self, out: SampleOutput, extra: PromptLogprobs | None):
        self._out, self._extra = out, extra
        for leaf in jax.tree.leaves((out, extra)):
            leaf.copy_to_host_async()  # the copy starts as soon as the step ends

    def done(self) -> bool:
        """Whether the device has finished the step (never blocks)."""
        return self._out.tokens.is_ready()

    def result(self) -> StepResult:
        """Wait for the step and return host copies of its outputs."""
        out = jax.device_get(self._out)
        extra = jax.device_get(self._extra) if self._extra is not None else None
        return StepResult(out.tokens, out.logprobs, out.top_ids, out.top_logprobs, extra)


SAMPLER_MODES = ("fused", "split")
PRECOMPILED_PLANS = (SamplerPlan(), SamplerPlan(draw=True))  # greedy, and sampling without filters


def all_plans() -> list[SamplerPlan]:
    """Every plan a step can have (filters imply draw), the simpler first: 36 of them."""
    plans = [SamplerPlan(pen, draw, k, p, m, lp)
             for pen, draw, k, p, m, lp in itertools.product((False, True), repeat=6) if draw or not (k or p or m)]
    return sorted(plans, key=lambda p: (p.penalties, p.top_logprobs, bin(p.bits()).count("1"), p.bits()))


def sampler_mode(mode: str = "auto") -> str:
    """auto: 'split' on a GPU, else 'fused'; JAXRADIX_SAMPLER=fused|split overrides auto (benchmarks)."""
    if mode != "auto":
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler_mode must be auto or one of {SAMPLER_MODES}, got {mode!r}")
        return mode
    env = os.environ.get("JAXRADIX_SAMPLER", "")
    if env:
        if env not in SAMPLER_MODES:
            raise ValueError(f"JAXRADIX_SAMPLER must be one of {SAMPLER_MODES}, got {env!r}")
        return env
    return "split" if jax.default_backend() in ("gpu", "cuda", "rocm") else "fused"


def enable_compilation_cache(path: str | None) -> None:
    """Every compile is cached, small ones too: the split sampler's plans take 0.1-0.5 s each and there are
    36 per row count (embedded model on CPU, restart: sampler warm-up 24.5-27.5 -> 17.1-17.6 s, 56 -> 158
    cache entries, 16 -> 18 MB; docs/benchmarks.md)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: PagePool, buckets: Buckets, max_pages: int,
                 num_slots: int, context_len: int, attention_fn: Any, tp: TensorParallel | None = None,
                 channel: StepChannel | None = None, sampler: str = "auto", sampler_warmup: bool = True):
        self.cfg = model.cfg
        self.tp = tp  # None: one device; else the params and pool are sharded over tp.mesh
        # multi-host: rank 0 broadcasts every device call's inputs; the other ranks run follow()
        self.channel = channel
        self.graphdef, self.params = nnx.split(model)
        self.pool = pool
        self.buckets = buckets
        self.max_pages = max_pages
        self.context_len = context_len
        self.vocab = self.cfg.vocab_size
        self.mask_words = (self.vocab + 31) // 32
        self.attention_fn = attention_fn
        # whether the attention reads AttentionMetadata's shared prefix (else the step marks none)
        self.reads_shared_prefix: bool = getattr(attention_fn, "reads_shared_prefix", False)
        self.state = SamplerState.zeros(num_slots, self.vocab)
        if tp is not None:
            self.state = tp.replicate(self.state)
        self._state_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.state)
        self.split = sampler_mode(sampler) == "split"
        self._compiled: dict[tuple[Bucket, bool], Any] = {}  # the step (fused) or the forward (split)
        self._samplers: dict[tuple[int, SamplerPlan], Any] = {}  # split: (rows, plan) -> compiled sampler
        self._sampler_lock = threading.Lock()  # one compile at a time: serving and the warm-up thread
        self._warmup: threading.Thread | None = None
        self._stop_warmup = threading.Event()
        # split: after precompile(), a thread compiles every other plan (else, and until it gets there,
        # a plan compiles on first use)
        self.warm_all_plans = sampler_warmup
        self._init_slot = None
        self._free_masks: dict[tuple[int, ...], jax.Array] = {}
        self.num_compiles = 0

    # -- the traced functions -------------------------------------------------------------------
    def _step(self, params: nnx.State, kv: tuple[Any, ...], state: SamplerState, inp: StepInput,
              prompt_logprobs: bool) -> tuple[tuple[Any, ...], SamplerState, SampleOutput,
                                               PromptLogprobs | None]:
        """fused: forward and sampler in one executable."""
        kv, logits, extra = self._forward(params, kv, state.last, inp, prompt_logprobs)
        out, state = sample(logits, inp.sampling, state)
        return kv, state, out, extra

    def _forward(self, params: nnx.State, kv: tuple[Any, ...], last: jax.Array, inp: StepInput,
                 prompt_logprobs: bool) -> tuple[tuple[Any, ...], jax.Array, PromptLogprobs | None]:
        """The model over the batch: the updated pool, the logits [B, V] f32 each row samples from, and
        prompt logprobs. last [R]: SamplerState.last, the tokens the previous step left on the device."""
        input_ids = resolve_input_ids(inp.input_ids, inp.input_from_slot, last)  # [T]
        if self.tp is None:
            model = nnx.merge(self.graphdef, params)
            hidden, kv = model(input_ids, inp.positions, inp.slot_mapping, kv, inp.attn, self.attention_fn)
            logits_of = model.logits
        else:  # per shard inside shard_map; the logits come back whole on every device
            hidden, kv = self.tp.forward(self.graphdef, params, kv, input_ids, inp.positions, inp.slot_mapping,
                                         inp.attn, self.attention_fn)

            def logits_of(h: jax.Array) -> jax.Array:
                return self.tp.logits(self.graphdef, params, h)
        logits = logits_of(hidden[inp.logits_indices])  # [B, V]
        extra = None
        if prompt_logprobs:
            lp = jax.nn.log_softmax(logits_of(hidden), axis=-1)  # [T, V]
            target = jnp.maximum(inp.lp_targets, 0)
            top_lp, top_ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
            extra = PromptLogprobs(jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0], top_ids, top_lp)
        return kv, logits, extra

    @staticmethod
    def _sample(logits: jax.Array, md: SamplingMetadata, state: SamplerState,
                plan: SamplerPlan) -> tuple[SampleOutput, SamplerState]:
        """split: the sampler alone, compiled per plan."""
        return sample(logits, md, state, plan)

    # -- compilation ----------------------------------------------------------------------------
    def _example(self, bucket: Bucket) -> StepInput:
        from jaxradix.engine.batch import build_step

        return build_step([], bucket, self.pool.page_size, self.max_pages, self.mask_words)

    def lower(self, bucket: Bucket, prompt_logprobs: bool = False, **lower_kwargs: Any) -> Any:
        """The step (fused) or the forward (split) of a bucket, lowered (lower_kwargs: e.g. another
        platform's lowering_platforms, for inspection)."""
        example = self._put(self._example(bucket))
        if self.split:
            fn = jax.jit(self._forward, donate_argnums=(1,), static_argnums=(4,))
            return fn.trace(self.params, self.pool.kv, self.state.last, example, prompt_logprobs).lower(
                **lower_kwargs)
        fn = jax.jit(self._step, donate_argnums=(1, 2), static_argnums=(4,))
        return fn.trace(self.params, self.pool.kv, self.state, example, prompt_logprobs).lower(**lower_kwargs)

    def lower_sampler(self, rows: int, plan: SamplerPlan, **lower_kwargs: Any) -> Any:
        """split: the sampler of `rows` rows for `plan`, lowered from shapes only (the warm-up thread
        calls it while serving replaces the state)."""
        sharding = None if self.tp is None else self.tp.replicated

        def spec(x: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        logits = jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32, sharding=sharding)
        md = jax.tree.map(spec, self._example(Bucket(rows, rows)).sampling)
        state = jax.tree.map(spec, self._state_shapes)
        fn = jax.jit(self._sample, donate_argnums=(2,), static_argnums=(3,))
        return fn.trace(logits, md, state, plan).lower(**lower_kwargs)

    def _compile(self, bucket: Bucket, prompt_logprobs: bool) -> Any:
        compiled = self.lower(bucket, prompt_logprobs).compile()
        self.num_compiles += 1
        return compiled

    def _sampler(self, rows: int, plan: SamplerPlan, serving: bool = True) -> Any:
        fn = self._samplers.get((rows, plan))
        if fn is not None:
            return fn
        with self._sampler_lock:
            fn = self._samplers.get((rows, plan))
            if fn is None:
                if serving:
                    logger.info("compiling the sampler for %d rows, %s, while serving", rows, plan)
                fn = self._samplers[(rows, plan)] = self.lower_sampler(rows, plan).compile()
                self.num_compiles += 1
        return fn

    def _warm_plans(self, rows: list[int]) -> None:
        start = time.perf_counter()
        for plan in all_plans():
            for r in rows:
                if self._stop_warmup.is_set():
                    return
                self._sampler(r, plan, serving=False)
        logger.info("sampler plans compiled in the background in %.1f s", time.perf_counter() - start)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait for the background compile of the sampler plans; True when it is over (or never ran)."""
        if self._warmup is not None:
            self._warmup.join(timeout)
            return not self._warmup.is_alive()
        return True

    def stop_warmup(self) -> None:
        self._stop_warmup.set()
        self.wait_warm()

    def step_bytes(self, bucket: Bucket, prompt_logprobs: bool = False) -> int:
        """Device bytes (per device) one step of `bucket` needs beyond its inputs: XLA's temporaries plus
        the outputs that do not reuse a donated input, from the compiled step's memory_analysis()."""
        def extra(compiled: Any) -> int:
            ma = compiled.memory_analysis()
            if ma is None:
                return 0
            return int(ma.temp_size_in_bytes + max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0))

        total = extra(self._compile(bucket, prompt_logprobs))
        if self.split:  # the logits stay live while the sampler runs: count its own temporaries on top
            total += extra(self.lower_sampler(bucket.rows, SamplerPlan(*[True] * 6)).compile())
        return total

    def _put(self, tree: Any) -> Any:
        """Host arrays -> device (replicated over the mesh under TP)."""
        return jax.tree.map(jnp.asarray, tree) if self.tp is None else self.tp.replicate(tree)

    def _get(self, bucket: Bucket, prompt_logprobs: bool, serving: bool = True) -> Any:
        key = (bucket, prompt_logprobs)
        if key not in self._compiled:
            if serving:
                logger.info("compiling bucket %s (prompt logprobs: %s) while serving", bucket, prompt_logprobs)
            self._compiled[key] = self._compile(bucket, prompt_logprobs)
        return self._compiled[key]

    def precompile(self, progress: bool = True) -> float:
        start = time.perf_counter()
        buckets = self.buckets.all()
        for b in tqdm(buckets, desc="compiling buckets", disable=not progress):
            self._get(b, False, serving=False)
        if self.split:
            rows = sorted({b.rows for b in buckets})
            for r in rows:
                for plan in PRECOMPILED_PLANS:
                    self._sampler(r, plan, serving=False)
            if self.warm_all_plans:
                self._warmup = threading.Thread(target=self._warm_plans, args=(rows,), daemon=True,
                                                name="jaxradix-sampler-warmup")
                self._warmup.start()
        self._slot_fn()
        if self.channel is not None:  # every rank, in the same order: the broadcasts compile now too
            self.channel.warm([self._example(b) for b in buckets] + [self._slot_args(0, [], [], None)])
        return time.perf_counter() - start

    def _slot_fn(self) -> Any:
        if self._init_slot is None:
            C = self.context_len
            args = (self.state, *self._put((np.int32(0), np.zeros(C, np.int32), np.zeros(C, np.int32),
                                            np.zeros(MAX_LOGIT_BIAS, np.int32), np.zeros(MAX_LOGIT_BIAS, np.float32))))
            self._init_slot = jax.jit(init_slot, donate_argnums=(0,)).lower(*args).compile()
            self.num_compiles += 1
        return self._init_slot

    # -- serving --------------------------------------------------------------------------------
    def init_slot(self, slot: int, prompt_ids: list[int], output_ids: list[int],
                  logit_bias: dict[int, float] | None) -> None:
        args = self._slot_args(slot, prompt_ids, output_ids, logit_bias)
        if self.channel is not None:
            self.channel.send(Command(CMD_INIT_SLOT), args)
        self.state = self._slot_fn()(self.state, *args)

    def _slot_args(self, slot: int, prompt_ids: list[int], output_ids: list[int],
                   logit_bias: dict[int, float] | None) -> tuple[np.ndarray, ...]:
        C = self.context_len
        p = np.full(C, -1, np.int32)
        p[:len(prompt_ids)] = prompt_ids
        o = np.full(C, -1, np.int32)
        o[:len(output_ids)] = output_ids
        bi = np.full(MAX_LOGIT_BIAS, -1, np.int32)
        bv = np.zeros(MAX_LOGIT_BIAS, np.float32)
        if logit_bias:
            bi[:len(logit_bias)] = list(logit_bias.keys())
            bv[:len(logit_bias)] = list(logit_bias.values())
        return np.int32(slot), p, o, bi, bv

    def launch(self, inp: StepInput, bucket: Bucket, prompt_logprobs: bool = False) -> LaunchedStep:
        """Dispatch one step without waiting for it. The sampled tokens also stay on the device, where
        the next step reads them (StepInput.input_from_slot), so the host may read them a step late."""
        plan = SamplerPlan.of(inp.sampling) if self.split else SamplerPlan()
        if self.channel is not None:
            self.channel.send(Command(CMD_STEP, bucket.tokens, bucket.rows, prompt_logprobs, plan.bits()), inp)
        out, extra = self._run(bucket, prompt_logprobs, plan, self._resident(inp))
        return LaunchedStep(out, extra)

    def _run(self, bucket: Bucket, prompt_logprobs: bool, plan: SamplerPlan,
             inp: StepInput) -> tuple[SampleOutput, PromptLogprobs | None]:
        """Dispatch the step's executables (no wait): the pool and the sampler state are replaced."""
        fn = self._get(bucket, prompt_logprobs)
        if self.split:
            self.pool.kv, logits, extra = fn(self.params, self.pool.kv, self.state.last, inp)
            out, self.state = self._sampler(bucket.rows, plan)(logits, inp.sampling, self.state)
        else:
            self.pool.kv, self.state, out, extra = fn(self.params, self.pool.kv, self.state, inp)
        return out, extra

    def _resident(self, inp: StepInput) -> StepInput:
        """inp with its all-ones grammar mask (batch.free_grammar_mask) replaced by a device copy kept here."""
        mask = inp.sampling.grammar_mask
        if self.channel is not None:  # multi-host: placing an array is collective, and the followers send numpy
            return inp
        if not isinstance(mask, np.ndarray) or mask is not free_grammar_mask(*mask.shape):
            return inp
        dev = self._free_masks.get(mask.shape)
        if dev is None:
            dev = self._free_masks[mask.shape] = self._put(mask)
        return dataclasses.replace(inp, sampling=dataclasses.replace(inp.sampling, grammar_mask=dev))

    def step(self, inp: StepInput, bucket: Bucket, prompt_logprobs: bool = False) -> StepResult:
        """Launch a step and wait for its outputs."""
        return self.launch(inp, bucket, prompt_logprobs).result()

    def follow(self) -> None:
        """Ranks > 0 of a multi-host job: replay rank 0's device calls until it stops."""
        def template(cmd: Command) -> Any:
            if cmd.kind == CMD_STEP:
                return self._example(Bucket(cmd.tokens, cmd.rows))
            return self._slot_args(0, [], [], None)

        def execute(cmd: Command, payload: Any) -> None:
            if cmd.kind == CMD_STEP:
                self._run(Bucket(cmd.tokens, cmd.rows), cmd.prompt_logprobs, SamplerPlan.from_bits(cmd.plan),
                          payload)
            else:
                self.state = self._slot_fn()(self.state, *payload)

        self.channel.follow(template, execute)

    def reset_state(self) -> None:
        self.state = self._put(SamplerState.zeros(*self.state.counts.shape))

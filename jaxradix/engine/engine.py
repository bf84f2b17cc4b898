"""Engine: the Python API and the background loop that drives scheduler and runner.

All engine state is owned by the loop thread. Callers talk to it through a command queue
(submit, abort, flush, integrity check) and read results from per-request event queues, so the
API is safe to call from any thread or from asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxradix.cache.host_pool import HostPool, host_pages_for
from jaxradix.cache.page_pool import PagePool, has_memory_stats, kv_bytes_per_token, kv_dtype, pool_tokens
from jaxradix.cache.radix_cache import RadixCache
from jaxradix.config import EngineConfig
from jaxradix.engine.batch import Buckets, Row, build_step
from jaxradix.engine.memory import MemoryReport, bytes_by_dtype
from jaxradix.engine.model_runner import LaunchedStep, ModelRunner, StepResult, enable_compilation_cache
from jaxradix.engine.request import FinishReason, LogprobOptions, Request, SamplingParams
from jaxradix.engine.scheduler import Scheduler
from jaxradix.pallas_kernels.quantized_kv import SCALE_DTYPE
from jaxradix.parallel.multihost import RankLost

logger = logging.getLogger("jaxradix")


@dataclass
class _Handle:
    """The caller's side of one request."""

    req: Request
    events: queue.Queue = field(default_factory=queue.Queue)  # output dicts; the last has a finish_reason
    loop: asyncio.AbstractEventLoop | None = None  # async callers get events on their loop's queue
    aevents: asyncio.Queue | None = None
    stream: bool = False
    detok: Any = None
    text: str = ""
    sent_tokens: int = 0
    error: str | None = None

    def emit(self, out: dict) -> None:
        """Called on the engine thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.aevents.put_nowait, out)
        else:
            self.events.put(out)


@dataclass
class _Launched:
    """A step on the device whose results the host has not read yet."""

    rows: list[Row]
    step: LaunchedStep
    decode: bool  # decode rows only
    host_seconds: float  # host time spent on this step: scheduling, batch building, then reading results
    gap_seconds: float  # device idle time before it, as the host saw it (an upper bound)
    seen_running: float = 0.0  # the last time the host saw the device still running this step
    ended: bool = False

    def poll(self) -> None:
        if not self.ended:
            if self.step.done():
                self.ended = True
            else:
                self.seen_running = time.perf_counter()


GPU_MIN_DECODE_ROWS = 8  # on one H200 an 8B model's 8-row decode step took 4.90 ms, its 1-row step 7.49 ms


def decode_min_rows() -> int:
    """The smallest decode bucket: 8 rows on a GPU (padding rows cost nothing there; the 1-row matmuls
    are slower than 8-row ones), 1 elsewhere; JAXRADIX_MIN_DECODE_ROWS overrides it (benchmarks)."""
    import jax

    env = os.environ.get("JAXRADIX_MIN_DECODE_ROWS")
    if env:
        return max(int(env), 1)
    return GPU_MIN_DECODE_ROWS if jax.default_backend() in ("gpu", "cuda") else 1


def _allocate_pool(mc: Any, tokens: int, page_size: int, dtype: Any, tp: Any = None) -> PagePool:
    """The KV pool; a device out-of-memory becomes a MemoryError that names the flags to change."""
    try:
        return PagePool(mc, tokens, page_size, dtype, tp)
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        raise MemoryError(f"the KV pool of {tokens} tokens does not fit in device memory ({text.splitlines()[0]}): "
                          f"lower --max-total-tokens or --mem-fraction-static") from e


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any):
        self.config = cfg = EngineConfig.from_kwargs(model_path=model_path, **kwargs)
        logging.basicConfig(level=cfg.log_level.upper(), format="[%(asctime)s] %(message)s")
        enable_compilation_cache(cfg.compilation_cache_dir)
        from jaxradix.parallel import multihost

        multihost.init_distributed(cfg.nnodes, cfg.node_rank, cfg.dist_init_addr)  # before JAX touches a device
        import jax

        from jaxradix.models.loader import load_model
        from jaxradix.pallas_kernels import get_attention, probe

        if cfg.nnodes > 1 and cfg.tp_size != jax.device_count():
            raise ValueError(f"tp_size: with nnodes={cfg.nnodes} it must cover every device of the job "
                             f"({jax.device_count()}), got {cfg.tp_size}")
        # multi-host: rank 0 schedules and broadcasts each step; the other ranks follow
        self.channel = multihost.StepChannel() if cfg.nnodes > 1 else None
        self.is_leader = multihost.is_leader()
        self.failure: str | None = None  # why the engine stopped on its own (a lost rank)
        self.loaded = load_model(model_path, load_format=cfg.load_format, dtype=cfg.dtype, seed=cfg.random_seed,
                                 tp_size=cfg.tp_size, quantization=cfg.quantization)
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        dtype = kv_dtype(cfg.kv_cache_dtype, self.loaded.model.dtype)
        tp = self.loaded.tp
        attention_fn = get_attention(cfg.attention_backend)
        if cfg.attention_backend == "auto":
            heads, kv_heads = mc.num_heads, mc.num_kv_heads
            if tp is not None:
                heads, kv_heads = tp.layout.local_heads, tp.layout.local_kv_heads
            attention_fn = probe(attention_fn, heads=heads, kv_heads=kv_heads, head_dim=mc.head_dim,
                                 q_dtype=self.loaded.model.dtype, kv_dtype=dtype, page_size=cfg.page_size,
                                 sliding_window=mc.sliding_window)
        activation_bytes = self._activation_bytes(dtype, attention_fn)
        tokens = pool_tokens(mc, dtype, cfg.max_total_tokens, cfg.mem_fraction_static, tp, activation_bytes)
        self.pool = _allocate_pool(mc, tokens, cfg.page_size, dtype, tp)
        self.context_len = min(cfg.context_length or mc.max_position_embeddings, mc.max_position_embeddings,
                               self.pool.capacity * cfg.page_size)
        self.host_pool = None  # the hierarchical cache's host tier; nothing to keep without a radix cache
        if cfg.enable_hierarchical_cache and not cfg.disable_radix_cache:
            self.host_pool = HostPool(self.pool, host_pages_for(self.pool, cfg.hicache_size, cfg.hicache_ratio))
        self.tree = RadixCache(page_size=cfg.page_size, disable=cfg.disable_radix_cache,
                               free_slots=self.pool.free_slots, host=self.host_pool)
        chunk = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else self.context_len
        self.scheduler = Scheduler(
            self.pool, self.tree, num_slots=cfg.max_running_requests, context_len=self.context_len,
            chunk_size=chunk, policy=cfg.schedule_policy, new_token_ratio=cfg.new_token_ratio,
            min_new_token_ratio=cfg.min_new_token_ratio, host=self.host_pool)
        self.kv = self.scheduler.kv
        self.buckets = Buckets(cfg.max_running_requests, chunk + cfg.max_running_requests, min_rows=decode_min_rows())
        max_pages = -(-self.context_len // cfg.page_size)
        self.runner = ModelRunner(self.loaded.model, self.pool, self.buckets, max_pages,
                                  cfg.max_running_requests, self.context_len, attention_fn, tp, self.channel,
                                  cfg.sampler_mode, cfg.sampler_warmup)
        self.memory = self._memory_report(activation_bytes)
        logger.info(self.memory.log_line())
        self.stop_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            self.stop_token_ids |= set(self.tokenizer.stop_token_ids)
        self.grammar = None  # the grammar backend, made on the first constrained request
        self._grammar_lock = threading.Lock()
        self._rng = np.random.default_rng(cfg.random_seed)
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[str, _Handle] = {}
        self._live_rids: set[str] = set()  # rids submitted and not yet finished (any thread reads it)
        self._rids_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.overlap = not cfg.disable_overlap_schedule
        self._inflight: _Launched | None = None  # overlap: the step the device runs while the host plans
        self._last: _Launched | None = None  # the last step launched, for the gap between device steps
        self._exhausted: list[Request] = []  # out of KV while a token is on the device: finish once read
        # host_seconds: scheduling + batch building + reading results (not the dispatch call), per step;
        # gap_seconds: device idle time between consecutive steps as the host saw it (an upper bound)
        self.fault: str | None = None  # the last step failure
        self.fault_time = 0.0  # time.monotonic() of the last step failure
        self.broken: str | None = None  # why the engine cannot serve any more (set once)
        self.fault_count = 0
        self.on_fault: Callable[[str], None] | None = None  # called on the loop thread after a failure
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "requests": 0,
                      "steps": 0, "decode_steps": 0, "retractions": 0,
                      "prefill_tokens": 0, "max_running": 0, "overlapped_steps": 0,
                      "host_seconds": 0.0, "gap_seconds": 0.0,
                      "decode_host_seconds": 0.0, "decode_gap_seconds": 0.0}
        self._last_log = (time.perf_counter(), 0)
        self.compile_seconds = self.runner.precompile() if cfg.precompile else 0.0
        if self.host_pool is not None and cfg.precompile:
            t = time.perf_counter()
            self.host_pool.precompile()
            self.compile_seconds += time.perf_counter() - t
        logger.info("engine ready: %s, %d KV tokens, context %d, backend %s, tp %d", self.loaded.source,
                    self.pool.capacity * cfg.page_size, self.context_len, jax.default_backend(), cfg.tp_size)
        self._thread = threading.Thread(target=self._loop if self.is_leader else self._follow,
                                        name="jaxradix-engine", daemon=True)
        self._thread.start()

    def _activation_bytes(self, dtype: Any, attention_fn: Any) -> int:
        """Device bytes of the largest step (temporaries and outputs, from XLA's memory analysis of that step
        compiled on a one-page pool): the pool sizer's headroom. Measured on the prompt-logprobs variant, which
        also holds every token's logits, so either variant fits. 0 (not measured) on a device without memory
        stats (CPU) or when --max-total-tokens fixes the pool."""
        cfg, mc = self.config, self.model_config
        if cfg.max_total_tokens is not None or not has_memory_stats():
            return 0
        start = time.perf_counter()
        context = min(cfg.context_length or mc.max_position_embeddings, mc.max_position_embeddings)  # an upper bound
        chunk = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else context
        buckets = Buckets(cfg.max_running_requests, chunk + cfg.max_running_requests, min_rows=decode_min_rows())
        scratch = _allocate_pool(mc, cfg.page_size, cfg.page_size, dtype, self.loaded.tp)
        runner = ModelRunner(self.loaded.model, scratch, buckets, -(-context // cfg.page_size),
                             cfg.max_running_requests, context, attention_fn, self.loaded.tp,
                             sampler=cfg.sampler_mode, sampler_warmup=False)
        largest = max(buckets.all(), key=lambda b: (b.tokens, b.rows))
        n = runner.step_bytes(largest, prompt_logprobs=True)
        del runner, scratch
        logger.info("largest step %s needs %.3f GB of activations per device (measured in %.1f s)", largest,
                    n / 1e9, time.perf_counter() - start)
        return n

    def _memory_report(self, activation_bytes: int) -> MemoryReport:
        import jax

        weights = bytes_by_dtype(self.runner.params)
        tp = self.loaded.tp
        return MemoryReport(
            weights_bytes=sum(weights.values()), weights_dtypes=weights, kv_bytes=self.pool.nbytes,
            kv_cache_dtype=self.config.kv_cache_dtype, kv_dtype=str(self.pool.dtype),
            kv_scale_dtype=np.dtype(SCALE_DTYPE).name if self.pool.quantized else None,
            kv_tokens=self.pool.capacity * self.pool.page_size,
            kv_bytes_per_token=kv_bytes_per_token(self.model_config, self.pool.dtype),
            activation_bytes=activation_bytes, devices=1 if tp is None else tp.tp,
            device_kind=jax.local_devices()[0].device_kind)

    # == public API ================================================================================
    def generate(self, prompt: str | list[str] | None = None, sampling_params: SamplingParams | dict | list |
                 None = None, input_ids: list[int] | list[list[int]] | None = None, *, return_logprob: bool = False,
                 top_logprobs_num: int = 0, logprob_start_len: int = -1, stream: bool = False,
                 rid: str | list[str] | None = None, extra_key: str | None = None) -> Any:
        """One prompt -> a dict (a list of n dicts when n > 1); a list of prompts -> a flat list.
        stream=True (single prompt, n = 1) returns an iterator of cumulative output dicts."""
        handles, single = self._submit(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num,
                                       logprob_start_len, rid, extra_key, stream)
        if stream:
            if len(handles) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return self._stream(handles[0])
        outs = [self._wait(h) for h in handles]
        return outs[0] if single and len(outs) == 1 else outs

    async def async_generate(self, prompt: str | list[str] | None = None, sampling_params: Any = None,
                             input_ids: Any = None, *, stream: bool = False, **kwargs: Any) -> Any:
        """The asyncio form: awaits the result, or (stream=True) returns an async iterator."""
        handles, single = self._submit(prompt, sampling_params, input_ids, kwargs.pop("return_logprob", False),
                                       kwargs.pop("top_logprobs_num", 0), kwargs.pop("logprob_start_len", -1),
                                       kwargs.pop("rid", None), kwargs.pop("extra_key", None), stream,
                                       loop=asyncio.get_running_loop())
        if kwargs:
            raise TypeError(f"unknown arguments {sorted(kwargs)}")
        if stream:
            if len(handles) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return self._astream(handles[0])
        outs = [await self._await(h) for h in handles]
        return outs[0] if single and len(outs) == 1 else outs

    def abort(self, rid: str) -> None:
        if self._stopped:
            return
        self._command(lambda: self._abort(rid), wait=False)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are queued or running."""
        return self._command(self._flush)

    def cache_stats(self) -> dict[str, Any]:
        return self._command(self._cache_stats)

    def check_integrity(self) -> None:
        """Raise AssertionError when pages leak: free + evictable + locked + owned == pool pages."""
        self._command(self.scheduler.check_integrity)

    def wait_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not self._command(lambda: self._idle() and self._inbox.empty()):
            if time.monotonic() > end:
                raise TimeoutError("engine did not become idle")
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Stop the loop (on rank 0 of a multi-host job this stops every rank; other ranks stop with it)."""
        if not self.is_leader:
            return
        if not self._stopped:
            self._stopped = True
            self._inbox.put(None)
            self._thread.join(timeout=30)
        self.runner.stop_warmup()

    def join(self) -> None:
        """Block until the engine loop ends (ranks > 0: until rank 0 stops the job); raise if it failed."""
        self._thread.join()
        if self.failure:
            raise RuntimeError(self.failure)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass input_ids")
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    # == submission ================================================================================
    def _submit(self, prompt: Any, sampling_params: Any, input_ids: Any, return_logprob: bool,
                top_logprobs_num: int, logprob_start_len: int, rid: Any, extra_key: str | None,
                stream: bool, loop: asyncio.AbstractEventLoop | None = None) -> tuple[list[_Handle], bool]:
        self._check_serving()
        if not self.is_leader:
            raise RuntimeError(f"this is rank {self.config.node_rank} of a multi-host job: requests go to rank 0")
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt: must be a string or a list of strings")
            ids_list = [self.encode(p) if p else [] for p in prompts]
        else:
            single = not input_ids or not isinstance(input_ids[0], list | tuple)
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(ids_list)
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        if len(sps) != n:
            raise ValueError(f"sampling_params: {len(sps)} given for {n} prompts")
        rids = [rid] if isinstance(rid, str) else (rid or [None] * n)
        if len(rids) != n:
            raise ValueError(f"rid: {len(rids)} given for {n} prompts")
        reqs: list[Request] = []
        for ids, sp, r in zip(ids_list, sps, rids, strict=True):
            params = self._params(sp)
            self._validate_ids(ids)
            lp = LogprobOptions(return_logprob, top_logprobs_num, logprob_start_len)
            lp.validate(len(ids))
            base = r or uuid.uuid4().hex
            seed = params.seed if params.seed is not None else int(self._rng.integers(1 << 31))
            for i in range(params.n):
                child_rid = base if params.n == 1 else f"{base}-{i}"
                grammar = self._compile_grammar(params) if params.constraint else None
                reqs.append(Request(child_rid, list(ids), params, lp, extra_key, seed=seed + i, grammar=grammar))
        self._claim_rids([q.rid for q in reqs])
        try:
            handles = [self._make_handle(q, stream, loop) for q in reqs]
        except BaseException:
            for q in reqs:
                self._release_rid(q.rid)
            raise
        for h in handles:
            self._inbox.put(("add", h))
        self._wake.set()
        if not self._thread.is_alive():  # the loop died while we queued: nobody else will answer these
            self._fail_every_handle(self.broken or "engine shut down")
        return handles, single

    def _check_serving(self) -> None:
        if self._stopped:
            raise RuntimeError("engine is shut down")
        if self.broken is not None:
            raise RuntimeError(f"engine is out of service: {self.broken}")
        if not self._thread.is_alive():
            raise RuntimeError("engine loop is not running")

    def _claim_rids(self, rids: list[str]) -> None:
        """Reserve request ids until their requests finish: a second request with a running id would
        take over the first one's results (and leave it waiting forever)."""
        with self._rids_lock:
            seen: set[str] = set()
            for r in rids:
                if r in self._live_rids or r in seen:
                    raise ValueError(f"rid: a request with id {r!r} is already running")
                seen.add(r)
            self._live_rids |= seen

    def _release_rid(self, rid: str) -> None:
        with self._rids_lock:
            self._live_rids.discard(rid)

    def _params(self, sp: Any) -> SamplingParams:
        if sp is None:
            return SamplingParams()
        if isinstance(sp, SamplingParams):
            sp.validate(self.model_config.vocab_size)
            return sp
        if isinstance(sp, dict):
            try:
                p = SamplingParams(**sp)
            except TypeError as e:
                raise ValueError(f"sampling_params: {e}") from e
            p.validate(self.model_config.vocab_size)
            return p
        raise ValueError(f"sampling_params: must be a SamplingParams or a dict, got {type(sp).__name__}")

    def _validate_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        V = self.model_config.vocab_size
        if not all(isinstance(t, int | np.integer) and 0 <= t < V for t in ids):
            raise ValueError(f"input_ids: every token id must be an integer in [0, {V})")
        if len(ids) >= self.context_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the context length {self.context_len} "
                             f"(at least one token must be generated)")

    def _compile_grammar(self, params: SamplingParams) -> Any:
        if self.config.grammar_backend == "none" or self.tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer and grammar_backend='llguidance'")
        with self._grammar_lock:
            if self.grammar is None:
                from jaxradix.constrained import GrammarBackend

                self.grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        return self.grammar.matcher(*params.constraint)

    def _make_handle(self, req: Request, stream: bool, loop: asyncio.AbstractEventLoop | None) -> _Handle:
        h = _Handle(req, stream=stream, loop=loop, aevents=asyncio.Queue() if loop is not None else None)
        if self.tokenizer is not None:
            from jaxradix.tokenizer import IncrementalDetokenizer

            h.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids,
                                             skip_special_tokens=req.params.skip_special_tokens,
                                             stop=req.params.stop)
        return h

    def _wait(self, h: _Handle) -> dict:
        *_, last = self._stream(h)
        return last

    def _stream(self, h: _Handle) -> Iterator[dict]:
        try:
            while True:
                out = h.events.get()
                yield out
                if out["meta_info"]["finish_reason"] is not None:
                    return
        finally:
            if h.req.finish_reason is None:
                self.abort(h.req.rid)

    async def _astream(self, h: _Handle) -> AsyncIterator[dict]:
        try:
            while True:
                out = await h.aevents.get()
                yield out
                if out["meta_info"]["finish_reason"] is not None:
                    return
        finally:
            if h.req.finish_reason is None:
                self.abort(h.req.rid)

    async def _await(self, h: _Handle) -> dict:
        last: dict = {}
        async for last in self._astream(h):  # noqa: B007 - a cancelled caller aborts in _astream
            pass
        return last

    def _command(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("engine is shut down")
        if not self.is_leader:
            raise RuntimeError(f"this is rank {self.config.node_rank} of a multi-host job: rank 0 holds the state")
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        self._wake.set()
        if not wait:
            return None
        while True:  # never wait on a loop that has died
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if not self._thread.is_alive() and not fut.done():
                    raise RuntimeError(f"engine loop is not running: {self.broken or 'shut down'}") from None

    # == the loop ==================================================================================
    def _idle(self) -> bool:
        return self.scheduler.idle and self._inflight is None

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - the loop must never die silently with callers waiting
            logger.exception("engine loop died")
            self.broken = f"engine loop died: {type(e).__name__}: {e}"
            self._fail_every_handle(self.broken)
            if self.on_fault is not None:
                self.on_fault(self.broken)

    def _serve(self) -> None:
        while True:
            idle = self._idle()
            try:
                item = self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = ()
            while item != ():
                if item is None:
                    self._fail_every_handle("engine shut down")
                    if self.channel is not None:
                        self._stop_followers()
                    return
                self._handle_item(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = ()
            if self.host_pool is not None:
                self.host_pool.poll()  # write-backs the device has finished land in host memory
            if self._idle():
                continue
            try:
                self._step()
            except RankLost as e:  # the job is broken: fail everything and stop
                logger.error("engine stopped: %s", e)
                self.failure = str(e)
                self.broken = self.failure
                self._fail_every_handle(self.failure)
                self._stopped = True
                return
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, then recover or stop
                self._on_step_error(e)
                if self.broken is not None:
                    return

    def _on_step_error(self, e: Exception) -> None:
        """A step (scheduler, batch, jitted model, sampler) raised: every request in flight fails with
        the message, its memory is freed, and the engine serves on when its ledger is still sound."""
        logger.exception("engine step failed")
        self.fault = f"internal error in the engine step: {type(e).__name__}: {e}"
        self.fault_time = time.monotonic()
        self.fault_count += 1
        self._fail_all(self.fault)
        try:
            self.scheduler.check_integrity()
        except Exception as bad:  # noqa: BLE001 - a corrupt ledger: stop serving rather than serve garbage
            self.broken = f"{self.fault}; the KV ledger is inconsistent afterwards ({bad})"
            self._fail_every_handle(self.broken)
        if self.on_fault is not None:
            self.on_fault(self.broken or self.fault)

    def _fail_every_handle(self, why: str) -> None:
        """Fail the scheduler's requests, then any handle left (queued in the inbox, half admitted)."""
        with contextlib.suppress(Exception):
            self._fail_all(why)
        while True:  # requests still in the inbox never reached the scheduler
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item and item[0] == "add":
                self._handles[item[1].req.rid] = item[1]
            elif item and item[0] == "call":
                item[2].set_exception(RuntimeError(why))
        for h in list(self._handles.values()):
            h.error = h.error or why
            h.req.finish_reason, h.req.finish_detail = FinishReason.ABORT, why
            h.req.finish_time = time.perf_counter()
            self._release_rid(h.req.rid)
            h.emit(self._output(h))
        self._handles.clear()

    def _stop_followers(self) -> None:
        try:
            self.channel.stop()
        except RankLost as e:
            logger.warning("stopping the other ranks: %s", e)

    def _follow(self) -> None:
        """Ranks > 0: replay rank 0's steps until it stops the job or is lost."""
        try:
            self.runner.follow()
        except RankLost as e:
            logger.error("rank %d stopped: %s", self.config.node_rank, e)
            self.failure = str(e)
        self._stopped = True

    def _handle_item(self, item: tuple) -> None:
        if item[0] == "add":
            h = item[1]
            self._handles[h.req.rid] = h
            self.scheduler.add(h.req)
        else:
            _, fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _step(self) -> None:
        """One turn of the loop: launch the next step, then read the previous one.

        With overlap the host schedules and builds step N+1 while the device runs step N: rows whose
        input is the unread token N take it from the device (SamplerState.last), and the host reads
        step N's results after launching N+1, one step late. A request that step N finishes has one
        wasted row in step N+1, whose token is dropped. Constrained rows need token N for their mask,
        so a step with one waits for the previous step first.
        """
        prev = self._inflight
        if prev is not None and self._must_wait():
            self._inflight = None
            self._complete(prev)
            prev = None
        launched = self._launch(prev)
        self._inflight = None
        if prev is not None:
            self._complete(prev)
        if launched is None:
            self._last = None  # the device goes idle for lack of work: not a gap
        elif self.overlap:
            self._inflight = launched
        else:
            self._complete(launched)

    def _must_wait(self) -> bool:
        return any(r.grammar is not None and r.pending for r in self.scheduler.running)

    def _launch(self, prev: _Launched | None) -> _Launched | None:
        sched = self.scheduler
        t_host = time.perf_counter()
        res = sched.schedule()
        self.stats["retractions"] += len(res.retracted)
        for req in res.exhausted:
            if req.pending:
                self._exhausted.append(req)
            else:
                self._finish(req, FinishReason.LENGTH, "kv pool exhausted")
        rows = [r for r in res.rows if r.req.slot >= 0]
        if not rows:
            if sched.waiting and not sched.running and prev is None:
                raise RuntimeError("scheduler admitted nothing while idle")
            return None
        for row in rows:
            if row.new and row.req.params.needs_state:
                r = row.req
                self.runner.init_slot(r.slot, r.prompt_ids, r.output_ids, r.params.logit_bias)
        num_tokens = sum(r.n for r in rows)
        bucket = self.buckets.pick(len(rows), num_tokens)
        masks = None
        if any(r.req.grammar is not None for r in rows):
            masks = np.full((len(rows), self.runner.mask_words), 0xFFFFFFFF, np.uint32)
            for i, r in enumerate(rows):
                if r.req.grammar is not None and r.samples:
                    assert not r.req.pending, "a grammar mask needs every sampled token read"
                    r.req.grammar.fill_mask(masks[i])
        inp = build_step(rows, bucket, self.pool.page_size, self.runner.max_pages, self.runner.mask_words, masks,
                         share_prefix=self.runner.reads_shared_prefix)
        want_lp = any(r.prompt_logprobs for r in rows)
        sched.after_step(rows)
        for row in rows:
            if row.samples:
                row.req.pending += 1
        gap = 0.0
        if self._last is not None:
            self._last.poll()
            if self._last.ended:
                gap = time.perf_counter() - self._last.seen_running
        host = time.perf_counter() - t_host  # the dispatch may run the step itself (CPU): not host time
        step = self.runner.launch(inp, bucket, want_lp)
        decode = not (res.new_seqs or res.new_tokens)
        self._last = launched = _Launched(rows, step, decode, host, gap, seen_running=time.perf_counter())
        self.stats["steps"] += 1
        self.stats["overlapped_steps"] += prev is not None  # launched before the previous step was read
        self.stats["prefill_tokens"] += res.new_tokens
        self.stats["max_running"] = max(self.stats["max_running"], len(sched.running))
        if not decode:
            self._log_prefill(res)
        else:
            self.stats["decode_steps"] += 1
            if self.stats["decode_steps"] % self.config.decode_log_interval == 0:
                self._log_decode()
        return launched

    def _complete(self, launched: _Launched) -> None:
        """Wait for a launched step, then append its tokens and check stops (the host's part of it)."""
        launched.poll()
        result = launched.step.result()
        t_ready = time.perf_counter()
        if not launched.ended:  # we waited for it: it ended just now
            launched.ended, launched.seen_running = True, t_ready
        self._process(launched.rows, result)
        for req in self._exhausted:
            self._finish(req, FinishReason.LENGTH, "kv pool exhausted")
        self._exhausted.clear()
        host = launched.host_seconds + time.perf_counter() - t_ready
        self.stats["host_seconds"] += host
        self.stats["gap_seconds"] += launched.gap_seconds
        if launched.decode:
            self.stats["decode_host_seconds"] += host
            self.stats["decode_gap_seconds"] += launched.gap_seconds

    def _process(self, rows: list[Row], result: StepResult) -> None:
        t = 0
        for b, row in enumerate(rows):
            req = row.req
            h = self._handles.get(req.rid)
            if row.prompt_logprobs and result.prompt is not None:
                self._record_prompt_logprobs(req, row, result, t)
            t += row.n
            if row.samples:
                req.pending -= 1
            if not row.samples or req.finished or h is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            if req.params.max_new_tokens == 0:
                self._finish(req, FinishReason.LENGTH)
                continue
            tok = int(result.tokens[b])
            req.output_ids.append(tok)
            self.stats["generated_tokens"] += 1
            if req.logprobs.return_logprob:
                req.output_logprobs.append(float(result.logprobs[b]))
                k = req.logprobs.top_logprobs_num
                if k:
                    req.output_top_logprobs.append(
                        [(int(i), float(v)) for i, v in zip(result.top_ids[b, :k], result.top_logprobs[b, :k],
                                                            strict=True)])
            reason, detail = self._check_stop(req, h, tok)
            if reason is not None:
                self._finish(req, reason, detail)
            elif h.stream and len(req.output_ids) % self.config.stream_interval == 0:
                h.emit(self._output(h))

    def _record_prompt_logprobs(self, req: Request, row: Any, result: StepResult, t: int) -> None:
        p = result.prompt
        start = req.logprobs.logprob_start_len
        if not req.prompt_logprobs:
            req.prompt_logprobs = [None] * len(req.prompt_ids)
            req.prompt_top_logprobs = [None] * len(req.prompt_ids)
        k = req.logprobs.top_logprobs_num
        for j in range(row.n):
            pos = row.start + j + 1  # the prompt token whose logprob this position predicts
            if start <= pos < len(req.prompt_ids):
                req.prompt_logprobs[pos] = float(p.logprobs[t + j])
                if k:
                    req.prompt_top_logprobs[pos] = [(int(i), float(v)) for i, v in
                                                    zip(p.top_ids[t + j, :k], p.top_logprobs[t + j, :k],
                                                        strict=True)]

    def _check_stop(self, req: Request, h: _Handle, tok: int) -> tuple[FinishReason | None, Any]:
        p = req.params
        if h.detok is not None:
            h.text += h.detok.add(tok)
            if h.detok.stopped:
                return FinishReason.STOP, h.detok.stop_reason
        if req.grammar is not None:
            req.grammar.consume(tok)
            if req.grammar.error is not None:  # the grammar engine gave up: an error, never a normal stop
                h.error = f"constrained decoding failed: {req.grammar.error.strip().splitlines()[0]}"
                return FinishReason.ABORT, h.error
            if req.grammar.is_terminated():
                return FinishReason.STOP, None
        if not p.ignore_eos and tok in self.stop_token_ids:
            return FinishReason.STOP, tok
        if p.stop_token_ids and tok in p.stop_token_ids:
            return FinishReason.STOP, tok
        if len(req.output_ids) >= p.max_new_tokens:
            return FinishReason.LENGTH, None
        if req.seq_len >= self.context_len:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, req: Request, reason: FinishReason, detail: Any = None) -> None:
        if req.finished:
            return
        req.finish_reason, req.finish_detail = reason, detail
        req.finish_time = time.perf_counter()
        if req.slot >= 0:
            self.scheduler.release(req)
        elif req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        self.stats["cached_tokens"] += req.cached_tokens
        self._release_rid(req.rid)
        h = self._handles.pop(req.rid, None)
        if h is not None:
            if h.detok is not None and reason != FinishReason.ABORT and not h.detok.stopped:
                h.text += h.detok.flush()
            h.emit(self._output(h))

    def _abort(self, rid: str) -> None:
        req = self.scheduler.abort(rid)
        if req is not None:
            req.slot = -1  # already released by the scheduler
            self._finish(req, FinishReason.ABORT)

    def _fail_all(self, why: str) -> None:
        self._inflight = self._last = None  # its results belong to the requests failed here
        self._exhausted.clear()
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            h = self._handles.get(req.rid)
            if h is not None:
                h.error = why
            self._finish(req, FinishReason.ABORT, why)

    def _output(self, h: _Handle) -> dict:
        req = h.req
        fin = req.finish_reason
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "finish_reason": None if fin is None else {"type": str(fin), "matched": req.finish_detail},
            "e2e_latency": (req.finish_time or time.perf_counter()) - req.arrival,
        }
        if req.first_token_time is not None:
            meta["ttft"] = req.first_token_time - req.arrival
        if h.error:
            meta["error"] = h.error
        if req.logprobs.return_logprob:
            meta["output_token_logprobs"] = list(zip(req.output_logprobs, req.output_ids, strict=False))
            if req.logprobs.top_logprobs_num:
                meta["output_top_logprobs"] = list(req.output_top_logprobs)
            if req.logprobs.logprob_start_len >= 0:
                s = req.logprobs.logprob_start_len
                meta["input_token_logprobs"] = list(zip(req.prompt_logprobs[s:], req.prompt_ids[s:], strict=False))
                if req.logprobs.top_logprobs_num:
                    meta["input_top_logprobs"] = list(req.prompt_top_logprobs[s:])
        return {"text": h.text, "output_ids": list(req.output_ids), "meta_info": meta}

    # == commands run on the loop thread ==========================================================
    def _flush(self) -> bool:
        if not self._idle():
            return False
        self.kv.reset()
        self.stats.update(prompt_tokens=0, cached_tokens=0)
        return True

    def _cache_stats(self) -> dict[str, Any]:
        st = self.tree.stats()
        prompt = self.stats["prompt_tokens"]
        rate = self.stats["cached_tokens"] / prompt if prompt else 0.0
        out: dict[str, Any] = {
            "hit_rate": rate, "cached_tokens": self.stats["cached_tokens"], "prompt_tokens": prompt,
            "shared_prefixes": st.shared_prefixes, "unique_tokens": st.total_tokens,
            "summary": f"KV Cache Hit Rate: {100 * rate:.1f}% (Shared Prefixes: {st.shared_prefixes}, "
                       f"Unique Tokens: {st.total_tokens})",
            "device_hit_tokens": self.kv.hits.device_hit_tokens, "host_hit_tokens": self.kv.hits.host_hit_tokens,
        }
        if self.host_pool is not None:
            hs, S = self.host_pool.stats, self.pool.page_size
            page_bytes = self.host_pool.data.nbytes / self.host_pool.num_pages
            out |= {
                "host_tokens": st.host_tokens, "host_capacity_tokens": self.host_pool.capacity * S,
                "host_loaded_tokens": hs.loaded_pages * S, "host_saved_tokens": hs.saved_pages * S,
                "host_load_seconds": hs.load_seconds, "host_save_seconds": hs.save_seconds,
                "host_load_gbps": hs.loaded_pages * page_bytes / hs.load_seconds / 1e9 if hs.load_seconds else 0.0,
                "host_save_gbps": hs.saved_pages * page_bytes / hs.save_seconds / 1e9 if hs.save_seconds else 0.0,
            }
            out["summary"] += (f", device hits {out['device_hit_tokens']} tokens, host hits "
                               f"{out['host_hit_tokens']} tokens")
        return out

    def _usage(self) -> float:
        return self.kv.usage()

    def _log_prefill(self, res: Any) -> None:
        host = ""
        if self.host_pool is not None:
            host = f", #host-hit-token: {res.host_tokens}, host usage: " \
                   f"{1 - self.host_pool.num_free / self.host_pool.capacity:.2f}"
        logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                    "#running-req: %d, #queue-req: %d%s", res.new_seqs, res.new_tokens, res.cached_tokens,
                    self._usage(), len(self.scheduler.running), len(self.scheduler.waiting), host)

    def _log_decode(self) -> None:
        now, gen = time.perf_counter(), self.stats["generated_tokens"]
        t0, g0 = self._last_log
        self._last_log = (now, gen)
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                    "%.2f, #queue-req: %d", len(self.scheduler.running),
                    sum(r.kv_len for r in self.scheduler.running), self._usage(),
                    (gen - g0) / max(now - t0, 1e-9), len(self.scheduler.waiting))

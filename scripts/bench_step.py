"""The model step against the hardware: decode at the memory roofline, host time, offline throughput.

    python scripts/bench_step.py --quick                                   # CPU, the embedded model
    python scripts/bench_step.py --model-path scripts/configs/llama-3.1-8b --load-format dummy   # a GPU

Prints one table (markdown):
  roofline     device copy bandwidth (a jnp.copy of --copy-mib MiB) and the bytes one decode step must
               read (every weight but the embedding table, plus the live KV): the floor of a step.
  decode B     for B in --batches: the device time of one decode step at context --decode-context
               (the compiled step timed back to back, no host work in between) and the engine's wall
               time per decode step (B requests decoding together, the difference of two runs that
               differ only in output length, so prefill and start-up cancel); their difference bounds
               the exposed gap: host work (scheduling, batch building, result copy) the device waited
               for. Host ms and the engine-measured gap are the engine's own per-decode-step stats
               (decode_host_seconds, decode_gap_seconds; the gap is an upper bound seen from the host).
  offline      output tokens/s on SGLang's random workload (bench_serving --dataset-name random:
               --sglang-prompts prompts, input uniform in [1, 4096], output uniform in [1, 2048]) and
               on the 512/256 workload (--short-prompts requests x 512 prompt tokens, 256 output, at
               most 64 running; --quick: 8), greedy, ignore_eos, random token ids.
  compile      start-up compile of every bucket (cold unless the compilation cache already holds them).

Dummy weights need only a config.json (scripts/configs/ holds Llama-3.1-8B and Qwen3-8B shapes); no
tokenizer is read, prompts are random token ids. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix import Engine, SamplingParams
from jaxradix.cache.page_pool import kv_bytes_per_token
from jaxradix.engine.batch import Bucket, StepInput
from jaxradix.engine.sampler import SamplerPlan

SGLANG_INPUT, SGLANG_OUTPUT = 4096, 2048  # SGLang's CI random workload (Llama-3.1-8B, H100)
SHORT_INPUT, SHORT_OUTPUT = 512, 256


@dataclasses.dataclass
class Options:
    batches: list[int]
    decode_context: int
    steps: tuple[int, int]  # output lengths of the two decode runs whose difference is timed
    sglang_prompts: int
    sglang_scale: float  # input/output maxima as a share of SGLang's 4096/2048 (quick mode)
    short_prompts: int
    short_scale: float
    short_running: int  # most requests running at once in the 512/256 workload
    copy_mib: int


QUICK = Options(batches=[1, 8], decode_context=64, steps=(4, 12), sglang_prompts=16, sglang_scale=1 / 32,
                short_prompts=16, short_scale=1 / 8, short_running=8, copy_mib=64)
FULL = Options(batches=[1, 8, 32, 64, 128], decode_context=512, steps=(16, 80), sglang_prompts=500,
               sglang_scale=1.0, short_prompts=256, short_scale=1.0, short_running=64, copy_mib=1024)


def copy_bandwidth(mib: int) -> float:
    """Device copy bandwidth in bytes/s (each byte read once and written once), best of 5."""
    x = jnp.ones((mib << 18,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)  # an undonated input: XLA writes a new buffer
    jax.block_until_ready(copy(x))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(copy(x))
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best


def step_bytes(engine: Engine, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (only B rows of it
    are gathered; a tied table is read whole as the LM head), plus each row's live K/V."""
    flat = engine.loaded.model.flat_params()
    weights = sum(a.nbytes for name, a in flat.items() if name != "embed" or engine.model_config.tie_word_embeddings)
    mc = engine.model_config
    kv = batch * context * kv_bytes_per_token(mc, engine.pool.dtype)  # real bytes: a quantized pool's scales too
    return weights + kv


def decode_input(engine: Engine, batch: int, context: int) -> tuple[Bucket, StepInput]:
    """A decode step of `batch` rows, each at position context - 1 of its own pages (pages 1.. of
    the pool, free while the engine is idle: their contents are garbage, never read back), padded to
    the bucket the engine picks for it (on a GPU at least 8 rows: engine.decode_min_rows)."""
    runner, S = engine.runner, engine.pool.page_size
    pages_per_row = -(-context // S)
    if 1 + batch * pages_per_row > engine.pool.num_pages:
        raise ValueError(f"decode timing at B={batch}, context {context} needs {batch * pages_per_row} pages; "
                         f"the pool has {engine.pool.capacity} (raise --max-total-tokens)")
    bucket = engine.buckets.pick(batch, batch)
    B = bucket.rows
    example = runner._example(bucket)
    page_table = np.zeros((B, runner.max_pages), np.int32)
    page_table[:batch, :pages_per_row] = 1 + np.arange(batch * pages_per_row, dtype=np.int32).reshape(batch, -1)
    pos = np.zeros(B, np.int32)
    pos[:batch] = context - 1
    kv_lens = np.zeros(B, np.int32)
    kv_lens[:batch] = context
    slots = np.zeros(B, np.int32)  # padding tokens write page 0
    slots[:batch] = page_table[:batch, (context - 1) // S] * S + (context - 1) % S
    rng = np.random.default_rng(0)
    return bucket, dataclasses.replace(
        example,
        input_ids=rng.integers(0, engine.model_config.vocab_size, B).astype(np.int32),
        positions=pos,
        slot_mapping=slots,
        attn=dataclasses.replace(example.attn, cu_q_lens=np.minimum(np.arange(B + 1, dtype=np.int32), batch),
                                 kv_lens=kv_lens, page_table=page_table, num_seqs=np.array([batch], np.int32)),
        logits_indices=np.minimum(np.arange(B, dtype=np.int32), batch - 1),
    )


def device_step_seconds(engine: Engine, batch: int, context: int, iters: int = 20) -> float:
    """Median over 3 loops of `iters` back-to-back compiled decode steps (no host work between)."""
    engine.wait_idle(timeout=600)
    runner = engine.runner
    bucket, inp = decode_input(engine, batch, context)
    plan = SamplerPlan.of(inp.sampling)  # greedy; with the split sampler its own executable runs too
    runner._get(bucket, False, serving=False)
    inp = jax.device_put(inp)
    out = None

    def run(n: int) -> None:
        nonlocal out
        for _ in range(n):
            out, _ = runner._run(bucket, False, plan, inp)
        jax.block_until_ready(out)

    run(2)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        run(iters)
        samples.append((time.perf_counter() - start) / iters)
    return float(np.median(samples))


def random_ids(rng: np.random.Generator, engine: Engine, n: int) -> list[int]:
    return rng.integers(100, engine.model_config.vocab_size - 1, n).tolist()


def generate_all(engine: Engine, prompts: list[list[int]], outs: list[int], concurrency: int | None) -> float:
    """Wall seconds to finish every request (greedy, ignore_eos); at most `concurrency` in flight."""
    engine.flush_cache()
    params = [SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True) for o in outs]
    start = time.perf_counter()
    if concurrency is None:
        results = engine.generate(input_ids=prompts, sampling_params=params)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda a: engine.generate(input_ids=a[0], sampling_params=a[1]),
                                    zip(prompts, params, strict=True)))
    wall = time.perf_counter() - start
    got = sum(len(r["output_ids"]) for r in results)
    assert got == sum(outs), f"generated {got} tokens, asked for {sum(outs)}"
    engine.check_integrity()
    return wall


@dataclasses.dataclass
class EngineStep:
    wall_s: float  # wall seconds per decode step, the difference of two runs
    host_s: float  # the engine's host seconds per decode step (scheduling, batch building, reading)
    gap_s: float | None  # the engine's own measure of device idle time per decode step, if it keeps one


def engine_step(engine: Engine, batch: int, context: int, steps: tuple[int, int]) -> EngineStep:
    """`batch` requests decoding together: per-step wall time, and the engine's host and gap stats."""
    rng = np.random.default_rng(batch)
    generate_all(engine, [random_ids(rng, engine, context - steps[1]) for _ in range(batch)], [steps[0]] * batch,
                 None)  # warm-up: first-use costs stay out of the timed pair
    walls = []
    for n in steps:
        prompts = [random_ids(rng, engine, context - steps[1]) for _ in range(batch)]
        st = engine.stats
        before = (st["decode_host_seconds"], st.get("decode_gap_seconds", 0.0), st["decode_steps"])
        walls.append(generate_all(engine, prompts, [n] * batch, None))
        n_steps = max(st["decode_steps"] - before[2], 1)
        host = (st["decode_host_seconds"] - before[0]) / n_steps
        gap = (st["decode_gap_seconds"] - before[1]) / n_steps if "decode_gap_seconds" in st else None
    return EngineStep((walls[1] - walls[0]) / (steps[1] - steps[0]), host, gap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M GGUF")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="weights: none, int8, fp8, gguf")
    ap.add_argument("--quick", action="store_true", help="tiny workloads (CPU)")
    ap.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,8,32,64,128")
    ap.add_argument("--sglang-prompts", type=int, default=None, help="prompts of SGLang's random workload (500)")
    ap.add_argument("--short-prompts", type=int, default=None, help="requests of the 512/256 workload (256)")
    ap.add_argument("--max-total-tokens", type=int, default=None, help="KV pool (default: free memory; CPU 8192)")
    ap.add_argument("--chunked-prefill-size", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the KV pool's dtype, as the server flag")
    ap.add_argument("--compilation-cache-dir", default=None,
                    help="default: a fresh temporary directory, so the compile time is cold")
    ap.add_argument("--sampler-mode", default="auto", help="auto, fused or split (EngineConfig.sampler_mode)")
    ap.add_argument("--trace", default=None, help="write a jax.profiler trace of a short decode run here")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    opt = dataclasses.replace(QUICK if args.quick else FULL)
    if args.batches:
        opt.batches = [int(b) for b in args.batches.split(",")]
    opt.sglang_prompts = args.sglang_prompts if args.sglang_prompts is not None else opt.sglang_prompts
    opt.short_prompts = args.short_prompts if args.short_prompts is not None else opt.short_prompts
    sg_in, sg_out = int(SGLANG_INPUT * opt.sglang_scale), int(SGLANG_OUTPUT * opt.sglang_scale)
    sh_in, sh_out = int(SHORT_INPUT * opt.short_scale), int(SHORT_OUTPUT * opt.short_scale)
    max_running = max(max(opt.batches), opt.short_running)
    cpu = jax.default_backend() == "cpu"
    cache = args.compilation_cache_dir or tempfile.mkdtemp(prefix="jaxradix-bench-step-")
    kw = dict(load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
              max_running_requests=max_running,
              context_length=max(sg_in + sg_out, opt.decode_context) + 16, attention_backend=args.attention_backend,
              max_total_tokens=args.max_total_tokens or (8192 if cpu else None), compilation_cache_dir=cache,
              kv_cache_dtype=args.kv_cache_dtype, sampler_mode=args.sampler_mode,
              sampler_warmup=False,  # greedy only: the start-up plans serve every step here
              log_level="warning")
    if args.chunked_prefill_size:
        kw["chunked_prefill_size"] = args.chunked_prefill_size
    engine = Engine(args.model_path, **kw)
    mc, dev = engine.model_config, jax.devices()[0]
    nparams = sum(int(np.prod(a.shape)) for a in engine.loaded.model.flat_params().values())
    print(f"# jaxradix step benchmark: {engine.loaded.source} ({mc.model_type}, {nparams / 1e9:.2f} B params, "
          f"weights {engine.loaded.model.dtype} ({engine.loaded.quantization}), KV {engine.pool.dtype}) "
          f"on {jax.default_backend()} "
          f"({dev.device_kind}; {platform.processor() or platform.machine()}), jax {jax.__version__}, "
          f"{engine.pool.capacity * engine.pool.page_size} KV tokens, max running {max_running}, "
          f"sampler {'split' if engine.runner.split else 'fused'}", flush=True)
    print(f"# {engine.memory.log_line()}", flush=True)
    rows: list[tuple[str, str, str]] = []
    figures: dict = {}

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"| {what} | {value} | {note} |", flush=True)

    print("\n| what | measured | note |\n|---|---|---|")
    n_buckets = len(engine.buckets.all())
    row("compile at start-up", f"{engine.compile_seconds:.1f} s", f"{n_buckets} buckets, cache {cache}")
    figures["compile_s"] = engine.compile_seconds
    bw = copy_bandwidth(opt.copy_mib)
    figures["copy_GBps"] = bw / 1e9
    row("device copy bandwidth", f"{bw / 1e9:.1f} GB/s", f"jnp copy of {opt.copy_mib} MiB, read + write")

    for b in opt.batches:
        ctx = opt.decode_context
        dev_s = device_step_seconds(engine, b, ctx)
        es = engine_step(engine, b, ctx, opt.steps)
        floor = step_bytes(engine, b, ctx) / bw
        figures[f"decode_B{b}"] = {"device_ms": dev_s * 1e3, "engine_ms": es.wall_s * 1e3,
                                   "host_ms": es.host_s * 1e3, "roofline_ms": floor * 1e3,
                                   "exposed_ms": (es.wall_s - dev_s) * 1e3,
                                   "engine_gap_ms": None if es.gap_s is None else es.gap_s * 1e3}
        gap = "" if es.gap_s is None else f", engine-measured gap {es.gap_s * 1e3:.3f} ms"
        row(f"decode step, {b} running, context {ctx}",
            f"device {dev_s * 1e3:.2f} ms, engine {es.wall_s * 1e3:.2f} ms/step",
            f"roofline {floor * 1e3:.2f} ms (device {dev_s / floor:.2f}x); host {es.host_s * 1e3:.2f} ms/step; "
            f"engine - device {(es.wall_s - dev_s) * 1e3:.2f} ms{gap}; {b / es.wall_s:.0f} tok/s")

    if args.trace:  # a short decode run of the largest batch: the device timeline and its idle gaps
        import trace_gaps

        b = opt.batches[-1]
        trace_rng = np.random.default_rng(1)
        prompts = [random_ids(trace_rng, engine, opt.decode_context - 16) for _ in range(b)]
        steps0 = engine.stats["steps"]
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            generate_all(engine, prompts, [16] * b, None)
        steps = engine.stats["steps"] - steps0
        print(f"# profiler trace of {b} requests x 16 tokens ({steps} steps): {args.trace}", flush=True)
        tl = trace_gaps.device_timeline(trace_gaps.load_events(trace_gaps.find_trace(args.trace)))
        for line in (["no device timeline (CPU)"] if tl is None else trace_gaps.summary(tl, steps=steps)):
            print(f"# {line}", flush=True)
        if tl is not None:
            figures["trace"] = {"idle_per_step_ms": tl.idle_us / max(steps, 1) / 1e3,
                                "busy_share": tl.busy_us / max(tl.window_us, 1e-9)}

    rng = np.random.default_rng(0)
    if opt.sglang_prompts:
        ins = rng.integers(1, sg_in + 1, opt.sglang_prompts)
        outs = rng.integers(1, sg_out + 1, opt.sglang_prompts).tolist()
        wall = generate_all(engine, [random_ids(rng, engine, int(n)) for n in ins], outs, None)
        figures["sglang_random"] = {"output_tok_s": sum(outs) / wall, "wall_s": wall}
        row(f"offline, SGLang random: {opt.sglang_prompts} prompts, in <= {sg_in}, out <= {sg_out}",
            f"{sum(outs) / wall:.0f} output tok/s",
            f"{wall:.1f} s, {(sum(outs) + int(ins.sum())) / wall:.0f} total tok/s, up to {max_running} running")
    if opt.short_prompts:
        prompts = [random_ids(rng, engine, sh_in) for _ in range(opt.short_prompts)]
        wall = generate_all(engine, prompts, [sh_out] * opt.short_prompts, opt.short_running)
        tok = sh_out * opt.short_prompts
        figures["short"] = {"output_tok_s": tok / wall, "wall_s": wall}
        row(f"offline: {opt.short_prompts} x ({sh_in} in, {sh_out} out), {opt.short_running} running",
            f"{tok / wall:.0f} output tok/s", f"{wall:.1f} s")
    engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

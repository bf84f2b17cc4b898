"""Constrained decoding benchmark: what a JSON schema costs next to free decoding.

    python scripts/bench_constrained.py                      # embedded SmolLM2-135M, batch 32
    python scripts/bench_constrained.py --model-path DIR --batch 64 --max-new-tokens 256
    python scripts/bench_constrained.py --skip-engine        # host-side numbers only (no model run)

Reports, with what it ran on:
  1. compile time per schema (validation on the submitting thread, then the pool's build + first mask);
  2. engine decode throughput at the batch size with a JSON schema vs unconstrained on the same
     prompts and token counts, the step time at full batch and the share spent in fill_mask;
  3. mask time per decode step over the batch (mean / p50 / p99), replaying the model's JSON
     outputs: row by row as the engine does it, and in parallel with GrammarBackend.fill_masks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from jaxradix.constrained import GrammarBackend, GrammarMatcher

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "format": "email", "maxLength": 40}}}
SCHEMAS: dict[str, dict] = {
    "person": PERSON,
    "people[2]": {"type": "array", "items": PERSON, "minItems": 2, "maxItems": 2},
    "order": {"type": "object", "required": ["id", "date", "items", "status"], "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "date": {"type": "string", "format": "date"},
        "items": {"type": "array", "minItems": 1, "maxItems": 10, "items": {
            "type": "object", "required": ["sku", "qty", "price"], "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number", "minimum": 0}}}},
        "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
        "note": {"type": ["string", "null"]}}},
    "refs+anyOf": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                         "y": {"type": "number"}},
                                       "required": ["x", "y"]}},
                   "type": "object", "required": ["shape"], "properties": {"shape": {"anyOf": [
                       {"type": "object", "properties": {"kind": {"const": "circle"},
                                                         "center": {"$ref": "#/$defs/point"},
                                                         "r": {"type": "number"}}},
                       {"type": "object", "properties": {"kind": {"const": "polygon"},
                                                         "points": {"type": "array",
                                                                    "items": {"$ref": "#/$defs/point"}}}}]}}},
}


def ran_on() -> str:
    import jax
    import llguidance

    dev = jax.devices()[0]
    return (f"{platform.node()} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | "
            f"jax {jax.__version__} backend={jax.default_backend()} device={dev.device_kind} | "
            f"llguidance {llguidance.__version__}")


def stats_ms(xs: list[float]) -> str:
    a = np.asarray(xs) * 1e3
    return f"mean {a.mean():8.3f} ms  p50 {np.percentile(a, 50):8.3f}  p99 {np.percentile(a, 99):8.3f}"


def bench_compile(tokenizer: Any, vocab: int) -> None:
    print("\n== compile time per schema (a fresh backend: no cache hits)")
    t = time.perf_counter()
    backend = GrammarBackend(tokenizer, vocab)
    print(f"   backend (llguidance tokenizer) {1e3 * (time.perf_counter() - t):8.1f} ms")
    print(f"   {'schema':<14}{'validate':>12}{'build+mask0':>14}{'cache hit':>12}")
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        c = backend.compile("json_schema", schema)
        t1 = time.perf_counter()
        c.future.result()
        t2 = time.perf_counter()
        backend.matcher("json_schema", schema)
        t3 = time.perf_counter()
        print(f"   {name:<14}{1e3 * (t1 - t0):10.2f}ms{1e3 * (t2 - t1):12.2f}ms{1e6 * (t3 - t2):10.1f}us")
    backend.close()


def random_walks(backend: GrammarBackend, schema: dict, batch: int, steps: int,
                 seed: int = 0) -> list[list[int]]:
    """Token sequences through the schema, each token drawn uniformly from the allowed ones (for
    --skip-engine; the model's own outputs make slower, more realistic masks: long strings)."""
    rng = np.random.default_rng(seed)
    row = np.zeros(backend.mask_words, np.uint32)
    seqs = []
    for _ in range(batch):
        m, seq = backend.matcher("json_schema", schema), []
        while not m.is_terminated() and len(seq) < steps:
            m.fill_mask(row)
            seq.append(int(rng.choice(np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0])))
            m.consume(seq[-1])
        seqs.append(seq)
    return seqs


def bench_masks(tokenizer: Any, vocab: int, schema: dict, seqs: list[list[int]], source: str) -> None:
    """Replays token sequences in lockstep, a batch row each: per step, fill every live row's mask
    row by row (what the engine's step does) or with fill_masks (llguidance's thread pool)."""
    B, steps = len(seqs), max(map(len, seqs))
    print(f"\n== mask time per decode step: batch {B}, {steps} steps, replaying {source}")
    backend = GrammarBackend(tokenizer, vocab)
    masks = np.full((B, backend.mask_words), 0xFFFFFFFF, np.uint32)
    results: dict[str, list[float]] = {}
    for mode in ("warm-up", "row by row", "fill_masks"):  # the warm-up builds the lazy lexer states
        ms = [backend.matcher("json_schema", schema) for _ in range(B)]
        step_t, row_t = [], []
        for s in range(steps):
            live = [m if s < len(q) else None for m, q in zip(ms, seqs, strict=True)]
            t0 = time.perf_counter()
            if mode == "fill_masks":
                backend.fill_masks(live, masks)
            else:
                for i, m in enumerate(live):
                    if m is not None:
                        t = time.perf_counter()
                        m.fill_mask(masks[i])
                        row_t.append(time.perf_counter() - t)
            step_t.append(time.perf_counter() - t0)
            for m, q in zip(live, seqs, strict=True):
                if m is not None:
                    m.consume(q[s])
        results[mode] = step_t
        if mode == "row by row":
            results["one row"] = row_t
    print(f"   one row             {stats_ms(results['one row'])}")
    print(f"   batch, row by row   {stats_ms(results['row by row'])}   (what the engine's step does now)")
    print(f"   batch, fill_masks   {stats_ms(results['fill_masks'])}   (llguidance thread pool)")
    backend.close()


def bench_engine(args: argparse.Namespace, engine: Any, schema: dict) -> list[list[int]]:
    """JSON-constrained decode at the batch size, then unconstrained decode of the same prompts and
    the same number of tokens per request (ignore_eos), so both runs drain the batch alike."""
    from jaxradix import SamplingParams

    B, N = args.batch, args.max_new_tokens
    prompts = [f"Return a JSON array of two people (name, age, email), set number {i}:" for i in range(B)]
    step_log: list[tuple[float, int, float]] = []  # (seconds, running rows, seconds in fill_mask)
    mask_seconds = [0.0]
    fill, step = GrammarMatcher.fill_mask, engine._step

    def timed_fill(self: GrammarMatcher, row: np.ndarray) -> None:
        t = time.perf_counter()
        fill(self, row)
        mask_seconds[0] += time.perf_counter() - t

    def timed_step() -> None:
        rows, m0, t = len(engine.scheduler.running), mask_seconds[0], time.perf_counter()
        step()
        step_log.append((time.perf_counter() - t, rows, mask_seconds[0] - m0))

    GrammarMatcher.fill_mask = timed_fill
    engine._step = timed_step  # the loop thread looks the method up on every iteration

    def run(params: list[SamplingParams]) -> tuple[dict[str, Any], list[dict]]:
        engine.wait_idle()
        step_log.clear()
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t
        toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
        full = [(s, m) for s, r, m in step_log if r == B]
        return {"wall": wall, "tokens": toks, "tok_s": toks / wall, "steps": len(step_log),
                "step_ms": 1e3 * float(np.median([s for s, _ in full])) if full else float("nan"),
                "mask_ms": 1e3 * float(np.mean([m for _, m in full])) if full else float("nan"),
                "stop": sum(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs),
                "valid": sum(_valid_json(o["text"]) for o in outs)}, outs

    print(f"\n== engine decode: batch {B}, max_new_tokens {N}, temperature 1.0, schema people[2]")
    sp = lambda i, **kw: SamplingParams(temperature=1.0, seed=i, **kw)
    # warm: prefix cache and grammar compile
    engine.generate(prompts, [sp(i, max_new_tokens=4, json_schema=schema) for i in range(B)])
    engine.generate(prompts, [sp(i, max_new_tokens=4) for i in range(B)])
    js, outs = run([sp(i, max_new_tokens=N, json_schema=schema) for i in range(B)])
    lens = [max(1, o["meta_info"]["completion_tokens"]) for o in outs]
    free, _ = run([sp(i, max_new_tokens=n, ignore_eos=True) for i, n in enumerate(lens)])
    GrammarMatcher.fill_mask, engine._step = fill, step
    print(f"   {'':<14}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'steps':>7}{'step ms@B':>11}{'mask ms@B':>11}"
          f"{'stop':>6}{'json ok':>9}")
    for name, r in (("unconstrained", free), ("json_schema", js)):
        valid = r["valid"] if name == "json_schema" else "-"
        print(f"   {name:<14}{r['tokens']:>8}{r['wall']:>9.2f}{r['tok_s']:>9.1f}{r['steps']:>7}"
              f"{r['step_ms']:>11.2f}{r['mask_ms']:>11.3f}{r['stop']:>6}{valid:>9}")
    print(f"   throughput json/unconstrained = {js['tok_s'] / free['tok_s']:.3f}; median step at batch {B}: "
          f"json/unconstrained = {js['step_ms'] / free['step_ms']:.3f}, fill_mask share of a json step = "
          f"{js['mask_ms'] / js['step_ms']:.1%}")
    print("   sample:", outs[0]["text"][:160])
    return [o["output_ids"] for o in outs]


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--skip-engine", action="store_true", help="host-side compile and mask numbers only")
    args = ap.parse_args()

    engine = None
    if args.skip_engine:
        from jaxradix.models.embedded import embedded_model_path
        from jaxradix.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model_path or embedded_model_path())
        vocab = tokenizer.vocab_size
    else:
        from jaxradix import Engine

        engine = Engine(args.model_path, load_format=args.load_format, max_running_requests=args.batch,
                        chunked_prefill_size=1024, context_length=1024, log_level="warning",
                        max_total_tokens=args.batch * (args.max_new_tokens + 64) + 1024)
        tokenizer, vocab = engine.tokenizer, engine.model_config.vocab_size
    print(f"ran on: {ran_on()}")
    print(f"model vocab {vocab} -> {(vocab + 31) // 32} mask words; tokenizer vocab {tokenizer.vocab_size}")
    schema = SCHEMAS["people[2]"]
    bench_compile(tokenizer, vocab)
    if engine is not None:
        seqs = bench_engine(args, engine, schema)
        engine.shutdown()
        bench_masks(tokenizer, vocab, schema, seqs, "the engine's JSON outputs")
    else:
        backend = GrammarBackend(tokenizer, vocab)
        seqs = random_walks(backend, schema, args.batch, args.max_new_tokens)
        backend.close()
        bench_masks(tokenizer, vocab, schema, seqs, "random walks through the schema")


if __name__ == "__main__":
    main()

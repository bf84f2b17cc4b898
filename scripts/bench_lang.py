"""The frontend language on a few-shot workload: radix cache on vs off.

Each program is a 5-shot question: a shared preamble (instructions + 5 worked examples), then its own
question, then two gens (a fact, then the answer given the fact). `run_batch` runs them all; with
the radix cache, the batch's common prefix is computed once (run_batch warms it) and every program
reuses its pages, and each program's second gen reuses its first. Rows: radix, radix without the
batch warm-up (warm_prefix=False), no radix (disable_radix_cache=True). Greedy, so the three must
give the same answers.

    python scripts/bench_lang.py                       # 64 programs, embedded SmolLM2-135M
    python scripts/bench_lang.py --num-programs 32 --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import jax

from jaxradix import Engine
from jaxradix.lang import EngineBackend, ProgramState, function, gen

INSTRUCTIONS = ("You are a precise assistant for a geography quiz. Each example below gives a question, a short "
                "fact that helps to answer it, and the answer. Answer every new question in the same format: the "
                "name of a single place, in a few words, and nothing else. Do not explain your answer, do not "
                "repeat the question, and do not add a second line.\n\n")
SHOTS = [
    ("What is the capital of France?", "France is governed from its largest city, on the river Seine.", "Paris"),
    ("Which river flows through Cairo?", "Cairo lies on the banks of the longest river in Africa.", "The Nile"),
    ("What is the largest ocean on Earth?", "It lies between Asia and the Americas and covers a third of the "
     "planet.", "The Pacific Ocean"),
    ("On which continent is Kenya?", "Kenya lies on the equator, on the eastern coast of its continent.", "Africa"),
    ("What is the highest mountain in the world?", "It stands in the Himalayas, on the border of Nepal and "
     "China.", "Mount Everest"),
]
PLACES = ["Japan", "Brazil", "Canada", "Egypt", "Norway", "India", "Mexico", "Kenya", "Peru", "Italy", "Chile",
          "Spain", "Greece", "Turkey", "Vietnam", "Poland"]
TEMPLATES = ["What is the capital of {}?", "Which is the longest river in {}?", "What is the largest city in {}?",
             "Which ocean or sea borders {}?"]


def questions(n: int) -> list[str]:
    qs = [t.format(p) for t in TEMPLATES for p in PLACES]
    return [qs[i % len(qs)] + ("" if i < len(qs) else f" (#{i // len(qs)})") for i in range(n)]


@function
def few_shot(s: ProgramState, question: str, max_tokens: int) -> None:
    s += INSTRUCTIONS
    for q, fact, a in SHOTS:
        s += f"Question: {q}\nFact: {fact}\nAnswer: {a}\n\n"
    s += f"Question: {question}\nFact:" + gen("fact", max_tokens=max_tokens, stop="\n")
    s += "\nAnswer:" + gen("answer", max_tokens=max_tokens, stop="\n")


def bench(engine: Engine, qs: list[str], max_tokens: int, warm_prefix: bool) -> dict[str, Any]:
    backend = EngineBackend(engine)
    few_shot.run(question="Where is the Eiffel Tower?", max_tokens=2, temperature=0, backend=backend)  # warm-up
    engine.wait_idle()
    assert engine.flush_cache()
    engine.stats.update(prefill_tokens=0, generated_tokens=0)
    start = time.perf_counter()
    states = few_shot.run_batch([{"question": q, "max_tokens": max_tokens} for q in qs], temperature=0,
                                backend=backend, warm_prefix=warm_prefix)
    wall = time.perf_counter() - start
    engine.wait_idle()
    engine.check_integrity()
    metas = [st.get_meta_info(name) for st in states for name in ("fact", "answer")]
    prompt = sum(m["prompt_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    out = sum(m["completion_tokens"] for m in metas)
    return {"wall_s": wall, "programs_per_s": len(qs) / wall, "output_tok_per_s": out / wall,
            "total_tok_per_s": (prompt + out) / wall, "prompt_tokens": prompt, "prefill_computed":
            engine.stats["prefill_tokens"], "hit_rate": cached / prompt,
            "engine_hit_rate": engine.cache_stats()["hit_rate"],
            "answers": [(st["fact"], st["answer"]) for st in states]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--num-programs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-warm-row", action="store_true", help="skip the radix run without run_batch's warm-up")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    engine_kwargs = dict(max_running_requests=64, chunked_prefill_size=512, max_total_tokens=65536,
                         context_length=2048, log_level="warning")
    dev = jax.devices()[0]
    print(f"# jaxradix frontend benchmark on {jax.default_backend()} ({dev.device_kind}, "
          f"{platform.processor() or platform.machine()}), model {args.model_path or 'embedded SmolLM2-135M'}")
    qs = questions(args.num_programs)
    rows: dict[str, dict[str, Any]] = {}
    for radix in (True, False):
        e = Engine(args.model_path, disable_radix_cache=not radix, **engine_kwargs)
        try:
            if radix:
                rows["radix"] = bench(e, qs, args.max_tokens, warm_prefix=True)
                if not args.no_warm_row:
                    rows["radix, no batch warm-up"] = bench(e, qs, args.max_tokens, warm_prefix=False)
            else:
                rows["no radix"] = bench(e, qs, args.max_tokens, warm_prefix=True)
        finally:
            e.shutdown()
    same = rows["radix"]["answers"] == rows["no radix"]["answers"]
    keys = ["wall_s", "programs_per_s", "total_tok_per_s", "output_tok_per_s", "prefill_computed", "hit_rate"]
    print(f"\n{args.num_programs} programs x (5-shot preamble + question, then 2 gens of max_tokens="
          f"{args.max_tokens}); {rows['radix']['prompt_tokens'] // args.num_programs} prompt tokens per program "
          f"(both gens); hit_rate = cached / prompt tokens over all gen calls\n")
    print("| | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
              + " |")
    speed = rows["radix"]["programs_per_s"] / rows["no radix"]["programs_per_s"]
    print(f"\nradix / no radix throughput: {speed:.2f}x; greedy answers identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in rows.items()} |
                      {"device": str(dev.device_kind), "backend": jax.default_backend()}, f, indent=2)


if __name__ == "__main__":
    main()

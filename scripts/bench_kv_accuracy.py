"""What a quantized KV cache costs in accuracy, on the embedded model by default (CPU-sized).

    python scripts/bench_kv_accuracy.py                                   # f32 (CPU weights) vs the rest
    python scripts/bench_kv_accuracy.py --kv-dtypes bfloat16,fp8_e4m3,int8 --text-tokens 1024

For each --kv-cache-dtype (or QUANTIZATION/KV_CACHE_DTYPE pair: quantized weights too), one engine computes:
  teacher-forced   the log-probability of every token of a fixed text (--text-file, default a public-domain
                   text shipped with the tests) given the text before it (prompt logprobs): the perplexity, and
                   the max / mean |difference| of those logprobs and top-1 agreement against the first dtype.
  greedy           --greedy-tokens greedy tokens after each of a few prompts: the share of positions equal to
                   the first dtype's, and how many tokens each prompt keeps before its first difference.
Engines compile only the buckets they use (precompile off); nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from jaxradix import Engine, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain in simple words why the sky is blue.",
    "List three uses of a paper clip:",
]


def measure(engine: Engine, text_ids: list[int], prompts: list[str], greedy_tokens: int) -> dict:
    out = engine.generate(input_ids=text_ids, sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
                          return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
    meta = out["meta_info"]
    lps = np.array([lp for lp, _ in meta["input_token_logprobs"][1:]], np.float64)  # token 0 has no context
    top1 = [top[0][0] for top in meta["input_top_logprobs"][1:]]  # the most likely token at each position
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=greedy_tokens, ignore_eos=True))
    return {"logprobs": lps, "top1": top1, "greedy": [g["output_ids"] for g in greedy],
            "perplexity": math.exp(-lps.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--kv-dtypes", default="auto,bfloat16,fp8_e4m3,fp8_e5m2,int8",
                    help="comma-separated --kv-cache-dtype values, or QUANTIZATION/KV_CACHE_DTYPE pairs (e.g. "
                    "none/auto,int8/auto,gguf/fp8_e4m3) for quantized weights too; the first is the reference")
    ap.add_argument("--text-file", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" /
                                               "declaration_of_independence.txt"),
                    help="default: the Declaration of Independence and the Gettysburg Address (public domain)")
    ap.add_argument("--text-tokens", type=int, default=2048)
    ap.add_argument("--greedy-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtypes = args.kv_dtypes.split(",")
    rows: dict[str, dict] = {}
    ref = None
    for name in dtypes:
        quant, kv_dtype = name.split("/") if "/" in name else (None, name)
        engine = Engine(args.model_path, kv_cache_dtype=kv_dtype, quantization=quant,
                        max_running_requests=len(PROMPTS), precompile=False,
                        chunked_prefill_size=256, max_total_tokens=args.text_tokens + 4096,
                        context_length=args.text_tokens + 64, log_level="warning")
        text_ids = engine.encode(Path(args.text_file).read_text())[:args.text_tokens]
        m = measure(engine, text_ids, PROMPTS, args.greedy_tokens)
        kv = f"{engine.memory.kv_dtype} ({engine.memory.kv_bytes_per_token} B/token)"
        engine.shutdown()
        ref = ref or m
        diff = np.abs(m["logprobs"] - ref["logprobs"])
        same = [a == b for g, r in zip(m["greedy"], ref["greedy"], strict=True) for a, b in zip(g, r, strict=True)]
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(g))
                  for g, r in zip(m["greedy"], ref["greedy"], strict=True)]
        rows[name] = {"kv": kv, "perplexity": m["perplexity"], "max_abs_logprob_diff": float(diff.max()),
                      "mean_abs_logprob_diff": float(diff.mean()),
                      "top1_agreement": float(np.mean([a == b for a, b in zip(m["top1"], ref["top1"], strict=True)])),
                      "greedy_agreement": sum(same) / len(same), "greedy_tokens_before_first_difference": prefix}
        print(f"{name}: {rows[name]}", flush=True)
    print(f"\n{len(text_ids)} tokens of {Path(args.text_file).name} teacher-forced; {len(PROMPTS)} prompts x "
          f"{args.greedy_tokens} greedy tokens; against kv_cache_dtype={dtypes[0]}\n")
    keys = list(next(iter(rows.values())))
    print("| quantization / kv_cache_dtype | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Greedy agreement of the quantized CPU serving paths with the f32 model (embedded SmolLM2-135M by default).

    python scripts/cpu_quant_agreement.py                        # none vs int8 vs gguf, 4 prompts x 128 tokens

For each --quantization, the greedy tokens of a few chat prompts next to those of `none` (the GGUF
dequantized to f32 at load): the tokens generated before the first difference, and the share of
positions that agree. On CPU `int8` and `gguf` are both served as per-channel int8 weights with int8
dots (models/cpu_matmul.py); `gguf` re-quantizes the file's Q4_1 blocks, `int8` the f32 weights.
"""

from __future__ import annotations

import argparse

from jaxradix import Engine, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of a paperclip.",
]


def greedy(quantization: str, model_path: str | None, tokens: int) -> list[list[int]]:
    engine = Engine(model_path, quantization=quantization, precompile=False, max_running_requests=len(PROMPTS),
                    max_total_tokens=4096, context_length=1024, log_level="warning")
    sp = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    ids = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in PROMPTS]
    outs = engine.generate(input_ids=ids, sampling_params=sp)
    engine.shutdown()
    return [o["output_ids"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--quantizations", default="int8,gguf")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    ref = greedy("none", args.model_path, args.tokens)
    print(f"| quantization | tokens before the first difference (per prompt, of {args.tokens}) | positions agreeing |")
    print("|---|---|---|")
    for q in args.quantizations.split(","):
        got = greedy(q, args.model_path, args.tokens)
        pairs = list(zip(ref, got, strict=True))
        firsts = [next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r)) for r, g in pairs]
        same = sum(a == b for r, g in pairs for a, b in zip(r, g, strict=True)) / sum(len(r) for r in ref)
        print(f"| {q} | {', '.join(map(str, firsts))} | {same:.1%} |", flush=True)


if __name__ == "__main__":
    main()

"""Generate a continuation with jaxradix: a thin client of jaxradix.Engine.

    python scripts/generate.py --prompt "The capital of France is" --max-new-tokens 24 --temperature 0
    python scripts/generate.py --chat --prompt "What is the capital of France?"
    python scripts/generate.py --model-path /path/to/hf_dir --prompt "..."
"""

from __future__ import annotations

import argparse
import time

from jaxradix import Engine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF directory, .gguf file or orbax checkpoint "
                    "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args()

    engine = Engine(args.model_path, load_format=args.load_format, dtype=args.dtype,
                    attention_backend=args.attention_backend, max_running_requests=1, chunked_prefill_size=256,
                    max_total_tokens=8192, context_length=4096, log_level="warning")
    prompt = args.prompt
    if args.chat:
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    start = time.perf_counter()
    if args.stream:
        seen = ""
        for chunk in engine.generate(prompt, sp, stream=True):
            print(chunk["text"][len(seen):], end="", flush=True)
            seen = chunk["text"]
        out = chunk
        print()
    else:
        out = engine.generate(prompt, sp)
        print(out["text"])
    n = out["meta_info"]["completion_tokens"]
    print(f"\n[{n} tokens in {time.perf_counter() - start:.2f} s, finish: {out['meta_info']['finish_reason']}]")
    engine.shutdown()


if __name__ == "__main__":
    main()

"""What an engine holds in memory, and whether the measured activation headroom was enough.

    python scripts/memory_report.py                                               # CPU, the embedded model
    python scripts/memory_report.py --model-path scripts/configs/llama-3.1-8b --load-format dummy \\
        --kv-cache-dtypes auto,fp8_e4m3                                          # a GPU: ~1 min per dtype

For each KV cache dtype: one engine sized by the default rule (no --max-total-tokens: on a device with
memory stats the pool takes what is left after the weights and the largest step's measured activations),
its memory report (the start-up log line), then a prompt-logprobs request as long as the largest bucket
(prefilled in chunked-prefill-size chunks, each step holding every token's logits) and a full greedy
batch; on a device with memory stats, the device's bytes in use and peak after them against its limit
(the headroom held if the peak stays under the limit). Buckets compile on first use.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from jaxradix import Engine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--kv-cache-dtypes", default="auto,fp8_e4m3")
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--chunked-prefill-size", type=int, default=512)
    args = ap.parse_args()
    for name in args.kv_cache_dtypes.split(","):
        engine = Engine(args.model_path, load_format=args.load_format, kv_cache_dtype=name, precompile=False,
                        max_running_requests=args.max_running_requests, chunked_prefill_size=args.chunked_prefill_size,
                        log_level="warning")
        print(engine.memory.log_line(), flush=True)
        vocab = engine.model_config.vocab_size
        rng = np.random.default_rng(0)
        T = engine.buckets.token_sizes[-1]
        ids = rng.integers(10, vocab - 1, min(T - 1, engine.context_len - 2)).tolist()
        engine.generate(input_ids=ids, sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
                        return_logprob=True, logprob_start_len=0)  # full prefill chunks, prompt-logprobs variant
        batch = [rng.integers(10, vocab - 1, 16).tolist() for _ in range(args.max_running_requests)]
        engine.generate(input_ids=batch, sampling_params=SamplingParams(temperature=0, max_new_tokens=4,
                                                                        ignore_eos=True))
        stats = jax.local_devices()[0].memory_stats() or {}
        out = {"kv_cache_dtype": name, **engine.memory.as_dict()}
        if "bytes_limit" in stats:
            out |= {k: stats.get(k) for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use")}
            out["peak_headroom_bytes"] = stats["bytes_limit"] - stats.get("peak_bytes_in_use", 0)
        print(json.dumps(out), flush=True)
        engine.shutdown()
        del engine


if __name__ == "__main__":
    main()

"""One rank of the two-process test (tests/test_multihost.py): a TP=8 engine over 2 x 4 CPU devices
(the test runs it with the GPU's split sampler, so the followers replay rank 0's sampler plans).

Rank 0 writes its greedy outputs to DIR/result.json, waits for DIR/go (meanwhile the test kills
rank 1), generates again and writes what that raised to DIR/error.txt. Rank 1 follows until stopped.
"""

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    rank, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    prompts = json.loads(sys.argv[5])
    from jaxradix import Engine, SamplingParams

    engine = Engine(model_dir, tp_size=8, nnodes=2, node_rank=rank, dist_init_addr=f"127.0.0.1:{port}",
                    load_format="dummy", max_running_requests=1, chunked_prefill_size=16, max_total_tokens=1024,
                    context_length=256, precompile=False, log_level="warning")
    assert engine.runner.split == (os.environ.get("JAXRADIX_SAMPLER") == "split")
    if rank > 0:
        try:
            engine.join()
        except RuntimeError as e:
            print(f"rank {rank} stopped: {e}", flush=True)
            os._exit(1)
        sys.exit(0)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    outs = engine.generate(input_ids=prompts, sampling_params=greedy)
    sampled = engine.generate(input_ids=prompts[0], sampling_params=SamplingParams(
        temperature=0.8, top_p=0.9, seed=5, max_new_tokens=8))  # another sampler plan than greedy's
    (out / "result.json").write_text(json.dumps([o["output_ids"] for o in outs] + [sampled["output_ids"]]))
    while not (out / "go").exists():
        time.sleep(0.05)
    try:
        res = engine.generate(input_ids=prompts[0], sampling_params=greedy)
        msg = f"no exception; meta {res['meta_info']}"
    except RuntimeError as e:
        msg = f"raised: {e}"
    (out / "error.txt").write_text(msg + f"\nstopped: {engine.failure}")
    os._exit(0)  # the job is broken: skip jax.distributed's shutdown barrier

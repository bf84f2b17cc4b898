"""jaxradix next to llama.cpp (llama-cpp-python) on the same GGUF and the same CPU, in one run, one table.

    python scripts/bench_cpu_peer.py --peer-python /tmp/llamacpp-venv/bin/python
    python scripts/bench_cpu_peer.py --quantization int8 --peer-python /tmp/llamacpp-venv/bin/python

llama-cpp-python is never a jaxradix dependency: build it in a scratch venv outside the repository
(`python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python`) and pass its
interpreter; the peer then runs in a child process of that interpreter (this file, `--peer-only`), which
imports llama_cpp and numpy only. Without --peer-python the peer runs in this process if llama_cpp is
importable here, and is skipped with a line saying so if it is not.

Each workload runs --repeat times per engine and the best run is kept (the machine may be shared); the
load average is printed before and after each engine.

Workloads (the embedded SmolLM2-135M-Instruct Q4_1 GGUF by default; token ids, so both engines do the same work):
  decode   one request, greedy, --decode-tokens output tokens after a short prompt: decode tok/s
           (output tokens after the first / time after the first token).
  shared   --requests requests = one --system-len-token shared system prompt + a unique --question-len-token
           question, --output-len output tokens each, greedy. llama.cpp: one after another, reusing the KV
           of the longest common prefix with the previous request (its prefix cache); jaxradix: all
           submitted at once, batched, with the radix cache. Output tok/s over the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class Workloads:
    decode_prompt: list[int]
    decode_tokens: int
    shared_prompts: list[list[int]]
    output_len: int


@dataclass
class Figures:
    decode_tok_s: float
    shared_output_tok_s: float
    shared_wall_s: float
    note: str = ""


# -- the peer: llama.cpp ----------------------------------------------------------------------
def run_llama_cpp(model_path: str, work: Workloads, threads: int, repeat: int) -> Figures:
    import llama_cpp

    context = max(len(p) for p in work.shared_prompts) + work.output_len + 64
    context = max(context, len(work.decode_prompt) + work.decode_tokens + 64)
    llm = llama_cpp.Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                          n_batch=512, verbose=False, seed=0)

    def generate(prompt: list[int], n: int) -> list[float]:
        """Greedy tokens after prompt; the time at which each arrived. generate() keeps the KV of the
        longest prefix shared with the previous call (llama-cpp-python's prefix reuse)."""
        times = []
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return times

    generate(work.decode_prompt, 8)  # warm-up
    decode, wall = 0.0, float("inf")
    for _ in range(repeat):  # the best of `repeat` runs: the least disturbed by other jobs on the machine
        llm.reset()
        times = generate(work.decode_prompt, work.decode_tokens)
        decode = max(decode, (len(times) - 1) / (times[-1] - times[0]))
        llm.reset()
        start = time.perf_counter()
        for prompt in work.shared_prompts:
            generate(prompt, work.output_len)
        wall = min(wall, time.perf_counter() - start)
    out = len(work.shared_prompts) * work.output_len
    return Figures(decode, out / wall, wall, f"llama-cpp-python {llama_cpp.__version__}, {threads} threads, "
                                             f"load average {os.getloadavg()[0]:.1f} after")


def peer(args: argparse.Namespace, work: Workloads, model_path: str) -> Figures | str:
    """The peer's figures, or the reason it did not run."""
    if args.peer_python:
        cmd = [args.peer_python, os.path.abspath(__file__), "--peer-only", "--model-path", model_path,
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
        proc = subprocess.run(cmd, input=json.dumps(asdict(work)), capture_output=True, text=True)
        if proc.returncode != 0:
            return f"llama.cpp peer failed under {args.peer_python}: {proc.stderr.strip()[-400:]}"
        return Figures(**json.loads(proc.stdout.strip().splitlines()[-1]))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama.cpp peer skipped: llama_cpp is not importable here (build llama-cpp-python in a scratch "
                "venv and pass --peer-python)")
    return run_llama_cpp(model_path, work, args.threads, args.repeat)


# -- jaxradix ---------------------------------------------------------------------------------
def run_jaxradix(args: argparse.Namespace, work: Workloads):
    from jaxradix import Engine, SamplingParams

    longest = max(len(p) for p in work.shared_prompts) + work.output_len
    engine = Engine(args.model_path, quantization=args.quantization, max_running_requests=64,
                    max_total_tokens=args.max_total_tokens, context_length=max(longest, 1024) + 64,
                    chunked_prefill_size=args.chunked_prefill_size, log_level="warning")

    def decode() -> float:
        sp = SamplingParams(temperature=0, max_new_tokens=work.decode_tokens, ignore_eos=True)
        meta = engine.generate(input_ids=[work.decode_prompt], sampling_params=sp)[0]["meta_info"]
        return (work.decode_tokens - 1) / (meta["e2e_latency"] - meta["ttft"])

    def shared() -> tuple[float, float, float]:
        engine.flush_cache()
        sp = SamplingParams(temperature=0, max_new_tokens=work.output_len, ignore_eos=True)
        start = time.perf_counter()
        outs = engine.generate(input_ids=work.shared_prompts, sampling_params=sp)
        wall = time.perf_counter() - start
        metas = [o["meta_info"] for o in outs]
        hit = sum(m["cached_tokens"] for m in metas) / sum(m["prompt_tokens"] for m in metas)
        return sum(m["completion_tokens"] for m in metas) / wall, wall, hit

    decode()  # warm-up (every bucket is compiled at start-up; this warms the host paths)
    shared()
    dec, tok_s, wall, hit = 0.0, 0.0, float("inf"), 0.0
    for _ in range(args.repeat):  # the best of `repeat` runs, as for the peer
        dec = max(dec, decode())
        t, w, hit = shared()
        if w < wall:
            tok_s, wall = t, w
    engine.check_integrity()
    import jax

    nbytes = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(engine.runner.params))  # as served
    engine.shutdown()
    return Figures(dec, tok_s, wall, f"quantization {args.quantization}, weights on device {nbytes / 2**20:.0f} MiB, "
                                     f"radix hit rate {hit:.1%}, jax {jax.__version__}, "
                                     f"load average {os.getloadavg()[0]:.1f} after")


def workloads(args: argparse.Namespace) -> Workloads:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    low, high = 100, 49000  # ordinary tokens of SmolLM2's vocabulary (49152), no special ones
    system = rng.integers(low, high, args.system_len).tolist()
    q_min, q_max = map(int, args.question_len.split(","))
    prompts = [system + rng.integers(low, high, int(rng.integers(q_min, q_max + 1))).tolist()
               for _ in range(args.requests)]
    return Workloads(rng.integers(low, high, 16).tolist(), args.decode_tokens, prompts, args.output_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="a GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--quantization", default=None,
                    help="jaxradix --quantization (none|int8|fp8|gguf; default: the engine's)")
    ap.add_argument("--peer-python", default=None, help="the interpreter of a venv with llama-cpp-python")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--system-len", type=int, default=450)
    ap.add_argument("--question-len", default="16,32")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-total-tokens", type=int, default=8192)
    ap.add_argument("--chunked-prefill-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each workload per engine; the best is kept")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_only:  # the child: workloads on stdin, figures as one JSON line on stdout
        work = Workloads(**json.loads(sys.stdin.read()))
        print(json.dumps(asdict(run_llama_cpp(args.model_path, work, args.threads, args.repeat))))
        return
    if args.model_path is None:
        from jaxradix.models.embedded import embedded_model_path

        model_path = str(embedded_model_path())
    else:
        model_path = args.model_path
    work = workloads(args)
    print(f"# {os.path.basename(model_path)} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; decode: {args.decode_tokens} tokens; shared: {args.requests} x "
          f"({args.system_len} shared + {args.question_len} unique tokens), {args.output_len} output tokens; "
          f"best of {args.repeat}; load average {os.getloadavg()[0]:.1f} before", flush=True)
    theirs = peer(args, work, model_path)
    if isinstance(theirs, str):
        print(theirs, flush=True)
    ours = run_jaxradix(args, work)
    rows = [("single-request greedy decode, tok/s", "decode_tok_s"),
            ("shared prefix, output tok/s", "shared_output_tok_s"), ("shared prefix, wall s", "shared_wall_s")]
    print("\n| workload | llama.cpp | jaxradix | jaxradix / llama.cpp |\n|---|---|---|---|")
    for name, key in rows:
        mine = getattr(ours, key)
        if isinstance(theirs, Figures):
            other = getattr(theirs, key)
            print(f"| {name} | {other:.1f} | {mine:.1f} | {mine / other:.2f}x |")
        else:
            print(f"| {name} | skipped | {mine:.1f} | - |")
    print(f"\njaxradix: {ours.note}" + (f"\nllama.cpp: {theirs.note}" if isinstance(theirs, Figures) else ""))


if __name__ == "__main__":
    main()

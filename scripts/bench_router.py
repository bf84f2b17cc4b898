"""Router policies on a multi-tenant workload: N jaxradix workers behind SGLang's router.

    pip install -e '.[router]'
    python scripts/bench_router.py --dp-size 2 --policies cache_aware round_robin       # starts everything
    python scripts/bench_router.py --worker-urls http://10.0.0.2:30000 http://10.0.0.3:30000   # running workers

The workload: --num-system-prompts tenants, each with its own long system prompt, and
--requests-per-prompt short questions per tenant, interleaved (tenant 0, 1, 2, 3, 0, 1, ...), sent
through the router --max-concurrency at a time. Before each policy every worker's radix cache is
flushed; after it, each worker's /get_server_info counters say how many prompt tokens it computed
(prefill) and how many it served from its cache. A router that keeps a tenant on one worker computes
each system prompt once; round robin computes it once per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import words  # noqa: E402

from jaxradix.server.data_parallel import (  # noqa: E402
    DataParallelConfig,
    DataParallelServer,
    ManagedProcess,
    find_router,
    free_port,
    http_json,
    start_router,
    wait_router_ready,
)

SMALL_WORKER = ("--max-total-tokens 8192 --max-running-requests 8 --chunked-prefill-size 256 --page-size 16 "
                "--context-length 2048 --log-level warning")


def multi_tenant_prompts(num_prompts: int, per_prompt: int, system_len: int, question_len: int,
                         seed: int = 0) -> list[str]:
    """Interleaved: tenant 0, 1, ..., n-1, then 0, 1, ... again; about one token per word."""
    rng = random.Random(seed)
    systems = [f"You are the assistant of tenant {k}. " + words(rng, system_len) for k in range(num_prompts)]
    return [f"{systems[k]}\nQuestion {i}: {words(rng, question_len)}\nAnswer:"
            for i in range(per_prompt) for k in range(num_prompts)]


@dataclass(frozen=True)
class WorkerCounters:
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    requests: int


def counters(url: str) -> WorkerCounters:
    status, body = http_json("GET", f"{url}/get_server_info", timeout=30)
    if status != 200:
        raise RuntimeError(f"{url}/get_server_info answered {status}: {body}")
    s = body["stats"]
    return WorkerCounters(s["prompt_tokens"], s["cached_tokens"], s["prefill_tokens"], s["requests"])


def flush(urls: list[str], timeout: float = 120.0) -> None:
    """Empty every worker's radix cache (a busy worker refuses; wait for it)."""
    for url in urls:
        deadline = time.monotonic() + timeout
        while http_json("POST", f"{url}/flush_cache", timeout=30)[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not flush its cache in {timeout:.0f} s")
            time.sleep(0.5)


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requests: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int  # prompt tokens computed across all workers
    hit_rate: float
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    requests_per_worker: list[int]


def run_policy(policy: str, router_url: str, worker_urls: list[str], prompts: list[str], output_len: int,
               concurrency: int) -> PolicyResult:
    flush(worker_urls)
    before = [counters(u) for u in worker_urls]

    def one(prompt: str) -> int:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": output_len, "temperature": 0,
                                                    "ignore_eos": True}}
        status, out = http_json("POST", f"{router_url}/generate", body, timeout=600)
        return out["meta_info"]["completion_tokens"] if status == 200 else -1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(one, prompts))
    seconds = time.perf_counter() - t0
    after = [counters(u) for u in worker_urls]
    d = [WorkerCounters(*(getattr(a, f) - getattr(b, f) for f in ("prompt_tokens", "cached_tokens",
                                                                    "prefill_tokens", "requests")))
         for a, b in zip(after, before, strict=True)]
    prompt, cached = sum(x.prompt_tokens for x in d), sum(x.cached_tokens for x in d)
    ok = [n for n in outs if n >= 0]
    return PolicyResult(policy, len(prompts), len(prompts) - len(ok), prompt, cached,
                        sum(x.prefill_tokens for x in d), cached / prompt if prompt else 0.0, seconds,
                        len(ok) / seconds, sum(ok) / seconds, [x.requests for x in d])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    ap.add_argument("--router", default="auto", choices=("auto", "sglang_router", "smg"))
    ap.add_argument("--worker-urls", nargs="*", default=None, help="running workers (default: start --dp-size)")
    ap.add_argument("--dp-size", type=int, default=2)
    ap.add_argument("--worker-args", default=SMALL_WORKER, help="launch_server flags of each started worker")
    ap.add_argument("--num-system-prompts", type=int, default=4)
    ap.add_argument("--requests-per-prompt", type=int, default=16)
    ap.add_argument("--system-prompt-len", type=int, default=400, help="words (about one token each)")
    ap.add_argument("--question-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--output-file", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    prompts = multi_tenant_prompts(args.num_system_prompts, args.requests_per_prompt, args.system_prompt_len,
                                   args.question_len)
    module = find_router(args.router)
    server: DataParallelServer | None = None
    routers: list[ManagedProcess] = []
    results: list[PolicyResult] = []
    try:
        if args.worker_urls:
            worker_urls = list(args.worker_urls)
        else:
            server = DataParallelServer(DataParallelConfig(
                worker_args=shlex.split(args.worker_args), dp_size=args.dp_size, port=free_port(),
                router_policy=args.policies[0], router=module, worker_restarts=0, echo=False))
            print(f"starting {args.dp_size} workers and {module} ...", flush=True)
            server.start()
            worker_urls = [w.url for w in server.workers]
        for policy in args.policies:
            if server is not None and policy == server.cfg.router_policy:
                router_url = server.url
            else:
                port = free_port()
                routers.append(start_router(module, worker_urls, policy, "127.0.0.1", port, echo=False))
                router_url = f"http://127.0.0.1:{port}"
                wait_router_ready(routers[-1], router_url, min_workers=len(worker_urls))
            res = run_policy(policy, router_url, worker_urls, prompts, args.output_len, args.max_concurrency)
            results.append(res)
            print(f"{policy}: {res.requests - res.failed}/{res.requests} ok, prefill {res.prefill_tokens} tokens, "
                  f"hit rate {res.hit_rate:.1%}, {res.requests_per_s:.2f} req/s, per worker "
                  f"{res.requests_per_worker}", flush=True)
    finally:
        for r in routers:
            r.stop()
        if server is not None:
            server.stop()

    print(f"\n{len(worker_urls)} workers, {module}; {args.num_system_prompts} system prompts x "
          f"{args.requests_per_prompt} requests, system {args.system_prompt_len} / question {args.question_len} "
          f"words, {args.output_len} output tokens, concurrency {args.max_concurrency}\n")
    print("| policy | ok | prefill tokens computed | prompt tokens | cache hit rate | req/s | output tok/s "
          "| requests per worker |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.policy} | {r.requests - r.failed}/{r.requests} | {r.prefill_tokens} | {r.prompt_tokens} | "
              f"{r.hit_rate:.1%} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} | "
              f"{' / '.join(map(str, r.requests_per_worker))} |")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()

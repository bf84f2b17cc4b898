"""Benchmark a running server over HTTP (jaxradix, or anything with SGLang's/OpenAI's API).

    python scripts/serve.py &                                   # then, in another shell:
    python scripts/bench_serving.py --dataset-name random --num-prompts 64 --request-rate 8
    python scripts/bench_serving.py --dataset-name generated-shared-prefix --gsp-num-groups 4 \\
        --gsp-prompts-per-group 16 --gsp-system-prompt-len 512 --gsp-question-len 32 --gsp-output-len 32
    python scripts/bench_serving.py --dataset-name multi-turn --api chat --max-concurrency 8 \\
        --output-file bench.json --plot bench.png

Every request streams, so time to first token (TTFT), inter-token latency (ITL: the gaps between
streamed tokens) and time per output token (TPOT: (latency - TTFT) / (output tokens - 1)) are
measured per request. The cache hit rate is the sum of cached prompt tokens over the sum of prompt
tokens, as the server reports them (meta_info.cached_tokens, or usage.prompt_tokens_details).
Prompts are made of common English words (about one token each), so no tokenizer is needed here;
token counts come from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you "
    "were all we her she there would their will when who him been has more if no out so what up can about "
    "into them only other new some could time these two may first then do any like my now over such our man "
    "me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three house water place small city story music"
).split()


# == workloads ===================================================================================
@dataclass
class Conversation:
    """One or more turns sent in order; each turn waits for the previous answer."""

    questions: list[str]
    output_len: int
    system: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def lengths(rng: random.Random, n: int, full: int, ratio: float) -> list[int]:
    lo = max(int(full * ratio), 1)
    return [rng.randint(lo, max(full, lo)) for _ in range(n)]


def random_workload(args: argparse.Namespace, rng: random.Random) -> list[Conversation]:
    ins = lengths(rng, args.num_prompts, args.random_input_len, args.random_range_ratio)
    outs = lengths(rng, args.num_prompts, args.random_output_len, args.random_range_ratio)
    return [Conversation([words(rng, i)], o) for i, o in zip(ins, outs, strict=True)]


def shared_prefix_workload(args: argparse.Namespace, rng: random.Random) -> list[Conversation]:
    convs = []
    for g in range(args.gsp_num_groups):
        system = f"System prompt {g}: " + words(rng, args.gsp_system_prompt_len)
        for _ in range(args.gsp_prompts_per_group):
            convs.append(Conversation([words(rng, args.gsp_question_len)], args.gsp_output_len, system=system))
    rng.shuffle(convs)
    return convs


def multi_turn_workload(args: argparse.Namespace, rng: random.Random) -> list[Conversation]:
    return [Conversation([words(rng, args.multi_turn_question_len) for _ in range(args.multi_turn_num_turns)],
                         args.multi_turn_output_len)
            for _ in range(args.multi_turn_num_conversations)]


WORKLOADS = {"random": random_workload, "generated-shared-prefix": shared_prefix_workload,
             "multi-turn": multi_turn_workload}


# == one request =================================================================================
@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    start: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""


def _data_lines(line: str) -> dict | None:
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return None if payload == "[DONE]" else json.loads(payload)


def _sampling(args: argparse.Namespace, output_len: int) -> dict[str, Any]:
    return {"temperature": args.temperature, "ignore_eos": not args.disable_ignore_eos, "max_tokens": output_len}


async def send(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, messages: list[dict],
               output_len: int) -> Result:
    res = Result(start=time.perf_counter())
    sp = _sampling(args, output_len)
    if args.api == "native":
        path = "/generate"
        body: dict[str, Any] = {"text": prompt, "stream": True, "sampling_params": {
            "max_new_tokens": output_len, "temperature": sp["temperature"], "ignore_eos": sp["ignore_eos"]}}
    elif args.api == "completions":
        path = "/v1/completions"
        body = {"model": args.model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                **sp}
    else:
        path = "/v1/chat/completions"
        body = {"model": args.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **sp}
    last = res.start
    tokens = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                chunk = _data_lines(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                now = time.perf_counter()
                if args.api == "native":
                    meta = chunk["meta_info"]
                    new = meta["completion_tokens"] - tokens
                    res.text = chunk["text"]
                    res.prompt_tokens, res.cached_tokens = meta["prompt_tokens"], meta.get("cached_tokens", 0)
                    res.completion_tokens = meta["completion_tokens"]
                else:
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        res.prompt_tokens, res.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
                        res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    new = 0
                    for ch in chunk.get("choices", []):
                        if ch.get("finish_reason") is None:
                            new += 1
                            res.text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                if new > 0:
                    if tokens == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    last, tokens = now, tokens + new
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - res.start
    res.ok = True
    return res


async def run_conversation(client: httpx.AsyncClient, args: argparse.Namespace, conv: Conversation,
                           sem: asyncio.Semaphore | None) -> list[Result]:
    results: list[Result] = []
    messages: list[dict] = [{"role": "system", "content": conv.system}] if conv.system else []
    transcript = conv.system + "\n" if conv.system else ""
    for q in conv.questions:
        messages.append({"role": "user", "content": q})
        transcript += (f"User: {q}\nAssistant:" if len(conv.questions) > 1 else q)
        if sem is not None:
            async with sem:
                res = await send(client, args, transcript, messages, conv.output_len)
        else:
            res = await send(client, args, transcript, messages, conv.output_len)
        results.append(res)
        if not res.ok:
            break
        messages.append({"role": "assistant", "content": res.text})
        transcript += res.text + "\n"
    return results


async def run(args: argparse.Namespace, convs: list[Conversation]) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=args.max_concurrency or max(len(convs), 1) + 8)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = np.random.default_rng(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits,
                                 headers=headers) as client:
        for _ in range(args.warmup_requests):
            w = await send(client, args, "Hello, how are you?", [{"role": "user", "content": "Hello"}], 4)
            if not w.ok:
                sys.exit(f"warmup request failed: {w.error}")
        start = time.perf_counter()
        tasks = []
        for conv in convs:
            tasks.append(asyncio.create_task(run_conversation(client, args, conv, sem)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        return results, time.perf_counter() - start


# == report ======================================================================================
def dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    a = np.asarray(values) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    out = sum(r.completion_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": prompt, "total_output_tokens": out, "cached_tokens": cached,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": prompt / duration if duration else 0.0,
        "output_throughput": out / duration if duration else 0.0,
        "cache_hit_rate": cached / prompt if prompt else 0.0,
        "ttft_ms": dist([r.ttft for r in ok]), "itl_ms": dist([g for r in ok for g in r.itl]),
        "tpot_ms": dist(tpot), "e2e_latency_ms": dist([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def print_report(s: dict[str, Any], target: str) -> None:
    print(f"\n{'=' * 18} Serving benchmark {'=' * 18}")
    print(target)
    rows = [("Successful requests", f"{s['completed']}"), ("Failed requests", f"{s['failed']}"),
            ("Duration (s)", f"{s['duration_s']:.2f}"), ("Input tokens", f"{s['total_input_tokens']}"),
            ("Output tokens", f"{s['total_output_tokens']}"), ("Request throughput (req/s)",
                                                                f"{s['request_throughput']:.2f}"),
            ("Input throughput (tok/s)", f"{s['input_throughput']:.1f}"),
            ("Output throughput (tok/s)", f"{s['output_throughput']:.1f}"),
            ("Cache hit rate", f"{100 * s['cache_hit_rate']:.1f}%")]
    for k, v in rows:
        print(f"{k:<32}{v:>20}")
    print(f"{'':<18}{'mean':>12}{'median':>12}{'p99':>12}")
    for name, key in (("TTFT (ms)", "ttft_ms"), ("ITL (ms)", "itl_ms"), ("TPOT (ms)", "tpot_ms"),
                      ("E2E latency (ms)", "e2e_latency_ms")):
        d = s[key]
        print(f"{name:<18}{d['mean']:>12.1f}{d['median']:>12.1f}{d['p99']:>12.1f}")
    for e in s["errors"]:
        print(f"error: {e}")
    print("=" * 55)


def plot(results: list[Result], summary: dict[str, Any], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so no {path} (pip install matplotlib)")
        return
    ok = [r for r in results if r.ok]
    t0 = min((r.start for r in ok), default=0.0)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].scatter([r.start - t0 for r in ok], [r.ttft * 1000 for r in ok], s=6)
    ax[0].set(xlabel="request start (s)", ylabel="TTFT (ms)", title="TTFT over time")
    ax[1].hist([g * 1000 for r in ok for g in r.itl] or [0], bins=50)
    ax[1].set(xlabel="ITL (ms)", ylabel="count", title="inter-token latency")
    ax[2].scatter([r.start - t0 for r in ok], [r.latency * 1000 for r in ok], s=6)
    ax[2].set(xlabel="request start (s)", ylabel="latency (ms)",
              title=f"E2E; {summary['output_throughput']:.0f} out tok/s, hit {100 * summary['cache_hit_rate']:.0f}%")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def describe_server(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(f"{args.base_url}/get_server_info", headers=headers, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        info = {}
    if "version" not in info:
        return f"Server: {args.base_url} (no /get_server_info)", info
    return (f"Server: {args.base_url}, jaxradix {info.get('version')}, model {info.get('model_path') or 'embedded'}"
            f", policy {info.get('schedule_policy')}, radix cache "
            f"{'off' if info.get('disable_radix_cache') else 'on'}, max running {info.get('max_running_requests')}"
            f", page size {info.get('page_size')}"), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api", choices=["native", "completions", "chat"], default="native",
                    help="/generate, /v1/completions or /v1/chat/completions")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--dataset-name", "--workload", dest="dataset_name", choices=list(WORKLOADS), default="random")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--random-input-len", type=int, default=256)
    ap.add_argument("--random-output-len", type=int, default=64)
    ap.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths uniform in [ratio*len, len]")
    ap.add_argument("--gsp-num-groups", type=int, default=8)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=16)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=512)
    ap.add_argument("--gsp-question-len", type=int, default=64)
    ap.add_argument("--gsp-output-len", type=int, default=32)
    ap.add_argument("--multi-turn-num-conversations", type=int, default=16)
    ap.add_argument("--multi-turn-num-turns", type=int, default=4)
    ap.add_argument("--multi-turn-question-len", type=int, default=64)
    ap.add_argument("--multi-turn-output-len", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests (conversations) per second, Poisson arrivals; inf: all at once")
    ap.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    ap.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run")
    ap.add_argument("--warmup-requests", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--output-file", default=None, help="write the summary (and config) as JSON")
    ap.add_argument("--plot", nargs="?", const="bench_serving.png", default=None,
                    help="write a PNG of TTFT / ITL / latency (needs matplotlib)")
    args = ap.parse_args()
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")

    target, info = describe_server(args)
    print(target)
    if args.flush_cache:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        r = httpx.post(f"{args.base_url}/flush_cache", headers=headers, timeout=30)
        print(f"flush_cache: HTTP {r.status_code}")
    convs = WORKLOADS[args.dataset_name](args, random.Random(args.seed))
    n_req = sum(len(c.questions) for c in convs)
    print(f"Workload: {args.dataset_name}, {n_req} requests ({len(convs)} conversations) via {args.api} API, "
          f"request rate {args.request_rate}, max concurrency {args.max_concurrency or 'unbounded'}")
    results, duration = asyncio.run(run(args, convs))
    summary = summarize(results, duration)
    print_report(summary, f"{target}\nWorkload: {args.dataset_name} via {args.api} API")
    if args.output_file:
        cfg = {k: (v if v != float("inf") else "inf") for k, v in vars(args).items()}
        with open(args.output_file, "w") as f:
            json.dump({"config": cfg, "server": info, "summary": summary,
                       "requests": [asdict(r) | {"text": None} for r in results]}, f, indent=1)
        print(f"results written to {args.output_file}")
    if args.plot:
        plot(results, summary, args.plot, f"{args.dataset_name} via {args.api} ({args.base_url})")


if __name__ == "__main__":
    main()

"""Soak test: a mixed workload at a bounded rate against a live server, watching for leaks and lost requests.

    python scripts/serve.py --enable-metrics &                    # then, in another shell:
    python scripts/soak.py --duration 3600 --rate 4 --interval 60

The mix: chat (non-streamed), streamed completions, n > 1, JSON-schema chat, streams aborted
through /abort_request, streams the client drops mid-way, and cache flushes. Every `--interval`
seconds it prints the server's resident memory, open file descriptors, KV pool usage, radix tree
size and load (from /get_server_info). At the end it waits for the server to go idle, runs its
integrity check and fails (exit status 1) on any lost request (an error, an unexpected status,
a request past its deadline, a stream that did not end properly) or on growth beyond the limits
between the first report and the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}
TOPICS = ["the sea", "a red fox", "bread", "the moon", "a small town", "rain", "a violin", "mountains"]
MIX = {"chat": 3, "stream": 3, "n2": 1, "json": 1, "abort": 1, "disconnect": 1, "flush": 0.3}


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    usage: float
    tree_tokens: int
    running: int
    queued: int


@dataclass
class Tally:
    done: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    in_flight: int = 0


class Lost(Exception):
    """A request that did not end as it must."""


def sse_json(line: str) -> dict | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[6:])


async def read_stream(lines: AsyncIterator[str], limit: int | None = None) -> tuple[list[dict], bool]:
    """(events, saw [DONE]) from a response's lines; stops early after `limit` events."""
    events, done = [], False
    async for line in lines:
        if line == "data: [DONE]":
            done = True
            break
        ev = sse_json(line)
        if ev is not None:
            if "error" in ev:
                raise Lost(f"stream error event: {ev['error'].get('message')}")
            events.append(ev)
            if limit is not None and len(events) >= limit:
                break
    return events, done


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def prompt(self) -> str:
        return f"Write two sentences about {self.rng.choice(TOPICS)}."

    def tokens(self) -> int:
        return self.rng.randint(4, self.args.max_tokens)

    async def job(self, c: httpx.AsyncClient, kind: str) -> None:
        mt = self.tokens()
        if kind == "chat":
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": self.prompt()}], "max_tokens": mt})
            self.expect(r, 200)
            if not r.json()["choices"][0]["finish_reason"]:
                raise Lost("chat: no finish_reason")
        elif kind == "n2":
            r = await c.post("/v1/completions", json={"prompt": self.prompt(), "max_tokens": mt, "n": 2})
            self.expect(r, 200)
            if len(r.json()["choices"]) != 2:
                raise Lost("n=2: not two choices")
        elif kind == "json":
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Give a person as JSON."}], "max_tokens": 48,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}})
            self.expect(r, 200)
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "stop":
                json.loads(choice["message"]["content"])  # a stop means the grammar completed
        elif kind == "stream":
            async with c.stream("POST", "/v1/completions", json={
                    "prompt": self.prompt(), "max_tokens": mt, "stream": True}) as r:
                self.expect(r, 200)
                events, done = await read_stream(r.aiter_lines())
            if not done or not events or events[-1]["choices"][0]["finish_reason"] is None:
                raise Lost("stream: did not end with a finish_reason and [DONE]")
        elif kind == "abort":
            rid = f"soak-{uuid.uuid4().hex}"
            async with c.stream("POST", "/generate", json={
                    "text": self.prompt(), "rid": rid, "stream": True,
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as r:
                self.expect(r, 200)
                lines = r.aiter_lines()
                first, _ = await read_stream(lines, limit=2)
                a = await c.post("/abort_request", json={"rid": rid})
                self.expect(a, 200)
                events, done = await read_stream(lines)
                events = first + events
            fin = events[-1]["meta_info"]["finish_reason"] if events else None
            if not done or not fin or fin["type"] not in ("abort", "length"):
                raise Lost(f"abort: the stream ended with {fin}")
        elif kind == "disconnect":
            async with c.stream("POST", "/v1/completions", json={
                    "prompt": self.prompt(), "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
                self.expect(r, 200)
                await read_stream(r.aiter_lines(), limit=2)  # then leave: the server must abort it
        elif kind == "flush":
            r = await c.post("/flush_cache")
            if r.status_code not in (200, 400):  # 400: refused while busy
                raise Lost(f"flush: HTTP {r.status_code}")
        else:
            raise ValueError(kind)

    @staticmethod
    def expect(r: httpx.Response, status: int) -> None:
        if r.status_code != status:
            try:
                body = r.text
            except httpx.ResponseNotRead:
                body = ""
            raise Lost(f"{r.request.url.path}: HTTP {r.status_code} {body[:200]}")

    async def run_job(self, c: httpx.AsyncClient, kind: str) -> None:
        self.tally.in_flight += 1
        try:
            await asyncio.wait_for(self.job(c, kind), self.args.request_timeout)
            self.tally.done[kind] += 1
        except TimeoutError:
            self.tally.lost.append(f"{kind}: no answer within {self.args.request_timeout} s")
        except Exception as e:  # noqa: BLE001 - every failure is a lost request, reported
            self.tally.lost.append(f"{kind}: {type(e).__name__}: {e}")
        finally:
            self.tally.in_flight -= 1

    async def sample(self, c: httpx.AsyncClient, t0: float) -> Sample:
        info = (await c.get("/get_server_info")).json()
        proc = info.get("process") or {}
        s = Sample(t=time.monotonic() - t0, rss_mb=(proc.get("rss_bytes") or 0) / 2**20,
                   fds=proc.get("open_fds") or 0, usage=info.get("token_usage", 0.0),
                   tree_tokens=info.get("cache", {}).get("unique_tokens", 0),
                   running=info.get("num_running_reqs", 0), queued=info.get("num_queue_reqs", 0))
        self.samples.append(s)
        print(f"| {s.t:7.0f} | {sum(self.tally.done.values()):6d} | {len(self.tally.lost):4d} | {s.rss_mb:8.0f} | "
              f"{s.fds:4d} | {s.usage:5.2f} | {s.tree_tokens:7d} | {s.running:3d} | {s.queued:3d} |", flush=True)
        return s

    async def main(self) -> int:
        a = self.args
        limits = httpx.Limits(max_connections=a.concurrency + 8)
        async with httpx.AsyncClient(base_url=a.url, timeout=a.request_timeout, limits=limits,
                                     headers=self.headers) as c:
            r = await c.get("/health")
            if r.status_code != 200:
                print(f"server not healthy: HTTP {r.status_code} {r.text}", file=sys.stderr)
                return 1
            print(f"soak: {a.duration:.0f} s at {a.rate} requests/s (at most {a.concurrency} in flight), "
                  f"report every {a.interval:.0f} s against {a.url}")
            print("| time s | done | lost | RSS MiB | fds | pool | tree tok | run | queue |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            kinds, weights = list(MIX), list(MIX.values())
            t0 = time.monotonic()
            await self.sample(c, t0)
            next_report = t0 + a.interval
            tasks: set[asyncio.Task] = set()
            while (now := time.monotonic()) < t0 + a.duration:
                if self.tally.in_flight < a.concurrency:
                    task = asyncio.create_task(self.run_job(c, self.rng.choices(kinds, weights)[0]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if now >= next_report:
                    await self.sample(c, t0)
                    next_report += a.interval
                await asyncio.sleep(self.rng.expovariate(a.rate))
            if tasks:
                await asyncio.wait(tasks, timeout=a.request_timeout + 5)
            r = await c.get("/debug/check_integrity", params={"timeout": 120})
            integrity = r.status_code == 200 and r.json().get("ok")
            final = await self.sample(c, t0)
        return self.verdict(integrity, final)

    def verdict(self, integrity: bool, final: Sample) -> int:
        a, problems = self.args, list(self.tally.lost[:20])
        if len(self.tally.lost) > 20:
            problems.append(f"... and {len(self.tally.lost) - 20} more lost requests")
        if not integrity:
            problems.append("the server's integrity check failed (a KV page leak)")
        first = self.samples[1] if len(self.samples) > 2 else self.samples[0]  # after a warm-up interval
        if final.rss_mb - first.rss_mb > a.max_rss_growth_mb:
            problems.append(f"RSS grew {final.rss_mb - first.rss_mb:.0f} MiB (limit {a.max_rss_growth_mb})")
        if final.fds - first.fds > a.max_fd_growth:
            problems.append(f"open fds grew by {final.fds - first.fds} (limit {a.max_fd_growth})")
        if final.running or final.queued or final.usage > 0:
            problems.append(f"not idle at the end: {final.running} running, {final.queued} queued, "
                            f"pool usage {final.usage:.2f}")
        done = ", ".join(f"{k} {v}" for k, v in sorted(self.tally.done.items()))
        print(f"completed: {sum(self.tally.done.values())} ({done}); lost: {len(self.tally.lost)}")
        for p in problems:
            print(f"FAIL: {p}")
        print("soak: FAILED" if problems else "soak: OK")
        return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    ap.add_argument("--rate", type=float, default=4.0, help="new requests per second (Poisson)")
    ap.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between reports")
    ap.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="a request past this is lost")
    ap.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    ap.add_argument("--max-fd-growth", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return asyncio.run(Soak(args).main())


if __name__ == "__main__":
    sys.exit(main())

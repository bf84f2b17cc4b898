"""Prometheus metrics (only with --enable-metrics), named like SGLang's with a `jaxradix:` prefix.

Counters and latency histograms are updated by the server as requests finish; gauges (running and
queued requests, token usage, cache hit rate) are read from the engine when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.0, 5.0)


def engine_load(engine: Any) -> dict[str, float]:
    """Running / queued requests, KV token usage and cache hit rate; plain reads of loop-owned counters."""
    sched = getattr(engine, "scheduler", None)
    running = len(sched.running) if sched is not None else 0
    queued = len(sched.waiting) if sched is not None else 0
    usage_fn = getattr(engine, "_usage", None)
    try:
        usage = float(usage_fn()) if usage_fn is not None else 0.0
    except Exception:  # noqa: BLE001 - a racing read is not worth failing a scrape
        usage = 0.0
    stats = getattr(engine, "stats", {}) or {}
    prompt = stats.get("prompt_tokens", 0)
    hit = stats.get("cached_tokens", 0) / prompt if prompt else 0.0
    out = {"num_running_reqs": running, "num_queue_reqs": queued, "token_usage": usage, "cache_hit_rate": hit}
    return out | hicache_load(engine)


def hicache_load(engine: Any) -> dict[str, float]:
    """Device and host prefix hits, tokens loaded back and load bandwidth (zeros without a host tier)."""
    kv, host = getattr(engine, "kv", None), getattr(engine, "host_pool", None)
    out = {"device_hit_tokens": 0.0, "host_hit_tokens": 0.0, "host_loaded_tokens": 0.0, "host_load_gbps": 0.0}
    if kv is not None:
        out["device_hit_tokens"] = float(kv.hits.device_hit_tokens)
        out["host_hit_tokens"] = float(kv.hits.host_hit_tokens)
    if host is not None:
        hs = host.stats
        out["host_loaded_tokens"] = float(hs.loaded_pages * host.page_size)
        if hs.load_seconds:
            out["host_load_gbps"] = hs.loaded_pages * host.data.nbytes / host.num_pages / hs.load_seconds / 1e9
    return out


class Metrics:
    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("jaxradix:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jaxradix:generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("jaxradix:cached_tokens", "Prompt tokens served from the radix cache",
                                     registry=r)
        self.requests = Counter("jaxradix:num_requests", "Finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("jaxradix:time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxradix:inter_token_latency_seconds",
                             "Time between tokens (streams: per chunk; otherwise the request's mean)",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jaxradix:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=r)

        def gauge(name: str, doc: str, key: str) -> None:
            def read() -> float:
                engine = get_engine()
                return engine_load(engine)[key] if engine is not None else 0.0

            Gauge(f"jaxradix:{name}", doc, registry=r).set_function(read)

        gauge("num_running_reqs", "Requests running in the engine", "num_running_reqs")
        gauge("num_queue_reqs", "Requests waiting in the engine queue", "num_queue_reqs")
        gauge("token_usage", "Share of KV pool pages in use (locked or owned)", "token_usage")
        gauge("cache_hit_rate", "Prompt tokens served from the radix cache / prompt tokens", "cache_hit_rate")
        gauge("cache_device_hit_tokens", "Prefix tokens found in the device KV pool at admission", "device_hit_tokens")
        gauge("cache_host_hit_tokens", "Prefix tokens loaded back from the host tier at admission", "host_hit_tokens")
        gauge("hicache_loaded_tokens", "Tokens copied host -> device by the hierarchical cache", "host_loaded_tokens")
        gauge("hicache_load_gbps", "Host -> device copy bandwidth, GB/s of host time (dispatch, asynchronous)",
              "host_load_gbps")

    def observe_finished(self, meta: dict[str, Any], streamed: bool) -> None:
        """Count one finished request; a stream observed its inter-token gaps as they happened."""
        self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        self.generation_tokens.inc(meta.get("completion_tokens", 0))
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        fin = meta.get("finish_reason") or {}
        self.requests.labels(fin.get("type", "unknown")).inc()
        ttft, e2e, n = meta.get("ttft"), meta.get("e2e_latency"), meta.get("completion_tokens", 0)
        if ttft is not None:
            self.ttft.observe(ttft)
        if e2e is not None:
            self.e2e.observe(e2e)
            if not streamed and ttft is not None and n > 1:
                self.itl.observe((e2e - ttft) / (n - 1))

    def observe_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

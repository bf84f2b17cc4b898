"""EngineConfig: every engine setting in one validated dataclass (server flags map onto it)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

SCHEDULE_POLICIES = ("lpm", "fcfs", "dfs-weight")
ATTENTION_BACKENDS = ("auto", "pallas", "triton", "gathered", "reference")  # = pallas_kernels.ATTENTION_BACKENDS
GRAMMAR_BACKENDS = ("llguidance", "none")
# the quantized ones store values + per-token-head scales (pallas_kernels/quantized_kv.py)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2", "int8")
QUANTIZATIONS = ("none", "int8", "fp8", "gguf")  # = models.quantization.QUANTIZATIONS


def default_cache_dir() -> str:
    return os.environ.get("JAXRADIX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "jaxradix", "jax"))


@dataclass
class EngineConfig:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    load_format: str = "auto"
    dtype: str = "auto"  # auto: the checkpoint's dtype; f32 checkpoints and GGUF serve in bf16 on GPU/TPU
    kv_cache_dtype: str = "auto"  # auto: the weights' dtype; fp8_e4m3|fp8_e5m2|int8: quantized pages
    # weights on the device: None/"none" dense; int8/fp8 per channel at load; gguf keeps a GGUF's blocks
    quantization: str | None = None
    context_length: int | None = None  # None: the model's max_position_embeddings (capped by the pool)
    page_size: int = 16
    max_total_tokens: int | None = None  # KV pool size in tokens; None: mem_fraction_static of free memory
    # a cap on weights + KV pool as a share of device memory; None: all that is free after the weights and
    # the largest step's measured activations (devices with memory stats; CPU sizes the pool from free RAM)
    mem_fraction_static: float | None = None
    max_running_requests: int = 64
    chunked_prefill_size: int = 512  # max prefill tokens in one step; -1 disables chunking
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    enable_hierarchical_cache: bool = False  # evicted radix nodes go to a host-memory KV pool, not away
    hicache_size: float = 0  # host pool in GB; 0: hicache_ratio x the device pool
    hicache_ratio: float = 2.0
    attention_backend: str = "auto"
    grammar_backend: str = "llguidance"
    random_seed: int = 0
    precompile: bool = True  # compile every bucket at start-up
    compilation_cache_dir: str | None = field(default_factory=default_cache_dir)
    decode_log_interval: int = 40
    new_token_ratio: float = 0.7  # share of max_new_tokens reserved for running requests at admission
    min_new_token_ratio: float = 0.15
    stream_interval: int = 1
    disable_overlap_schedule: bool = False  # schedule step N+1 only after reading step N's results
    # "split": the sampler is its own executable, compiled per SamplerPlan (no lax.cond: a GPU copies a
    # conditional's predicate to the host and blocks); "fused": in the step behind lax.cond; "auto": split
    # on a GPU, fused elsewhere (JAXRADIX_SAMPLER overrides auto)
    sampler_mode: str = "auto"
    sampler_warmup: bool = True  # split: compile every sampler plan in a background thread after start-up
    log_level: str = "info"
    tp_size: int = 1  # tensor parallelism over this many devices (over all hosts' devices when nnodes > 1)
    nnodes: int = 1  # processes (hosts) in one jax.distributed job; rank 0 schedules, every rank computes
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of rank 0's coordination service (nnodes > 1)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        check(self.page_size in (1, 2, 4, 8, 16, 32, 64, 128), "page_size", "must be a power of two <= 128")
        check(self.max_total_tokens is None or self.max_total_tokens > 0, "max_total_tokens", "must be > 0")
        check(self.mem_fraction_static is None or 0 < self.mem_fraction_static < 1, "mem_fraction_static",
              "must be in (0, 1)")
        check(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        check(self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 16,
              "chunked_prefill_size", "must be >= 16 or -1")
        check(self.schedule_policy in SCHEDULE_POLICIES, "schedule_policy", f"must be one of {SCHEDULE_POLICIES}")
        check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
              f"must be one of {ATTENTION_BACKENDS}")
        check(self.sampler_mode in ("auto", "fused", "split"), "sampler_mode", "must be auto, fused or split")
        check(self.grammar_backend in GRAMMAR_BACKENDS, "grammar_backend", f"must be one of {GRAMMAR_BACKENDS}")
        check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}")
        check(self.quantization is None or self.quantization in QUANTIZATIONS, "quantization",
              f"must be one of {QUANTIZATIONS}")
        check(self.hicache_size >= 0, "hicache_size", "must be >= 0 (GB; 0 uses hicache_ratio)")
        check(self.hicache_ratio > 0, "hicache_ratio", "must be > 0")
        check(self.context_length is None or self.context_length >= 16, "context_length", "must be >= 16")
        check(self.tp_size >= 1, "tp_size", "must be >= 1")
        check(not (self.enable_hierarchical_cache and self.nnodes > 1), "enable_hierarchical_cache",
              "is single-host only (the host tier's copies are not broadcast to other ranks)")
        check(self.nnodes >= 1, "nnodes", "must be >= 1")
        check(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, nnodes={self.nnodes})")
        check(self.nnodes == 1 or bool(self.dist_init_addr), "dist_init_addr",
              "must be host:port of rank 0 when nnodes > 1")
        check(self.nnodes == 1 or self.tp_size % self.nnodes == 0, "tp_size",
              f"must be a multiple of nnodes={self.nnodes} (each host gives the same number of devices)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

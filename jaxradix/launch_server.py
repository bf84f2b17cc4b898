"""Launch the HTTP server: `python -m jaxradix.launch_server` (or scripts/serve.py, jaxradix-serve).

    python -m jaxradix.launch_server                       # the embedded SmolLM2-135M-Instruct
    python -m jaxradix.launch_server --model-path /path/to/hf_dir --port 30000 --enable-metrics

Flags carry SGLang's names; engine flags left unset take EngineConfig's defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

from jaxradix.config import ATTENTION_BACKENDS, GRAMMAR_BACKENDS, KV_CACHE_DTYPES, SCHEDULE_POLICIES, EngineConfig

logger = logging.getLogger("jaxradix.server")

# flag dest -> EngineConfig field, for flags passed on only when given
ENGINE_FLAGS = {
    "model_path": "model_path", "mem_fraction_static": "mem_fraction_static",
    "max_total_tokens": "max_total_tokens", "max_running_requests": "max_running_requests",
    "chunked_prefill_size": "chunked_prefill_size", "page_size": "page_size",
    "schedule_policy": "schedule_policy", "load_format": "load_format", "context_length": "context_length",
    "dtype": "dtype", "kv_cache_dtype": "kv_cache_dtype", "attention_backend": "attention_backend",
    "grammar_backend": "grammar_backend",
    "random_seed": "random_seed", "log_level": "log_level",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None,
                    help="HF directory, .gguf file or orbax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--served-model-name", default=None, help="model name in the OpenAI API (default: the "
                    "model path's basename; 'default' is always accepted)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    ap.add_argument("--enable-metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    ap.add_argument("--skip-server-warmup", action="store_true", help="no warmup generation before ready")
    ap.add_argument("--max-request-bytes", type=int, default=32 << 20, help="larger bodies get 413")
    eng = ap.add_argument_group("engine (unset: EngineConfig's default)")
    eng.add_argument("--mem-fraction-static", type=float, default=None,
                     help="share of free accelerator memory for the KV pool (when --max-total-tokens is unset)")
    eng.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    eng.add_argument("--max-running-requests", type=int, default=None)
    eng.add_argument("--chunked-prefill-size", type=int, default=None, help="-1 disables chunking")
    eng.add_argument("--page-size", type=int, default=None)
    eng.add_argument("--schedule-policy", default=None, choices=SCHEDULE_POLICIES)
    eng.add_argument("--disable-radix-cache", action="store_true")
    eng.add_argument("--disable-overlap-schedule", action="store_true",
                     help="read each step's results before scheduling the next (no host/device overlap)")
    eng.add_argument("--load-format", default=None, help="auto, safetensors, gguf, orbax or dummy")
    eng.add_argument("--context-length", type=int, default=None)
    eng.add_argument("--dtype", default=None, help="weights: auto (the checkpoint's; f32 and GGUF become bfloat16 "
                     "on GPU/TPU), bfloat16, float16 or float32")
    eng.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                     help="KV pool dtype (auto: the weights' dtype)")
    eng.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS)
    eng.add_argument("--grammar-backend", default=None, choices=GRAMMAR_BACKENDS)
    eng.add_argument("--random-seed", type=int, default=None)
    return ap


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {field: getattr(args, dest) for dest, field in ENGINE_FLAGS.items() if getattr(args, dest) is not None}
    if args.disable_radix_cache:
        kw["disable_radix_cache"] = True
    if args.disable_overlap_schedule:
        kw["disable_overlap_schedule"] = True
    return kw


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    kwargs = engine_kwargs(args)
    try:
        EngineConfig.from_kwargs(**kwargs)  # flag errors now, before anything loads
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")

    import uvicorn

    from jaxradix.server import create_app

    def factory() -> Any:
        from jaxradix import Engine

        return Engine(**kwargs)

    failed = threading.Event()
    server: uvicorn.Server

    def on_ready(_: Any) -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        print(f"jaxradix {args.model_path or 'SmolLM2-135M-Instruct (embedded)'} is ready: "
              f"serving at http://{args.host}:{args.port}", flush=True)

    def on_error(_: BaseException) -> None:
        failed.set()
        server.should_exit = True

    app = create_app(factory, api_key=args.api_key, enable_metrics=args.enable_metrics,
                     served_model_name=args.served_model_name, max_request_bytes=args.max_request_bytes,
                     warmup=not args.skip_server_warmup, on_ready=on_ready, on_error=on_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_keep_alive=30))
    logger.info("starting jaxradix on http://%s:%d; the model loads in the background (/health: 503 until "
                "ready)", args.host, args.port)
    server.run()
    if failed.is_set():
        sys.exit(1)


if __name__ == "__main__":
    main()

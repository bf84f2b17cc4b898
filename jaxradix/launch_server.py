"""Launch the HTTP server: `python -m jaxradix.launch_server` (or scripts/serve.py, jaxradix-serve).

    python -m jaxradix.launch_server                       # the embedded SmolLM2-135M-Instruct
    python -m jaxradix.launch_server --model-path /path/to/hf_dir --port 30000 --enable-metrics
    python -m jaxradix.launch_server --dp-size 2 --router-policy cache_aware  # 2 replicas behind SGLang's router

Flags carry SGLang's names; engine flags left unset take EngineConfig's defaults. Every other flag of
SGLang's launch_server is accepted with a warning that it has no effect here.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any

from jaxradix.config import (
    ATTENTION_BACKENDS,
    GRAMMAR_BACKENDS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SCHEDULE_POLICIES,
    EngineConfig,
)
from jaxradix.server.data_parallel import ALL_POLICIES
from jaxradix.sglang_flags import BOOL_FLAGS, VALUE_FLAGS

TOOL_PARSERS = ("llama3", "qwen25", "qwen", "mistral")  # jaxradix.server.tool_calls.PARSERS
REASONING_PARSERS = ("qwen3", "deepseek-r1")  # jaxradix.server.reasoning.PARSERS

logger = logging.getLogger("jaxradix.server")

# flag dest -> EngineConfig field, for flags passed on only when given
ENGINE_FLAGS = {
    "model_path": "model_path", "mem_fraction_static": "mem_fraction_static",
    "max_total_tokens": "max_total_tokens", "max_running_requests": "max_running_requests",
    "chunked_prefill_size": "chunked_prefill_size", "page_size": "page_size",
    "schedule_policy": "schedule_policy", "load_format": "load_format", "context_length": "context_length",
    "dtype": "dtype", "kv_cache_dtype": "kv_cache_dtype", "attention_backend": "attention_backend",
    "quantization": "quantization",
    "grammar_backend": "grammar_backend", "hicache_size": "hicache_size", "hicache_ratio": "hicache_ratio",
    "random_seed": "random_seed", "log_level": "log_level", "tp_size": "tp_size", "nnodes": "nnodes",
    "node_rank": "node_rank", "dist_init_addr": "dist_init_addr",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model-path", "--model", default=None,
                    help="HF directory or Hugging Face model id, .gguf file or orbax checkpoint (default: the "
                    "embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--revision", default=None, help="the model id's branch, tag or commit (Hugging Face ids)")
    ap.add_argument("--tokenizer-path", default=None,
                    help="accepted for SGLang compatibility: the tokenizer is the model's own (a different path "
                    "gets a warning)")
    ap.add_argument("--chat-template", default=None,
                    help="a Jinja chat template file (or template text) replacing the tokenizer's for /v1/chat")
    ap.add_argument("--tool-call-parser", default=None, choices=TOOL_PARSERS,
                    help="how tool calls are written in the model's output (default: from the chat template)")
    ap.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                    help="split <think>...</think> into reasoning_content in /v1/chat/completions")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="accepted for SGLang compatibility: jaxradix never runs a model repository's code")
    ap.add_argument("--enable-cache-report", action="store_true",
                    help="accepted: usage.prompt_tokens_details.cached_tokens is always reported")
    ap.add_argument("--served-model-name", default=None, help="model name in the OpenAI API (default: the "
                    "model path's basename; 'default' is always accepted)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    ap.add_argument("--enable-metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    ap.add_argument("--skip-server-warmup", action="store_true", help="no warmup generation before ready")
    ap.add_argument("--max-request-bytes", type=int, default=32 << 20, help="larger bodies get 413")
    ap.add_argument("--max-prompt-chars", type=int, default=None, help="longer prompt texts get 400 before "
                    "tokenizing (default: 16 per token of context, at least 1 Mi)")
    ap.add_argument("--allow-client-chat-template", action="store_true",
                    help="honour chat_template_kwargs.chat_template sent by clients (refused by default)")
    ap.add_argument("--allowed-hosts", default=None, help="comma-separated Host header names accepted (default: "
                    "localhost, 127.0.0.1 and ::1 when --host is a loopback address, else any); '*' accepts any")
    ap.add_argument("--shutdown-timeout", type=float, default=0.0, help="on SIGTERM, seconds the requests in "
                    "flight may run on before they are aborted (default 0: abort at once)")
    ap.add_argument("--on-engine-fault", default="recover", choices=["recover", "exit"],
                    help="after a failed engine step: fail its requests and serve on, or exit with status 1")
    eng = ap.add_argument_group("engine (unset: EngineConfig's default)")
    eng.add_argument("--mem-fraction-static", type=float, default=None,
                     help="share of free accelerator memory for the KV pool (when --max-total-tokens is unset)")
    eng.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    eng.add_argument("--max-running-requests", type=int, default=None)
    eng.add_argument("--chunked-prefill-size", type=int, default=None, help="-1 disables chunking")
    eng.add_argument("--page-size", type=int, default=None)
    eng.add_argument("--schedule-policy", default=None, choices=SCHEDULE_POLICIES)
    eng.add_argument("--disable-radix-cache", action="store_true")
    eng.add_argument("--enable-hierarchical-cache", action="store_true",
                     help="evicted radix-cache prefixes move to a host-memory KV pool and load back on a hit")
    eng.add_argument("--hicache-size", type=float, default=None, help="host KV pool in GB (0: use --hicache-ratio)")
    eng.add_argument("--hicache-ratio", type=float, default=None, help="host KV pool / device KV pool (default 2)")
    eng.add_argument("--disable-overlap-schedule", action="store_true",
                     help="read each step's results before scheduling the next (no host/device overlap)")
    eng.add_argument("--load-format", default=None, help="auto, safetensors, gguf, orbax or dummy")
    eng.add_argument("--context-length", type=int, default=None)
    eng.add_argument("--dtype", default=None, help="weights: auto (the checkpoint's; f32 and GGUF become bfloat16 "
                     "on GPU/TPU), bfloat16, float16 or float32")
    eng.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                     help="KV pool dtype (auto: the weights' dtype); fp8_e4m3, fp8_e5m2 and int8 store 1-byte "
                     "values with a bf16 scale per token and head: 1.94x the tokens of bf16 at head_dim 64")
    eng.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                     help="weights on the device: int8 / fp8 (float8_e4m3fn) per output channel, quantized at "
                     "load; gguf keeps a GGUF file's Q8_0/Q4_x/Q6_K blocks (default none: dense)")
    eng.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS)
    eng.add_argument("--grammar-backend", default=None, choices=GRAMMAR_BACKENDS)
    eng.add_argument("--random-seed", type=int, default=None)
    dp = ap.add_argument_group("data parallelism: N workers behind SGLang's router (pip install -e '.[router]')")
    dp.add_argument("--dp-size", type=int, default=1, help="number of model replicas (worker processes)")
    dp.add_argument("--router-policy", default="cache_aware", choices=ALL_POLICIES,
                    help="the router's policy (cache_aware: send a request where its prefix is cached)")
    dp.add_argument("--router", default="auto", choices=("auto", "sglang_router", "smg"),
                    help="which router package runs (auto: sglang_router if installed, else smg)")
    dp.add_argument("--router-args", default="", help="more launch_router flags, e.g. \"--cache-threshold 0.5\"")
    dp.add_argument("--base-gpu-id", type=int, default=0, help="first device of replica 0")
    dp.add_argument("--gpu-id-step", type=int, default=1, help="distance between consecutive devices")
    dp.add_argument("--worker-restarts", type=int, default=2,
                    help="times a dead worker is started again (0: it is only removed from the router)")
    par = ap.add_argument_group("parallelism (SGLang's names)")
    par.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=None,
                     help="tensor parallelism over this many devices (all hosts' devices with --nnodes)")
    par.add_argument("--nnodes", type=int, default=None, help="processes (hosts) in one jax.distributed job")
    par.add_argument("--node-rank", type=int, default=None,
                     help="this process's rank; rank 0 serves HTTP and schedules, the others follow it")
    par.add_argument("--dist-init-addr", default=None, help="host:port of rank 0's coordination service")
    ignored = ap.add_argument_group("SGLang flags with no effect here (accepted with a warning)")
    known = set(ap._option_string_actions)
    for name in sorted(BOOL_FLAGS | VALUE_FLAGS):
        flag = f"--{name}"
        if flag not in known:
            ignored.add_argument(flag, dest=f"ignored__{name}", default=None, help=argparse.SUPPRESS,
                                 **({"action": "store_true"} if name in BOOL_FLAGS else {"nargs": "*"}))
    return ap


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """The SGLang flags given that jaxradix does not implement."""
    return [f"--{k.removeprefix('ignored__')}" for k, v in vars(args).items()
            if k.startswith("ignored__") and v not in (None, False)]


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The OpenAI layer's options from the flags (chat template text, tool and reasoning parsers)."""
    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    elif template is not None and "{{" not in template and "{%" not in template:
        raise ValueError(f"--chat-template {template!r}: neither a Jinja template file nor template text "
                         f"(SGLang's named templates are not supported; pass the template file)")
    return {"chat_template": template, "tool_call_parser": args.tool_call_parser,
            "reasoning_parser": args.reasoning_parser}


# flags of the launcher itself, not passed on to the workers
DP_ONLY = frozenset({"help", "host", "port", "dp_size", "router_policy", "router", "router_args", "base_gpu_id",
                     "gpu_id_step", "worker_restarts"})


def worker_argv(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The flags a worker gets: every flag given that is not the launcher's own (SGLang flags that
    jaxradix ignores are warned about once, here, and not passed on)."""
    out: list[str] = []
    for action in ap._actions:
        value = getattr(args, action.dest, None)
        if (action.dest in DP_ONLY or action.dest.startswith("ignored__") or not action.option_strings
                or value == action.default):
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            out.append(action.option_strings[0])
        elif isinstance(value, list):
            out += [action.option_strings[0], *map(str, value)]
        else:
            out += [action.option_strings[0], str(value)]
    return out


def serve_data_parallel(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from jaxradix.server.data_parallel import DataParallelConfig, DataParallelServer, RouterNotInstalled

    cfg = DataParallelConfig(
        worker_args=worker_argv(ap, args), dp_size=args.dp_size, host=args.host, port=args.port,
        router_policy=args.router_policy, router=args.router, router_args=shlex.split(args.router_args),
        tp_size=getattr(args, "tp_size", None) or 1, base_gpu_id=args.base_gpu_id, gpu_id_step=args.gpu_id_step,
        worker_restarts=args.worker_restarts, api_key=args.api_key)
    try:
        server = DataParallelServer(cfg)
    except (RouterNotInstalled, ValueError) as e:
        ap.error(str(e))

    def on_signal(signum: int, _: object) -> None:
        logger.info("signal %d: stopping the router and %d workers", signum, cfg.dp_size)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except RuntimeError as e:
        logger.error("%s", e)
        sys.exit(1)
    if server.stopping:
        sys.exit(0)
    print(f"jaxradix: {cfg.dp_size} workers behind {server.module} ({cfg.router_policy}) are ready: "
          f"serving at http://{args.host}:{args.port}", flush=True)
    code = server.wait()
    server.stop()
    sys.exit(code)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {field: getattr(args, dest) for dest, field in ENGINE_FLAGS.items() if getattr(args, dest) is not None}
    if args.disable_radix_cache:
        kw["disable_radix_cache"] = True
    if args.disable_overlap_schedule:
        kw["disable_overlap_schedule"] = True
    if args.enable_hierarchical_cache:
        kw["enable_hierarchical_cache"] = True
    return kw


SHUTDOWN_FLUSH_S = 5.0  # after the abort, time for the final chunks to reach the clients


def allowed_hosts(args: argparse.Namespace) -> frozenset[str] | None:
    if args.allowed_hosts is not None:
        names = frozenset(h.strip().lower().strip("[]") for h in args.allowed_hosts.split(",") if h.strip())
        return None if "*" in names else names
    from jaxradix.server.app import LOOPBACK_HOSTS

    return LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS else None


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": not needed here
    ap = build_parser()
    args = ap.parse_args(argv)
    kwargs = engine_kwargs(args)
    try:
        EngineConfig.from_kwargs(**kwargs)  # flag errors now, before anything loads
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    if args.dp_size < 1:
        ap.error(f"--dp-size: must be >= 1, got {args.dp_size}")
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    for flag in ignored_flags(args):
        logger.warning("%s is an SGLang flag with no meaning in jaxradix: ignored", flag)
    if args.tokenizer_path is not None and args.tokenizer_path != args.model_path:
        logger.warning("--tokenizer-path %s: ignored; the tokenizer is loaded with the model from --model-path",
                       args.tokenizer_path)
    if args.revision is not None:
        if args.model_path is None:
            ap.error("--revision needs --model-path (a Hugging Face model id)")
        from jaxradix.models.hub import resolve_model_path

        try:
            kwargs["model_path"] = str(resolve_model_path(args.model_path, args.revision))
        except (ValueError, FileNotFoundError) as e:
            ap.error(str(e))
    try:
        options = server_options(args)
    except ValueError as e:
        ap.error(str(e))
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Failed to open libtpu.so" on CPU
    if args.dp_size > 1:
        serve_data_parallel(ap, args)
        return
    if (args.node_rank or 0) > 0:
        sys.exit(follow(kwargs))

    import uvicorn

    from jaxradix.server import create_app
    from jaxradix.server.app import begin_shutdown

    def factory() -> Any:
        from jaxradix import Engine

        engine = Engine(**kwargs)
        if engine.channel is not None:  # multi-host: a lost rank stops the engine, then the server
            threading.Thread(target=watch, args=(engine,), daemon=True).start()
        return engine

    def watch(engine: Any) -> None:
        try:
            engine.join()
        except RuntimeError as e:
            logger.error("stopping the server: %s", e)
            failed.set()
            server.should_exit = True

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
                     warmup=not args.skip_server_warmup, on_ready=on_ready, on_error=on_error,
                     max_prompt_chars=args.max_prompt_chars, allow_client_chat_template=args.allow_client_chat_template,
                     allowed_hosts=allowed_hosts(args), on_engine_fault=args.on_engine_fault)
    app.state.server.configure(**options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGINT / SIGTERM
            super().handle_exit(sig, frame)
            begin_shutdown(app.state.server, args.shutdown_timeout)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_keep_alive=30,
                                   timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_FLUSH_S))
    logger.info("starting jaxradix on http://%s:%d; the model loads in the background (/health: 503 until "
                "ready)", args.host, args.port)
    server.run()
    if failed.is_set():
        if (args.nnodes or 1) > 1:
            logging.shutdown()
            os._exit(1)  # a lost rank: jax.distributed's shutdown barrier would wait for it
        sys.exit(1)


def follow(kwargs: dict[str, Any]) -> int:
    """Ranks > 0 of a multi-host job: no HTTP server; replay rank 0's steps until it stops."""
    from jaxradix import Engine

    engine = Engine(**kwargs)
    logger.info("rank %d ready: following rank 0", kwargs["node_rank"])
    try:
        engine.join()
    except RuntimeError as e:
        logger.error("rank %d stopped: %s", kwargs["node_rank"], e)
        logging.shutdown()
        os._exit(1)  # rank 0 is gone: jax.distributed's shutdown barrier would wait for it
    return 0


if __name__ == "__main__":
    main()

import gc
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# 8 fake CPU devices for the tensor-parallel tests, set before JAX initialises (one device is
# still the default placement: single-device engines are unaffected).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One compilation cache per test session: engines with the same shapes compile once.
os.environ.setdefault("JAXRADIX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "jaxradix-test-jax-cache"))

# Small engines: few buckets, so start-up compiles stay short on a 2-core CI machine.
SMALL = dict(max_running_requests=8, chunked_prefill_size=64, max_total_tokens=4096, page_size=16,
             context_length=1024, log_level="warning")

_engines: dict = {}
_release_after_test: set = set()


def get_engine(*, release: str = "module", **overrides):
    """Engines are shared across test modules (one per configuration) and checked for leaks.
    release="test": a one-off configuration, shut down right after this test's leak check (each engine
    of the embedded model holds ~2 GB of weights, pool and compiled steps; a module that kept eight alive
    took the suite to 22.7 of the CI machine's 24 GB)."""
    from jaxradix import Engine

    cfg = SMALL | overrides
    key = tuple(sorted(cfg.items()))
    if key not in _engines:
        _engines[key] = Engine(**cfg)
    if release == "test":
        _release_after_test.add(key)
    return _engines[key]


@pytest.fixture(scope="session", autouse=True)
def _shutdown_engines():
    yield
    for e in _engines.values():
        e.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _release_module_engines():
    """After each module, shut down and drop every shared engine but the default one: each engine holds
    its own weights, KV pool and compiled steps, and keeping all of them alive took one process past
    20 GB (the CI machine has 24). A later module asking for the same configuration builds it again
    from the persistent compilation cache."""
    yield
    default = tuple(sorted(SMALL.items()))
    for key in [k for k in _engines if k != default]:
        _engines.pop(key).shutdown()
    gc.collect()


@pytest.fixture(autouse=True)
def _integrity_after_each_test():
    """The leak invariant, after every test: free + evictable + locked == pool, every slot free."""
    yield
    for e in _engines.values():
        e.wait_idle(timeout=120)
        e.check_integrity()
    if _release_after_test:
        for key in _release_after_test:
            if key in _engines:
                _engines.pop(key).shutdown()
        _release_after_test.clear()
        gc.collect()


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free 127.0.0.1 port in a background thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

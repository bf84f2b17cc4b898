import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# One compilation cache per test session: engines with the same shapes compile once.
os.environ.setdefault("JAXRADIX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "jaxradix-test-jax-cache"))

# Small engines: few buckets, so start-up compiles stay short on a 2-core CI machine.
SMALL = dict(max_running_requests=8, chunked_prefill_size=64, max_total_tokens=4096, page_size=16,
             context_length=1024, log_level="warning")

_engines: dict = {}


def get_engine(**overrides):
    """Engines are shared across test modules (one per configuration) and checked for leaks."""
    from jaxradix import Engine

    cfg = SMALL | overrides
    key = tuple(sorted(cfg.items()))
    if key not in _engines:
        _engines[key] = Engine(**cfg)
    return _engines[key]


@pytest.fixture(scope="session", autouse=True)
def _shutdown_engines():
    yield
    for e in _engines.values():
        e.shutdown()


@pytest.fixture(autouse=True)
def _integrity_after_each_test():
    """The leak invariant, after every test: free + evictable + locked == pool, every slot free."""
    yield
    for e in _engines.values():
        e.wait_idle(timeout=120)
        e.check_integrity()

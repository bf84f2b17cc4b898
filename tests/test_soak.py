"""A live server process on loopback: a short scripts/soak.py run (no lost request, no growth, no leak),
then SIGTERM with long streams in flight must end them with finish reason abort and exit promptly.

The soak runs SOAK_SECONDS here (the issue's 3 minutes do not fit the suite's budget); longer runs are
`python scripts/soak.py --duration 3600` against `make serve` (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
SOAK_SECONDS = 15
SHUTDOWN_TIMEOUT = 1.0  # --shutdown-timeout: how long streams may run on after SIGTERM
EXIT_WITHIN = 15.0  # the process's exit after SIGTERM, aborts and engine shutdown included


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    flags = ["--max-running-requests", str(SMALL["max_running_requests"]),
             "--chunked-prefill-size", str(SMALL["chunked_prefill_size"]),
             "--max-total-tokens", str(SMALL["max_total_tokens"]), "--page-size", str(SMALL["page_size"]),
             "--context-length", str(SMALL["context_length"])]
    proc = subprocess.Popen([sys.executable, "-m", "jaxradix.launch_server", "--port", str(port), "--log-level",
                             "warning", "--skip-server-warmup", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None, "server exited at start-up:\n" + "".join(log[-40:])
            assert time.monotonic() < deadline, "server did not become healthy:\n" + "".join(log[-40:])
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_soak_short_run(server):
    _, url, log = server
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--url", url, "--duration",
                        str(SOAK_SECONDS), "--interval", "10", "--rate", "4", "--concurrency", "12",
                        "--max-tokens", "16", "--request-timeout", "90"], capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(log[-40:])
    assert "soak: OK" in r.stdout and "lost: 0" in r.stdout


def test_sigterm_aborts_long_streams_and_exits_within_the_grace_period(server):
    proc, url, _ = server
    results: list[list[dict]] = [[] for _ in range(3)]

    def stream(i: int) -> None:
        body = {"prompt": f"Story {i}:", "max_tokens": 900, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        results[i].append(json.loads(line[6:]))
        except httpx.TransportError:
            pass

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(results) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(results), "the streams did not start"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.monotonic() - t0
    for t in threads:
        t.join(timeout=30)
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after SIGTERM"
    for events in results:
        assert events[-1]["choices"][0]["finish_reason"] == "abort", events[-1]
        assert sum(1 for e in events if e["choices"][0]["text"]) < 900

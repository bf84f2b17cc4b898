"""Data parallelism: two jaxradix worker processes behind SGLang's real router (sglang-router / smg).

The module starts the workers once (scripts/serve.py's --dp-size launcher, fake CPU devices 1 and 2 of
4), with a round-robin router started by hand before they were healthy. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from jaxradix.launch_server import build_parser, main, worker_argv
from jaxradix.server import data_parallel as dp
from jaxradix.server.data_parallel import (
    DataParallelConfig,
    DataParallelServer,
    free_port,
    http_json,
    plan_devices,
    start_router,
    wait_router_ready,
    worker_env,
)

WORKER_ARGS = ["--max-total-tokens", "4096", "--max-running-requests", "8", "--chunked-prefill-size", "64",
               "--page-size", "16", "--context-length", "1024", "--log-level", "warning", "--enable-metrics"]


# ------------------------------------------------------------------------------------- no processes

def test_device_subsets_follow_sglang_numbering() -> None:
    assert plan_devices(2) == [(0,), (1,)]
    assert plan_devices(2, tp_size=2, base_gpu_id=1) == [(1, 2), (3, 4)]
    assert plan_devices(2, tp_size=2, base_gpu_id=0, gpu_id_step=2, available=8) == [(0, 2), (4, 6)]
    with pytest.raises(ValueError, match="base-gpu-id.*need device 4.*has 4"):
        plan_devices(2, tp_size=2, base_gpu_id=1, available=4)
    with pytest.raises(ValueError, match="dp-size: must be >= 1"):
        plan_devices(0)


def test_worker_sees_only_its_devices() -> None:
    cpu = worker_env("cpu", (1, 2), 1, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo"})
    assert cpu["XLA_FLAGS"].split() == ["--xla_foo", "--xla_force_host_platform_device_count=2"]
    assert (cpu[dp.DP_RANK_ENV], cpu[dp.DEVICE_IDS_ENV], cpu["JAX_PLATFORMS"]) == ("1", "1,2", "cpu")
    gpu = worker_env("gpu", (1, 2), 0, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert (gpu["CUDA_VISIBLE_DEVICES"], gpu["JAX_PLATFORMS"]) == ("5,6", "cuda")
    assert worker_env("gpu", (3,), 0, {})["CUDA_VISIBLE_DEVICES"] == "3"
    tpu = worker_env("tpu", (2,), 2, {})
    assert (tpu["TPU_VISIBLE_CHIPS"], tpu["TPU_CHIPS_PER_PROCESS_BOUNDS"]) == ("2", "1,1,1")
    assert dp.available_devices("cpu", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) == 4
    assert dp.available_devices("cpu", {}) is None  # each CPU worker has its own host device


def test_workers_get_every_flag_but_the_launchers() -> None:
    ap = build_parser()
    args = ap.parse_args(["--dp-size", "3", "--port", "9", "--host", "0.0.0.0", "--router-policy", "round_robin",
                          "--base-gpu-id", "2", "--max-total-tokens", "4096", "--enable-metrics", "--api-key", "k"])
    assert worker_argv(ap, args) == ["--api-key", "k", "--enable-metrics", "--max-total-tokens", "4096"]


def test_missing_router_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = dp.importlib.util.find_spec
    monkeypatch.setattr(dp.importlib.util, "find_spec",
                        lambda name, *a: None if name in dp.ROUTER_POLICIES else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["--dp-size", "2"])
    assert e.value.code == 2 and "pip install -e '.[router]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dp-size", "0"])
    assert "--dp-size: must be >= 1" in capsys.readouterr().err


def test_policy_the_router_lacks_is_refused() -> None:
    cfg = DataParallelConfig(worker_args=[], dp_size=2, router="sglang_router", router_policy="least_load")
    with pytest.raises(ValueError, match="router-policy: sglang_router takes"):
        DataParallelServer(cfg)


# ------------------------------------------------------------------------------------- processes

@dataclass
class Cluster:
    server: DataParallelServer
    early: dp.ManagedProcess  # round robin, started before the workers were healthy
    early_url: str

    @property
    def worker_urls(self) -> list[str]:
        return [w.url for w in self.server.workers]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    ports = [free_port(), free_port()]
    early_port = free_port()
    early_url = f"http://127.0.0.1:{early_port}"
    early = start_router("sglang_router", [f"http://127.0.0.1:{p}" for p in ports], "round_robin", "127.0.0.1",
                         early_port, echo=False)
    deadline = time.monotonic() + 60
    while http_json("GET", f"{early_url}/liveness", timeout=2)[0] != 200:
        assert time.monotonic() < deadline and early.exit_code() is None, early.last_lines()
        time.sleep(0.2)
    # no worker yet: the router answers at once (503), it does not hold the request
    t0 = time.monotonic()
    status, _ = http_json("POST", f"{early_url}/generate", {"text": "hi"}, timeout=30)
    assert status == 503 and time.monotonic() - t0 < 10

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = DataParallelServer(DataParallelConfig(
            worker_args=WORKER_ARGS, dp_size=2, port=free_port(), base_gpu_id=1, worker_ports=ports,
            router="sglang_router", router_policy="cache_aware", worker_restarts=0, echo=False))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        server.start()
        yield Cluster(server, early, early_url)
    finally:
        early.stop()
        server.stop()
        assert server.router is not None and server.router.exit_code() is not None
        assert all(w.process.exit_code() is not None for w in server.workers)


def generate(url: str, text: str, max_new_tokens: int = 1, **kw: object) -> tuple[int, dict]:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}, **kw}
    return http_json("POST", f"{url}/generate", body, timeout=120)


def sse_events(url: str, body: dict) -> list[str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]


def test_each_worker_reports_its_device_subset(cluster: Cluster) -> None:
    infos = [http_json("GET", f"{u}/get_server_info")[1] for u in cluster.worker_urls]
    assert [(i["dp_rank"], i["device_ids"], i["dp_size"]) for i in infos] == [(0, [1], 1), (1, [2], 1)]
    assert all(i["model_path"] for i in infos)  # what the router registers the worker under


@pytest.mark.parametrize("module", ["sglang_router", "smg"])
def test_every_route_the_router_calls_works(cluster: Cluster, module: str) -> None:
    if module == "smg":  # smg in front of the same workers
        port = free_port()
        proc = start_router("smg", cluster.worker_urls, "cache_aware", "127.0.0.1", port, echo=False,
                            extra=["--health-check-interval-secs", "1"])  # it lists loads of healthy workers
        url = f"http://127.0.0.1:{port}"
    else:
        proc, url = None, cluster.server.url
    try:
        if proc is not None:
            wait_router_ready(proc, url, min_workers=2)
        status, out = generate(url, "The capital of France is", 4)
        assert status == 200 and out["meta_info"]["completion_tokens"] == 4 and out["text"]
        events = sse_events(f"{url}/generate", {"text": "Hello", "stream": True,
                                                "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
        assert events[-1] == "[DONE]" and json.loads(events[-2])["meta_info"]["completion_tokens"] == 3
        status, out = http_json("GET", f"{url}/v1/models")
        assert status == 200
        model = out["data"][0]["id"]  # smg routes OpenAI requests by model name: use the served one
        status, out = http_json("POST", f"{url}/v1/completions",
                                {"model": model, "prompt": "One, two,", "max_tokens": 3, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] == 3
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        status, out = http_json("POST", f"{url}/v1/chat/completions", chat)
        assert status == 200 and out["choices"][0]["message"]["content"]
        events = sse_events(f"{url}/v1/chat/completions", {**chat, "stream": True})
        assert events[-1] == "[DONE]" and len(events) >= 3
        status, out = http_json("POST", f"{url}/flush_cache")
        assert status == 200 and out["workers_flushed"] == 2
        deadline = time.monotonic() + 30
        while True:  # the router reads each worker's load route (smg lists a worker once it is ready)
            status, out = http_json("GET", f"{url}/get_loads")
            assert status == 200
            loads = [x.get("load", x.get("num_used_tokens", -1)) for x in out.get("workers", out.get("loads"))]
            if len(loads) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(loads) == 2 and min(loads) >= 0, out
        status, out = http_json("GET", f"{url}/readiness")
        assert status == 200 and out["healthy_workers"] == 2
    finally:
        if proc is not None:
            proc.stop()


def multi_tenant_prompts(tenants: int = 4, per_tenant: int = 16, system_words: int = 200) -> list[str]:
    """Interleaved tenants 0, 1, 2, 3, 0, 1, ...: each with a long system prompt, short questions."""
    rng = random.Random(0)
    vocab = "the of and to in is was for it with as his on be at by had are but from or have an they".split()
    systems = [f"Tenant {k} rules: " + " ".join(rng.choice(vocab) for _ in range(system_words))
               for k in range(tenants)]
    return [f"{systems[k]}\nQ{i}: {rng.choice(vocab)} {rng.choice(vocab)}?" for i in range(per_tenant)
            for k in range(tenants)]


def prefill_tokens(router_url: str, worker_urls: list[str], prompts: list[str]) -> tuple[int, list[int]]:
    """Prompt tokens computed across the workers for `prompts` sent through the router (caches flushed
    first), and how many requests each worker served."""
    for u in worker_urls:
        assert http_json("POST", f"{u}/flush_cache")[0] == 200
    before = [http_json("GET", f"{u}/get_server_info")[1]["stats"] for u in worker_urls]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generate(router_url, p), prompts))
    assert [s for s, _ in results] == [200] * len(prompts)
    after = [http_json("GET", f"{u}/get_server_info")[1]["stats"] for u in worker_urls]
    for u in worker_urls:  # each worker's no-leak invariant
        assert http_json("POST", f"{u}/debug/check_integrity")[1]["ok"] is True
    return (sum(a["prefill_tokens"] - b["prefill_tokens"] for a, b in zip(after, before, strict=True)),
            [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)])


def test_cache_aware_computes_far_fewer_prefill_tokens_than_round_robin(cluster: Cluster) -> None:
    prompts = multi_tenant_prompts()
    wait_router_ready(cluster.early, cluster.early_url, min_workers=2)  # it found the late workers
    aware, aware_split = prefill_tokens(cluster.server.url, cluster.worker_urls, prompts)
    robin, robin_split = prefill_tokens(cluster.early_url, cluster.worker_urls, prompts)
    print(f"prefill tokens computed: cache_aware {aware} {aware_split}, round_robin {robin} {robin_split}")
    assert robin_split == [32, 32]
    assert min(aware_split) >= 16  # tenants spread over both workers, not piled on one
    # each system prompt once in all (cache_aware) vs once per worker (round robin)
    assert aware < 0.75 * robin, (aware, robin)


def test_a_worker_down_at_startup_is_skipped(cluster: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    proc = start_router("sglang_router", [cluster.worker_urls[0], dead], "round_robin", "127.0.0.1", port,
                        echo=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_router_ready(proc, url, min_workers=1)
        t0 = time.monotonic()
        assert [generate(url, f"Count: {i}")[0] for i in range(4)] == [200] * 4
        assert time.monotonic() - t0 < 60
    finally:
        proc.stop()


def test_a_worker_killed_mid_run_is_removed_and_nothing_hangs(cluster: Cluster) -> None:
    server = cluster.server
    victim = server.workers[1]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, server.url, f"Story {i}: once upon a time", 24)
                   for i in range(8)]
        deadline = time.monotonic() + 60
        while (http_json("GET", f"{victim.url}/get_load")[1] or [{}])[0].get("num_reqs", 0) == 0:
            assert time.monotonic() < deadline, "no request reached worker 1"
            time.sleep(0.05)
        os.kill(victim.process.pid, signal.SIGKILL)  # with requests running on it
        results = [f.result(timeout=180) for f in futures]
    # in-flight requests on the dead worker are retried on the other one by the router
    for status, out in results:
        assert status == 200 or "error" in out, (status, out)
    assert sum(s == 200 for s, _ in results) >= 4
    deadline = time.monotonic() + 30
    while not any(e.rank == 1 and e.kind == "removed" for e in server.events):
        assert time.monotonic() < deadline, server.events
        time.sleep(0.2)
    assert any(e.rank == 1 and e.kind == "died" for e in server.events)
    while victim.url in (listed := [w["url"] for w in http_json("GET", f"{server.url}/workers")[1]["workers"]]):
        assert time.monotonic() < deadline + 15, listed  # the router removes it in the background
        time.sleep(0.2)
    assert listed == [server.workers[0].url]
    assert generate(server.url, "Still there?")[0] == 200


def test_workers_that_cannot_start_are_reported(tmp_path: os.PathLike) -> None:
    missing = os.path.join(tmp_path, "no-such-model.gguf")
    server = DataParallelServer(DataParallelConfig(worker_args=["--model-path", missing], dp_size=1,
                                                   port=free_port(), worker_restarts=0, echo=False))
    with pytest.raises(RuntimeError, match=r"no worker became healthy:\nworker 0 .*exited with code 1"):
        server.start()
    assert server.router is None and server.workers[0].process.exit_code() == 1

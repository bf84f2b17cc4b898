"""Data parallelism: N jaxradix workers, each on its own device subset, behind SGLang's own router.

    python scripts/serve.py --dp-size 2 --router-policy cache_aware --port 30000

The router (`sglang-router` or `smg`, `pip install -e '.[router]'`) is a separate Rust process that
keeps an approximate radix tree per worker and sends each request where its prefix most likely
lives. jaxradix grows no router of its own: this module only starts the workers, waits for them,
starts the router in front of them, and watches both. A worker that dies is reported, removed from
the router (DELETE /workers/{id}) and, while restarts are left, started again and added back
(POST /workers). Stopping the launcher stops the router first, then every worker.

Device subsets follow SGLang's numbering: replica r, shard j uses device
`base_gpu_id + (r * tp_size + j) * gpu_id_step`. A GPU worker sees only its devices
(CUDA_VISIBLE_DEVICES), a TPU worker its chips (TPU_VISIBLE_CHIPS), a CPU worker as many host
devices as its subset holds (XLA_FLAGS); each worker reports its ids in /get_server_info.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger("jaxradix.dp")

# module -> the policies its launch_router accepts (both also take "manual")
ROUTER_POLICIES: dict[str, tuple[str, ...]] = {
    "sglang_router": ("cache_aware", "round_robin", "random", "power_of_two"),
    "smg": ("cache_aware", "round_robin", "random", "power_of_two", "least_load", "consistent_hashing",
            "prefix_hash"),
}
ALL_POLICIES = tuple(dict.fromkeys(p for ps in ROUTER_POLICIES.values() for p in ps))
INSTALL_HINT = "install SGLang's router: pip install -e '.[router]'  (or: pip install sglang-router smg)"
DP_RANK_ENV, DEVICE_IDS_ENV = "JAXRADIX_DP_RANK", "JAXRADIX_DEVICE_IDS"
FORCE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


class RouterNotInstalled(RuntimeError):
    pass


def worker_identity() -> dict[str, Any]:
    """What a worker started by this launcher reports about itself (empty for a plain server)."""
    out: dict[str, Any] = {}
    if DP_RANK_ENV in os.environ:
        out["dp_rank"] = int(os.environ[DP_RANK_ENV])
    if DEVICE_IDS_ENV in os.environ:
        out["device_ids"] = [int(x) for x in os.environ[DEVICE_IDS_ENV].split(",") if x]
    return out


def find_router(prefer: str = "auto") -> str:
    """The router module to run: `prefer` if given, else sglang_router, else smg."""
    names = list(ROUTER_POLICIES) if prefer == "auto" else [prefer]
    if prefer != "auto" and prefer not in ROUTER_POLICIES:
        raise ValueError(f"router: must be auto or one of {list(ROUTER_POLICIES)}, got {prefer!r}")
    for name in names:
        if importlib.util.find_spec(name) is not None:
            return name
    raise RouterNotInstalled(f"--dp-size > 1 runs SGLang's router in front of the workers, and "
                             f"{' / '.join(names)} is not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------- devices

def detect_platform(env: dict[str, str] | None = None) -> str:
    """cpu | gpu | tpu, without initializing JAX here (a GPU client would take the memory)."""
    env = os.environ if env is None else env
    wanted = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if wanted:
        return {"cuda": "gpu", "rocm": "gpu"}.get(wanted, wanted)
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return "gpu"
    return "cpu"


def available_devices(platform: str, env: dict[str, str] | None = None) -> int | None:
    """How many devices this machine offers to the workers; None when unknown or unlimited (CPU
    workers without forced host devices each get their own host device)."""
    env = os.environ if env is None else env
    if platform == "cpu":
        m = FORCE_COUNT.search(env.get("XLA_FLAGS", ""))
        return int(m.group(1)) if m else None
    if platform == "gpu":
        if env.get("CUDA_VISIBLE_DEVICES"):
            return len(env["CUDA_VISIBLE_DEVICES"].split(","))
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
                return sum(1 for line in out.splitlines() if line.startswith("GPU "))
            except (OSError, subprocess.SubprocessError):
                return None
    return None


def plan_devices(dp_size: int, tp_size: int = 1, base_gpu_id: int = 0, gpu_id_step: int = 1,
                 available: int | None = None) -> list[tuple[int, ...]]:
    """Device ids of each replica, SGLang's rule: base_gpu_id + (rank * tp_size + j) * gpu_id_step."""
    for name, value, low in (("dp_size", dp_size, 1), ("tp_size", tp_size, 1), ("base_gpu_id", base_gpu_id, 0),
                             ("gpu_id_step", gpu_id_step, 1)):
        if value < low:
            raise ValueError(f"{name.replace('_', '-')}: must be >= {low}, got {value}")
    plan = [tuple(base_gpu_id + (r * tp_size + j) * gpu_id_step for j in range(tp_size)) for r in range(dp_size)]
    last = plan[-1][-1]
    if available is not None and last >= available:
        raise ValueError(f"base-gpu-id: {dp_size} replicas x {tp_size} devices from device {base_gpu_id} "
                         f"(step {gpu_id_step}) need device {last}, but this machine has {available} "
                         f"(ids 0..{available - 1})")
    return plan


def worker_env(platform: str, device_ids: Sequence[int], rank: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of one worker: only its own devices visible."""
    env = dict(base)
    ids = ",".join(str(i) for i in device_ids)
    env[DP_RANK_ENV], env[DEVICE_IDS_ENV] = str(rank), ids
    if platform == "gpu":
        parent = [x for x in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if x]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(parent[i] for i in device_ids) if parent else ids
        env.setdefault("JAX_PLATFORMS", "cuda")  # never fall back to the CPU silently
    elif platform == "tpu":
        # one process per chip subset on a TPU VM; each process gets its own mesh controller port
        port = str(8476 + rank)
        env.update(TPU_VISIBLE_CHIPS=ids, TPU_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_PORT=port,
                   TPU_MESH_CONTROLLER_ADDRESS=f"localhost:{port}", TPU_MESH_CONTROLLER_PORT=port)
        if len(device_ids) == 1:
            env["TPU_CHIPS_PER_PROCESS_BOUNDS"] = "1,1,1"
    else:
        flag = f"--xla_force_host_platform_device_count={len(device_ids)}"
        flags = FORCE_COUNT.sub("", base.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} {flag}".strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


# ---------------------------------------------------------------------------------------- HTTP

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0,
              api_key: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text); status 0 when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# ---------------------------------------------------------------------------------------- processes

@dataclass
class ManagedProcess:
    """A child process whose output is echoed with a prefix and whose last lines are kept."""

    name: str
    argv: list[str]
    env: dict[str, str]
    echo: bool = True
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    def start(self) -> None:
        self.tail.clear()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc,), name=f"{self.name}-log", daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self.echo:
                print(f"[{self.name}] {line}", flush=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def last_lines(self, n: int = 8) -> str:
        return "\n".join(list(self.tail)[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            proc.kill()
            proc.wait(10)


def start_router(module: str, worker_urls: Sequence[str], policy: str, host: str, port: int, *,
                 api_key: str | None = None, extra: Sequence[str] = (), echo: bool = True) -> ManagedProcess:
    """SGLang's router (module sglang_router or smg) in front of `worker_urls`; its own metrics port
    stays on loopback unless `extra` says otherwise (later flags win)."""
    argv = [sys.executable, "-m", f"{module}.launch_router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--health-check-interval-secs", "5", "--log-level", "warn"]
    if api_key:
        argv += ["--api-key", api_key]
    proc = ManagedProcess("router", argv + list(extra), dict(os.environ), echo=echo)
    proc.start()
    return proc


def wait_router_ready(router: ManagedProcess, url: str, timeout: float = 120.0, min_workers: int = 1,
                      api_key: str | None = None) -> None:
    """Until the router answers /readiness 200 (at least `min_workers` healthy workers)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_json("GET", f"{url}/readiness", timeout=5, api_key=api_key)
        if status == 200 and isinstance(body, dict) and body.get("healthy_workers", 0) >= min_workers:
            return
        if router.exit_code() is not None:
            raise RuntimeError(f"the router exited with code {router.exit_code()}:\n{router.last_lines()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router at {url} was not ready after {timeout:.0f} s: {status} {body}")
        time.sleep(0.3)


@dataclass
class Worker:
    rank: int
    url: str
    device_ids: tuple[int, ...]
    process: ManagedProcess
    restarts: int = 0
    in_router: bool = False
    exit_handled: bool = False  # its current exit was reported (and a restart, if any, begun)


EventKind = Literal["started", "healthy", "died", "removed", "restarted", "added", "add_failed"]


@dataclass(frozen=True)
class WorkerEvent:
    """Something that happened to a worker, or that the launcher did about it."""

    rank: int
    url: str
    kind: EventKind
    detail: str = ""


@dataclass
class DataParallelConfig:
    worker_args: list[str]  # launch_server flags every worker gets (never --host/--port)
    dp_size: int
    host: str = "127.0.0.1"
    port: int = 30000
    router_policy: str = "cache_aware"
    router: str = "auto"  # auto | sglang_router | smg
    router_args: list[str] = field(default_factory=list)  # extra launch_router flags, given last
    tp_size: int = 1
    base_gpu_id: int = 0
    gpu_id_step: int = 1
    platform: str | None = None  # None: detect
    worker_ports: list[int] | None = None  # None: free ports on 127.0.0.1
    worker_restarts: int = 2  # per worker; 0: a dead worker is only removed
    startup_timeout: float = 1800.0
    api_key: str | None = None
    echo: bool = True  # print children's output with a [worker r] / [router] prefix


class DataParallelServer:
    """N workers + the router. start() returns once the router answers; stop() ends all of them."""

    def __init__(self, cfg: DataParallelConfig, on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.cfg = cfg
        self.module = find_router(cfg.router)
        if cfg.router_policy not in ROUTER_POLICIES[self.module]:
            raise ValueError(f"router-policy: {self.module} takes {list(ROUTER_POLICIES[self.module])}, "
                             f"got {cfg.router_policy!r}")
        self.platform = cfg.platform or detect_platform()
        plan = plan_devices(cfg.dp_size, cfg.tp_size, cfg.base_gpu_id, cfg.gpu_id_step,
                            available_devices(self.platform))
        ports = cfg.worker_ports or [free_port() for _ in range(cfg.dp_size)]
        if len(ports) != cfg.dp_size:
            raise ValueError(f"worker_ports: {len(ports)} given for dp-size {cfg.dp_size}")
        self.workers = []
        for rank, (ids, port) in enumerate(zip(plan, ports, strict=True)):
            argv = [sys.executable, "-m", "jaxradix.launch_server", *cfg.worker_args,
                    "--host", "127.0.0.1", "--port", str(port)]
            proc = ManagedProcess(f"worker {rank}", argv, worker_env(self.platform, ids, rank, dict(os.environ)),
                                  echo=cfg.echo)
            self.workers.append(Worker(rank, f"http://127.0.0.1:{port}", ids, proc))
        self.url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        self.router: ManagedProcess | None = None
        self.events: list[WorkerEvent] = []
        self._on_event = on_event
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        try:
            for w in self.workers:
                w.process.start()
                self._event(w, "started", f"pid {w.process.pid}, devices {list(w.device_ids)} ({self.platform})")
            healthy = self._wait_healthy(self.workers, self.cfg.startup_timeout)
            if self._stopping.is_set():  # stop() during start-up (Ctrl-C): nothing more to start
                return
            if not healthy:
                raise RuntimeError("no worker became healthy:\n" + "\n".join(
                    f"worker {w.rank} ({w.url}): {e.detail}" for w in self.workers for e in self.events
                    if e.rank == w.rank and e.kind == "died"))
            self._start_router(healthy)
        except BaseException:
            self.stop()
            raise
        for w in self.workers:
            if w not in healthy and self.cfg.worker_restarts > 0:
                threading.Thread(target=self._restart, args=(w,), daemon=True).start()
        self._monitor = threading.Thread(target=self._watch, name="jaxradix-dp-monitor", daemon=True)
        self._monitor.start()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Router first (no new requests reach a stopping worker), then every worker."""
        self._stopping.set()
        if self.router is not None:
            self.router.stop(timeout=15)
        for w in self.workers:
            w.process.stop()

    def wait(self) -> int:
        """Block until the router exits or stop() is called; the exit status to use."""
        while not self._stopping.is_set():
            if self.router is not None and self.router.exit_code() is not None:
                logger.error("the router exited with code %s:\n%s", self.router.exit_code(),
                             self.router.last_lines())
                return 1
            time.sleep(0.5)
        return 0

    def __enter__(self) -> DataParallelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- router

    def _start_router(self, healthy: list[Worker]) -> None:
        cfg = self.cfg
        self.router = start_router(self.module, [w.url for w in healthy], cfg.router_policy, cfg.host, cfg.port,
                                   api_key=cfg.api_key, extra=cfg.router_args, echo=cfg.echo)
        wait_router_ready(self.router, self.url, min_workers=len(healthy), api_key=cfg.api_key)
        for w in healthy:
            w.in_router = True
            self._event(w, "added", f"behind {self.module} ({cfg.router_policy}) at {self.url}")

    def _router_worker_id(self, url: str) -> str | None:
        status, body = http_json("GET", f"{self.url}/workers", timeout=10, api_key=self.cfg.api_key)
        if status != 200 or not isinstance(body, dict):
            return None
        return next((w.get("id") for w in body.get("workers", []) if w.get("url") == url), None)

    def _remove_from_router(self, w: Worker) -> None:
        wid = self._router_worker_id(w.url)
        status = 0
        if wid is not None:
            status, _ = http_json("DELETE", f"{self.url}/workers/{urllib.parse.quote(wid)}", timeout=10,
                                  api_key=self.cfg.api_key)
        w.in_router = False
        self._event(w, "removed", f"router answered {status}" if wid else "the router no longer lists it")

    def _add_to_router(self, w: Worker) -> None:
        status, body = http_json("POST", f"{self.url}/workers", {"url": w.url}, timeout=10,
                                 api_key=self.cfg.api_key)
        w.in_router = status in (200, 201, 202)
        self._event(w, "added" if w.in_router else "add_failed", f"router answered {status}: {body}")

    # -- workers

    def _wait_healthy(self, workers: list[Worker], timeout: float) -> list[Worker]:
        """Those of `workers` that answer /health 200 in time; the others are reported dead."""
        pending, healthy = list(workers), []
        deadline = time.monotonic() + timeout
        while pending and not self._stopping.is_set():
            for w in list(pending):
                if self._stopping.is_set():
                    break
                code = w.process.exit_code()
                if code is not None:
                    pending.remove(w)
                    w.exit_handled = True
                    self._event(w, "died", f"exited with code {code} while starting:\n{w.process.last_lines()}")
                elif http_json("GET", f"{w.url}/health", timeout=2, api_key=self.cfg.api_key)[0] == 200:
                    pending.remove(w)
                    healthy.append(w)
                    self._event(w, "healthy")
            if pending and time.monotonic() > deadline:
                for w in pending:
                    w.exit_handled = True
                    self._event(w, "died", f"not healthy after {timeout:.0f} s; stopping it")
                    w.process.stop()
                break
            if pending:
                time.sleep(0.5)
        return healthy

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for w in self.workers:
                code = w.process.exit_code()
                if code is None or w.exit_handled or self._stopping.is_set():
                    continue
                w.exit_handled = True
                self._event(w, "died", f"exited with code {code}:\n{w.process.last_lines()}")
                if w.in_router:
                    self._remove_from_router(w)
                if w.restarts < self.cfg.worker_restarts:
                    threading.Thread(target=self._restart, args=(w,), daemon=True).start()

    def _restart(self, w: Worker) -> None:
        """Start a dead worker again (up to worker_restarts times) and add it back to the router."""
        while w.restarts < self.cfg.worker_restarts and not self._stopping.is_set():
            w.restarts += 1
            w.process.start()
            self._event(w, "restarted", f"restart {w.restarts} of {self.cfg.worker_restarts}, "
                                        f"pid {w.process.pid}")
            if self._wait_healthy([w], self.cfg.startup_timeout) and not self._stopping.is_set():
                self._add_to_router(w)
                w.exit_handled = False
                return

    def _event(self, w: Worker, kind: EventKind, detail: str = "") -> None:
        ev = WorkerEvent(w.rank, w.url, kind, detail)
        with self._lock:
            self.events.append(ev)
        level = logging.ERROR if kind in ("died", "add_failed") else logging.INFO
        logger.log(level, "worker %d (%s) %s%s", w.rank, w.url, kind, f": {detail}" if detail else "")
        if self._on_event is not None:
            self._on_event(ev)

"""Two processes x 4 fake CPU devices serve one TP=8 engine over jax.distributed on 127.0.0.1;
killing one rank stops the other with a clear error."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import get_engine
from test_tensor_parallel import GREEDY, TINY_DIR, TINY_ENGINE

from jaxradix import SamplingParams

PROMPTS = [list(range(3, 15)), [5] * 9]


def _wait_for(path: Path, procs: list, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a rank exited early ({p.returncode}): {p.stdout.read()}")
        assert time.monotonic() < end, f"timed out waiting for {path.name}"
        time.sleep(0.1)


def test_two_processes_tp8_match_tp1_and_a_killed_rank_stops_the_other(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                        "JAXRADIX_SAMPLER": "split"}
    worker = str(Path(__file__).with_name("multihost_worker.py"))
    procs = [subprocess.Popen([sys.executable, worker, str(rank), str(port), TINY_DIR, str(tmp_path),
                               json.dumps(PROMPTS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    try:
        _wait_for(tmp_path / "result.json", procs, 300)
        ref = get_engine(model_path=TINY_DIR, **TINY_ENGINE)  # one process, fused sampler
        want = [o["output_ids"] for o in ref.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
        want.append(ref.generate(input_ids=PROMPTS[0], sampling_params=SamplingParams(
            temperature=0.8, top_p=0.9, seed=5, max_new_tokens=8))["output_ids"])
        assert json.loads((tmp_path / "result.json").read_text()) == want
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        (tmp_path / "go").touch()
        _wait_for(tmp_path / "error.txt", procs[:1], 60)
        msg = (tmp_path / "error.txt").read_text()
        assert "lost a rank of the distributed job" in msg, msg
        assert procs[0].wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

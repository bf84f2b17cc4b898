"""scripts/trace_gaps.py: device idle time read from a profiler trace (a synthetic GPU timeline here;
the real ones come from bench_step.py --trace on a GPU), and a CPU trace says it has no device."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import trace_gaps  # noqa: E402


def _trace(events: list[tuple[str, int, float, float, str]]) -> dict:
    """events: (name, stream, start us, duration us, module) on /device:GPU:0, plus a host event."""
    out = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
           {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10_000, "name": "PjitFunction(_forward)"}]
    for name, stream, ts, dur, module in events:
        out.append({"ph": "X", "pid": 2, "tid": stream, "ts": ts, "dur": dur, "name": name,
                    "args": {"hlo_module": module}})
    return {"traceEvents": out}


def test_gaps_between_steps_are_measured_on_the_device_timeline():
    steps = []
    t = 0.0
    for _ in range(3):  # forward 1000 us (two overlapping streams), sampler 100 us, then a 250 us gap
        steps += [("fusion", 7, t, 600, "jit__forward"), ("gemm", 8, t + 500, 500, "jit__forward"),
                  ("argmax", 7, t + 1000, 100, "jit__sample")]
        t += 1100 + 250
    tl = trace_gaps.device_timeline(_trace(steps))
    assert tl is not None and tl.device == "/device:GPU:0" and tl.events == 9
    assert abs(tl.window_us - (2 * 1350 + 1100)) < 1e-6
    assert abs(tl.busy_us - 3 * 1100) < 1e-6 and abs(tl.idle_us - 500) < 1e-6
    assert [round(g.length) for g in tl.gaps] == [250, 250]
    assert all(g.before.module == "jit__sample" and g.after.module == "jit__forward" for g in tl.gaps)
    text = "\n".join(trace_gaps.summary(tl, min_gap_us=20))
    assert "2 gaps end at a start of jit__forward" in text and "idle per jit__forward 0.250 ms" in text


def test_a_cpu_trace_has_no_device_timeline(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x) + 1)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    path = trace_gaps.find_trace(str(tmp_path))
    assert trace_gaps.device_timeline(trace_gaps.load_events(path)) is None
    with gzip.open(path, "rt") as fh:
        assert json.load(fh)["traceEvents"]  # a real trace, just without a device

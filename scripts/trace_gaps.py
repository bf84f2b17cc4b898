"""Device idle time in a jax.profiler trace: how long the accelerator waited for the host.

    python scripts/trace_gaps.py TRACE_DIR_OR_FILE [--min-gap-us 20] [--top 10]

Reads the Perfetto JSON a trace writes with ``jax.profiler.trace(dir, create_perfetto_trace=True)``
(``bench_step.py --trace DIR`` does), takes every complete event on the device's timelines (kernels and
copies on all streams of ``/device:GPU:0`` or ``/device:TPU:0``), merges them into busy intervals and
prints the window, the busy share, the idle time, the gaps longer than --min-gap-us and the longest
ones with what ran before and after each (the XLA module, e.g. jit__forward / jit__sample, when the
trace names it). Steps are counted as starts of the module that runs most often after a gap, so
"idle per step" is the exposed host gap of issue 10 measured on the device itself. A CPU trace has
no device timeline: the script says so.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    start: float  # us
    end: float  # us
    name: str
    module: str  # the XLA module (hlo_module arg) or ""


@dataclass(frozen=True)
class Gap:
    start: float
    length: float  # us
    before: Event
    after: Event


@dataclass(frozen=True)
class DeviceTimeline:
    device: str
    window_us: float
    busy_us: float
    gaps: list[Gap]  # every gap between merged busy intervals, in time order
    events: int

    @property
    def idle_us(self) -> float:
        return self.window_us - self.busy_us


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path} (trace with create_perfetto_trace=True)")
    return found[-1]


def load_events(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"traceEvents": data}


def device_timeline(trace: dict) -> DeviceTimeline | None:
    """The first accelerator's timeline (all its streams merged), or None when the trace has none."""
    events = trace.get("traceEvents", [])
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = sorted((n, pid) for pid, n in names.items() if "/device:" in n and ("GPU" in n or "TPU" in n))
    if not devices:
        return None
    device, pid = devices[0]
    evs = sorted((Event(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", "")),
                        str(e.get("args", {}).get("hlo_module", "")))
                  for e in events if e.get("ph") == "X" and e.get("pid") == pid and float(e.get("dur", 0)) > 0),
                 key=lambda e: e.start)
    if not evs:
        return None
    busy, gaps = 0.0, []
    cur_start, cur_end, last = evs[0].start, evs[0].end, evs[0]
    for e in evs[1:]:
        if e.start > cur_end:
            busy += cur_end - cur_start
            gaps.append(Gap(cur_end, e.start - cur_end, last, e))
            cur_start, cur_end, last = e.start, e.end, e
        elif e.end > cur_end:
            cur_end, last = e.end, e
    busy += cur_end - cur_start
    return DeviceTimeline(device, evs[-1].end - evs[0].start if evs else 0.0, busy, gaps, len(evs))


def summary(tl: DeviceTimeline, min_gap_us: float = 20.0, top: int = 10, steps: int | None = None) -> list[str]:
    """steps: how many engine steps the window holds, when the caller knows (idle per step)."""
    big = [g for g in tl.gaps if g.length >= min_gap_us]
    share = 100 * tl.busy_us / max(tl.window_us, 1e-9)
    lines = [f"device {tl.device}: {tl.events} events over {tl.window_us / 1e3:.2f} ms, "
             f"busy {tl.busy_us / 1e3:.2f} ms ({share:.1f}%), idle {tl.idle_us / 1e3:.2f} ms in {len(tl.gaps)} gaps; "
             f"{len(big)} gaps >= {min_gap_us:.0f} us hold {sum(g.length for g in big) / 1e3:.2f} ms"]
    if steps:
        lines.append(f"{steps} engine steps: idle per step {tl.idle_us / steps / 1e3:.3f} ms")
    starts = Counter(g.after.module for g in big if g.after.module)
    if starts:
        module, steps = starts.most_common(1)[0]
        idle = sum(g.length for g in tl.gaps)
        lines.append(f"{steps} gaps end at a start of {module}: idle per {module} {idle / steps / 1e3:.3f} ms "
                     f"(all gaps), {sum(g.length for g in big if g.after.module == module) / steps / 1e3:.3f} ms "
                     f"(the gaps before it)")
    for g in sorted(big, key=lambda g: -g.length)[:top]:
        lines.append(f"  {g.length:9.1f} us after {g.before.module or '?'}:{g.before.name[:40]} "
                     f"before {g.after.module or '?'}:{g.after.name[:40]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a trace directory (searched for perfetto_trace.json.gz) or the file")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    path = find_trace(args.trace)
    tl = device_timeline(load_events(path))
    if tl is None:
        print(f"{path}: no accelerator timeline in this trace (a CPU run)")
        return
    print("\n".join(summary(tl, args.min_gap_us, args.top)))


if __name__ == "__main__":
    main()

"""The CPU int8 gemv as an XLA FFI custom call (``int8_gemv.cc``), built on first use with the host's C++
compiler and cached; ``available()`` is False (and the YNNPACK int8 dots serve instead) when there is no
compiler, the build fails, or ``JAXRADIX_CPU_NATIVE=0``.

Why: XLA:CPU's int8 dot (YNNPACK) needs two activation rows and read SmolLM2's 106 MB of int8 layer
weights in 6.3 ms at one decode token on 2 cores; the plain C++ loop in int8_gemv.cc, compiled for the
host (-O3 -march=native), reads them in ~3.8 ms with exact f32 activations (docs/benchmarks.md).

The library is built into ``$JAXRADIX_NATIVE_DIR`` (default ``~/.cache/jaxradix/native``), named by a
hash of the source, the compiler flags, the jax version and the CPU (model and flags: it is built with
-march=native), so a changed source, jax or CPU rebuilds it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("int8_gemv.cc")
TARGET = "jaxradix_int8_rows"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-pthread", "-w"]
MAX_TOKENS = 8  # activation rows up to which the gemv beats YNNPACK's dot (decode); more: YNNPACK


def _cpu_identity() -> bytes:
    """The host CPU's model and instruction set flags: -march=native code must not run on another CPU
    (a home directory shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode() + platform.machine().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted})).encode()


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jax.__version__.encode()
                         + _cpu_identity()).hexdigest()[:16]
    root = Path(os.environ.get("JAXRADIX_NATIVE_DIR", Path.home() / ".cache" / "jaxradix" / "native"))
    return root / f"int8_gemv-{key}.so"


def _build(path: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: atomic
        out = Path(tmp) / path.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-600:]}")
        os.replace(out, path)
    _prune(path)


STALE_DAYS = 30


def _prune(keep: Path) -> None:
    """Remove other builds (older source, flags, jax or CPU) unused for STALE_DAYS: one is kept per
    combination, so they pile up across upgrades. A process that still maps a removed one is unaffected."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in keep.parent.glob("int8_gemv-*.so"):
        try:
            if old != keep and max(old.stat().st_atime, old.stat().st_mtime) < cutoff:
                old.unlink()
        except OSError:
            pass


@functools.cache
def available() -> bool:
    """Whether the native gemv is built and registered (once per process; False logs why)."""
    if os.environ.get("JAXRADIX_CPU_NATIVE", "1") == "0":
        return False
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxradixInt8Rows), platform="cpu")
    except Exception as e:  # noqa: BLE001 (any failure: the XLA path serves)
        _log.warning("native CPU int8 gemv unavailable (%s); int8 weights take XLA's int8 dots", e)
        return False
    return True


def int8_rows(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """x [T, K] f32 against int8 rows values [N, K] with f32 scales [N] -> [T, N] f32 (needs available())."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], values.shape[0]), jnp.float32))
    return call(x.astype(jnp.float32), values, scales.astype(jnp.float32).reshape(-1))

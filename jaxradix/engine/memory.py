"""Memory accounting a user can read: what the weights, the KV pool and the largest step take.

Logged once at start-up and returned by ``/get_server_info`` as its ``memory`` object. Bytes are real
bytes of the arrays (``nbytes`` of every leaf), so quantized weights and a quantized KV pool (values +
scales) count what they hold, not what they would take dequantized. Totals are over all devices of
the mesh (under TP each device holds about 1/tp of the sharded weights and of the pool).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax

GB = 1e9


def bytes_by_dtype(tree: Any) -> dict[str, int]:
    """Bytes of a pytree's array leaves, per dtype name, largest first."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "nbytes") and hasattr(leaf, "dtype"):
            name = str(leaf.dtype)
            # XLA packs 4-bit values two to a byte; numpy's nbytes counts one byte each
            n = (leaf.size + 1) // 2 if name in ("int4", "uint4") else int(leaf.nbytes)
            out[name] = out.get(name, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int  # every weight leaf (values and scales of quantized ones)
    weights_dtypes: dict[str, int]  # bytes per leaf dtype, e.g. {"int8": ..., "bfloat16": ...}
    kv_bytes: int  # the KV pool, every layer, values and scales
    kv_cache_dtype: str  # the --kv-cache-dtype name as given (auto, bfloat16, fp8_e4m3, ...)
    kv_dtype: str  # the pool's storage dtype (the values' when quantized)
    kv_scale_dtype: str | None  # quantized pools: the dtype of the per-token-head scales
    kv_tokens: int  # tokens the pool holds (page 0 excluded)
    kv_bytes_per_token: int  # over every layer and KV head, scales included
    activation_bytes: int  # measured device bytes of the largest step; 0 when not measured (CPU, a fixed pool)
    devices: int
    device_kind: str

    @property
    def weights_gb(self) -> float:
        return self.weights_bytes / GB

    @property
    def kv_gb(self) -> float:
        return self.kv_bytes / GB

    def weights_description(self) -> str:
        return " + ".join(f"{d} {b / GB:.2f} GB" for d, b in self.weights_dtypes.items()) or "none"

    def kv_description(self) -> str:
        scales = f" + {self.kv_scale_dtype} scales per token and head" if self.kv_scale_dtype else ""
        return f"{self.kv_dtype}{scales}"

    def log_line(self) -> str:
        act = f", activations {self.activation_bytes / GB:.2f} GB (largest step, measured)" \
            if self.activation_bytes else ""
        return (f"memory: weights {self.weights_gb:.3f} GB ({self.weights_description()}), KV pool {self.kv_gb:.3f} GB "
                f"({self.kv_description()}, kv_cache_dtype={self.kv_cache_dtype}) holding {self.kv_tokens} tokens "
                f"({self.kv_bytes_per_token} bytes/token){act}, on {self.devices} {self.device_kind} device(s)")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"weights_gb": self.weights_gb, "kv_gb": self.kv_gb}

"""Roofline of tensor-parallel decode: per-chip weight and KV bytes, all-reduce bytes, expected
decode ms/token and throughput for TPU v5e-8 / v6e-8 hosts and an 8 x H100 node.

    python scripts/tp_roofline.py            # the markdown table in docs/scale-out.md

Pure arithmetic from the chips' data-sheet figures (no device needed). The model of a decode step
of B tokens at context c on tp chips (jaxradix's layout, parallel/tensor_parallel.py):
  HBM time  = (weights/tp + B * c * KV bytes per token per chip) / HBM bandwidth
  link time = B * (per-chip all-reduce + logits all-gather bytes per token) / link bandwidth
              + collectives per step * latency        (2 per layer + embedding + logits)
  step      = HBM time + link time                    (no overlap assumed: conservative)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    def weight_bytes(self, itemsize: int = 2) -> int:
        H, D = self.hidden, self.head_dim
        layer = H * (self.heads + 2 * self.kv_heads) * D + self.heads * D * H + 3 * H * self.inter + 2 * H
        return itemsize * (2 * self.vocab * H + self.layers * layer + H)  # untied embed + lm_head

    def kv_bytes_per_token_chip(self, tp: int, itemsize: int = 2) -> int:
        return self.layers * 2 * max(self.kv_heads // tp, 1) * self.head_dim * itemsize


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float
    hbm_bw: float  # B/s
    link_bw: float  # B/s one direction, what a ring all-reduce step can use per chip
    latency: float  # s per collective (assumed)


MODELS = [Model("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256),
          Model("Llama-3.1-70B", 80, 8192, 64, 8, 128, 28672, 128256)]
# data-sheet figures; link: half the chip's total ICI / NVLink bandwidth; latency: an assumption
CHIPS = [Chip("TPU v5e", 16, 819e9, 100e9, 10e-6),
         Chip("TPU v6e", 32, 1640e9, 224e9, 10e-6),
         Chip("H100 SXM", 80, 3350e9, 450e9, 10e-6)]


def allreduce_bytes_token_layer(m: Model, tp: int) -> tuple[int, float]:
    """(payload, per-chip ring traffic) of the two bf16 all-reduces of one token in one layer."""
    payload = 2 * m.hidden * 2
    return payload, payload * 2 * (tp - 1) / tp


def step_seconds(m: Model, c: Chip, tp: int, batch: int, context: int) -> float:
    hbm = (m.weight_bytes() / tp + batch * context * m.kv_bytes_per_token_chip(tp)) / c.hbm_bw
    if tp == 1:
        return hbm
    _, ring = allreduce_bytes_token_layer(m, tp)
    per_token = m.layers * ring + 2 * m.hidden * 2 * (tp - 1) / tp + m.vocab * 4 * (tp - 1) / tp
    return hbm + batch * per_token / c.link_bw + (2 * m.layers + 2) * c.latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    print(f"| model | chip | tp | weights GiB/chip | KV KiB/token/chip | all-reduce bytes/token/layer "
          f"(payload, per-chip ring) | B=1 c=1k ms/token | B={args.batch} c={args.context} tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        for c in CHIPS:
            for tp in (1, 4, 8):
                w = m.weight_bytes() / tp / 2**30
                kv = args.batch * args.context * m.kv_bytes_per_token_chip(tp) / 2**30
                payload, ring = allreduce_bytes_token_layer(m, tp)
                ar = f"{payload / 1024:.0f} KiB, {ring / 1024:.1f} KiB" if tp > 1 else "-"
                # 90% of HBM for weights + KV (the rest: activations, the runtime)
                lat = f"{step_seconds(m, c, tp, 1, 1024) * 1e3:.2f}" if w < 0.9 * c.hbm_gib else "does not fit"
                thr = (f"{args.batch / step_seconds(m, c, tp, args.batch, args.context):,.0f}"
                       if w + kv < 0.9 * c.hbm_gib else "KV does not fit")
                run = f"{lat} | {thr}"
                print(f"| {m.name} | {c.name} | {tp} | {w:.1f} | {m.kv_bytes_per_token_chip(tp) / 1024:.0f} | {ar} "
                      f"| {run} |")


if __name__ == "__main__":
    main()

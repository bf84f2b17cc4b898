"""Where the dequantization of quantized weights happens in the compiled model step: an op summary of
the optimised HLO, and every float buffer the size of a whole quantized weight that is materialised
outside a fusion (a dequantized copy of the weight written to memory and read back by the dot).
A quantized model passes when there is none: each weight is dequantized inside its dot's fusion.

    python scripts/quant_hlo.py                                   # embedded GGUF, --quantization int8
    python scripts/quant_hlo.py --quantization gguf --tokens 1 64
    python scripts/quant_hlo.py --model-path scripts/configs/llama-3.1-8b --load-format dummy \\
        --quantization int8 --tokens 1 8 256 --time 20            # on a GPU: fusions, and ms per step

Exit status 1 when a dequantized weight copy is found (so a GPU session can assert it). Buffers are
matched by shape (either layout), so on a tiny model a CPU block of one weight can coincide with
another weight's shape: read the listed instructions (a block lives in a while body, `region_*`).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxradix.models.loader import load_model
from jaxradix.models.quantization import QuantizedWeight
from jaxradix.pallas_kernels import get_attention
from jaxradix.pallas_kernels.metadata import AttentionMetadata

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_FLOATS = ("f32", "bf16", "f16")


def parse(hlo: str) -> tuple[dict[str, list[tuple[str, str, int, str, str]]], set[str]]:
    """Computations -> their instructions (name, dtype, sorted dims, opcode, rest), and the fused ones."""
    comps: dict[str, list] = {}
    fused: set[str] = set()
    current = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):  # a computation's header (instructions are indented)
            current = comps.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, dtype, dims, op, rest = m.groups()
            shape = tuple(sorted(int(d) for d in dims.split(",") if d))
            current.append((name, dtype, shape, op, rest))
            if op == "fusion":
                fused.update(re.findall(r"calls=%([\w.\-]+)", rest))
    return comps, fused


def check(hlo: str, weight_shapes: set[tuple[int, ...]]) -> tuple[collections.Counter, list[str]]:
    comps, fused = parse(hlo)
    ops: collections.Counter = collections.Counter()
    copies = []
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        for name, dtype, shape, op, rest in instrs:
            kind = re.search(r"kind=(\w+)", rest)
            cfg = re.search(r'"kind":"(\w+)"', rest) or re.search(r'custom_call_target="([^"]+)"', rest)
            ops[op + (f":{kind.group(1)}" if kind else "") + (f":{cfg.group(1)}" if cfg else "")] += 1
            if dtype in _FLOATS and shape in weight_shapes and op not in ("parameter", "get-tuple-element", "bitcast"):
                copies.append(f"{cname}: %{name} = {dtype}{list(shape)} {op} {rest[:160]}")
    return ops, copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64], help="step sizes T to compile")
    ap.add_argument("--show-hlo", action="store_true", help="print the whole optimised HLO too")
    ap.add_argument("--time", type=int, default=0, help="also time the compiled step (best of 3 x N runs)")
    args = ap.parse_args()

    loaded = load_model(args.model_path, load_format=args.load_format, dtype=args.dtype, progress=False,
                        quantization=args.quantization)
    model, cfg = loaded.model, loaded.config
    qweights = {n: w for n, w in model.flat_params().items() if isinstance(w, QuantizedWeight)}
    shapes = {tuple(sorted(w.shape)) for w in qweights.values()}  # a dequantized copy, in either layout
    print(f"# {jax.default_backend()} ({jax.devices()[0].device_kind}), {loaded.source}, quantization "
          f"{loaded.quantization}: {len(qweights)} quantized weights "
          f"({', '.join(sorted({str(w.values.dtype) for w in qweights.values()}))})")
    attention = get_attention("auto")
    S = 16
    P = max(args.tokens) // S + 2  # pages 1.. hold the longest step's tokens
    kv = tuple(jnp.zeros((P, S, 2 * cfg.num_kv_heads, cfg.head_dim), model.dtype) for _ in range(cfg.num_layers))

    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, kv, ids, pos, slots, md):
        m = nnx.merge(graphdef, params)
        hidden, kv = m(ids, pos, slots, kv, md, attention)
        return m.logits(hidden[-1:]), kv

    failed = False
    for T in args.tokens:
        md = AttentionMetadata(np.array([0, T], np.int32), np.array([T], np.int32),
                               np.arange(1, P, dtype=np.int32)[None, :], np.array([1], np.int32))
        ids = np.zeros(T, np.int32)
        pos = np.arange(T, dtype=np.int32)
        compiled = step.lower(params, kv, ids, pos, pos + S, md).compile()
        hlo = compiled.as_text()
        if args.time:
            inputs = (params, kv, ids, pos, pos + S, md)
            jax.block_until_ready(compiled(*inputs))
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(args.time):
                    out = compiled(*inputs)
                jax.block_until_ready(out)
                best = min(best, (time.perf_counter() - start) / args.time)
            wbytes = sum(getattr(w, "nbytes", 0) for w in model.flat_params().values())
            print(f"\n# T={T}: {best * 1e3:.3f} ms/step (weights {wbytes / 2**30:.2f} GiB: "
                  f"{wbytes / best / 1e9:.0f} GB/s if every weight byte is read once)")
        if args.show_hlo:
            print(hlo)
        ops, copies = check(hlo, shapes)
        print(f"\n## T={T}: op summary outside fusions (opcode:fusion kind:backend config)")
        for op, n in sorted(ops.items(), key=lambda kv: -kv[1]):
            if any(k in op for k in ("fusion", "dot", "custom-call", "convert", "while", "copy")):
                print(f"  {n:5d}  {op}")
        print(f"# T={T}: dequantized whole-weight copies outside a fusion: {len(copies)}")
        for c in copies[:12]:
            print("  " + c)
        failed |= bool(copies)
    print("\n# RESULT:", "FAIL (a dequantized weight is materialised)" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Convert a model once into an orbax checkpoint that loads faster than converting again.

    python scripts/convert.py --out checkpoints/smollm2            # the embedded GGUF
    python scripts/convert.py --model-path /path/to/hf_dir --dtype bfloat16 --out checkpoints/m
    python scripts/generate.py --model-path checkpoints/smollm2     # then load it like any model
"""

from __future__ import annotations

import argparse
import time

from jaxradix.models.loader import load_model, save_orbax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded = load_model(args.model_path, dtype=args.dtype, quantization="none")  # checkpoints hold dense weights
    start = time.perf_counter()
    out = save_orbax(loaded, args.out)
    print(f"converted {loaded.source} ({loaded.load_format}, {loaded.load_seconds:.2f} s) -> {out} "
          f"in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

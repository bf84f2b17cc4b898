"""What SGLang users type keeps working: launch_server's flags, Hugging Face model ids (offline, from a
local cache laid out as huggingface_hub lays it), `jr.set_default_backend(engine)` and `jr.Runtime`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import get_engine

import jaxradix as jr
from jaxradix.launch_server import build_parser, engine_kwargs, ignored_flags, server_options
from jaxradix.models.hub import is_hub_id, resolve_model_path

TINY = Path(__file__).parent / "data" / "parity" / "tiny_qwen2" / "config.json"


# == flags =========================================================================================
def test_sglang_flags_are_accepted_and_the_meaningless_ones_named(tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages[0].content }}")
    args = build_parser().parse_args([
        "--model-path", "Qwen/Qwen2.5-0.5B-Instruct", "--tokenizer-path", "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name", "qwen", "--trust-remote-code", "--enable-cache-report", "--context-length", "512",
        "--tool-call-parser", "qwen25", "--reasoning-parser", "qwen3", "--chat-template", str(tpl),
        "--pp-size", "1", "--disable-cuda-graph", "--cuda-graph-max-bs-decode", "8", "--enable-torch-compile"])
    assert engine_kwargs(args) == {"model_path": "Qwen/Qwen2.5-0.5B-Instruct", "context_length": 512,
                                   "log_level": "info"}
    assert sorted(ignored_flags(args)) == ["--cuda-graph-max-bs-decode", "--disable-cuda-graph",
                                           "--enable-torch-compile", "--pp-size"]
    assert server_options(args) == {"chat_template": "{{ messages[0].content }}", "tool_call_parser": "qwen25",
                                    "reasoning_parser": "qwen3"}
    assert args.served_model_name == "qwen"


def test_flags_that_are_not_sglangs_are_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tool-call-parser", "nonsense"])
    with pytest.raises(ValueError, match="chat-template"):
        server_options(build_parser().parse_args(["--chat-template", "chatml"]))


def test_ignored_flags_warn_at_launch(monkeypatch, caplog):
    import jaxradix.launch_server as ls

    class Stop(Exception):
        pass

    def no_server(*a, **k):
        raise Stop

    monkeypatch.setattr("jaxradix.server.create_app", no_server)
    with caplog.at_level(logging.WARNING, logger="jaxradix.server"), pytest.raises(Stop):
        ls.main(["--pp-size", "2", "--skip-server-warmup"])
    assert any("--pp-size" in r.getMessage() and "no meaning" in r.getMessage() for r in caplog.records)


# == Hugging Face ids, offline =====================================================================
def _fake_snapshot(home: Path, repo: str, ref: str, commit: str, files: dict[str, str]) -> Path:
    """A hub cache entry as huggingface_hub writes it: refs/<ref> -> commit, snapshots/<commit>/..."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TINY.read_text()
    main = _fake_snapshot(tmp_path, "acme/tiny-qwen", "main", "a" * 40, {"config.json": cfg})
    v1 = _fake_snapshot(tmp_path, "acme/tiny-qwen", "v1", "b" * 40, {"config.json": cfg})
    assert is_hub_id("acme/tiny-qwen") and not is_hub_id(str(tmp_path)) and not is_hub_id("model.gguf")
    assert resolve_model_path("acme/tiny-qwen") == main
    assert resolve_model_path("acme/tiny-qwen", revision="v1") == v1
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_path("acme/not-cached")
    with pytest.raises(ValueError, match="revision"):
        resolve_model_path(str(tmp_path), revision="v1")

    import jaxradix.models.loader as loader

    seen = []
    monkeypatch.setattr(loader, "_load_dummy", lambda path, *_: seen.append(path) or SimpleNamespace())
    loader.load_model("acme/tiny-qwen", load_format="dummy", progress=False)  # what Engine(model_path=id) does
    assert seen == [main]


def test_local_paths_are_left_alone(tmp_path):
    shutil.copy(TINY, tmp_path / "config.json")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert json.loads((resolve_model_path(str(tmp_path)) / "config.json").read_text())


# == the frontend in-process =======================================================================
@jr.function
def capital(s):
    s += "The capital of France is" + jr.gen("city", max_tokens=4, temperature=0)


def test_set_default_backend_takes_an_engine():
    engine = get_engine()
    try:
        jr.set_default_backend(engine)
        assert isinstance(jr.get_default_backend(), jr.EngineBackend)
        assert capital.run()["city"] == engine.generate("The capital of France is",
                                                        {"max_new_tokens": 4, "temperature": 0})["text"]
        with pytest.raises(TypeError, match="Engine, Runtime"):
            jr.set_default_backend("http://127.0.0.1:1")
    finally:
        jr.set_default_backend(None)


def test_runtime_starts_an_engine_and_serves_programs(monkeypatch):
    import jaxradix.engine.engine as engine_module

    engine, seen = get_engine(), {}
    monkeypatch.setattr(engine_module, "Engine", lambda **kw: seen.update(kw) or engine)
    rt = jr.Runtime(model_path="some/model", max_total_tokens=4096)
    assert seen == {"model_path": "some/model", "max_total_tokens": 4096, "log_level": "error"}
    out = json.loads(rt.generate("Hello", {"max_new_tokens": 2, "temperature": 0}))
    assert out["meta_info"]["completion_tokens"] == 2
    try:
        jr.set_default_backend(rt)
        assert capital.run()["city"]
    finally:
        jr.set_default_backend(None)

"""jaxradix: an LLM serving engine in JAX with a radix-tree prefix cache over a paged KV pool."""

from jaxradix.engine.request import FinishReason, SamplingParams

__version__ = "0.1.0"
_LANG = ("function", "gen", "select", "fork", "system", "user", "assistant", "set_default_backend",
         "RuntimeEndpoint", "EngineBackend", "Runtime", "get_default_backend")
__all__ = ["Engine", "SamplingParams", "FinishReason", "__version__", *_LANG]


def __getattr__(name: str):
    # Engine pulls in JAX and the model code; import it on first use so `import jaxradix` stays cheap.
    if name == "Engine":
        from jaxradix.engine.engine import Engine

        return Engine
    if name in _LANG:  # the frontend language (jaxradix.lang), also imported on first use
        import jaxradix.lang

        return getattr(jaxradix.lang, name)
    raise AttributeError(f"module 'jaxradix' has no attribute {name!r}")

"""jaxradix: an LLM serving engine in JAX with a radix-tree prefix cache over a paged KV pool."""

from jaxradix.engine.request import FinishReason, SamplingParams

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "FinishReason", "__version__"]


def __getattr__(name: str):
    # Engine pulls in JAX and the model code; import it on first use so `import jaxradix` stays cheap.
    if name == "Engine":
        from jaxradix.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'jaxradix' has no attribute {name!r}")

"""HTTP server: the OpenAI-compatible API and SGLang's native API over one Engine."""

from jaxradix.server.app import create_app

__all__ = ["create_app"]

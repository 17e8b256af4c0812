"""`lmforge serve`: an OpenAI-compatible HTTP server over continuous batching.

`engine` (the batched decode loop), `protocol` (OpenAI's request and response shapes), `metrics` (Prometheus
text), `app` (the FastAPI routes and `serve`).
"""

from lmforge.serve.app import Embedder, create_app, mean_pool, serve
from lmforge.serve.engine import Engine, Request, SamplingParams

__all__ = ["Embedder", "Engine", "Request", "SamplingParams", "create_app", "mean_pool", "serve"]

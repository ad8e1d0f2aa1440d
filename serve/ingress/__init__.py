"""The ingress layer: HTTP routes only (read, authenticate, parse, resolve, dispatch, map
errors). ``app`` holds the Router deployment; ``core``, ``admin`` and ``listing`` the Ray-free
logic behind its routes."""

# Answered before FastAPI's middleware (``app._App``); HAProxy tells Ray not to watch their
# connections for a disconnect (``serve.haproxy``). In this order: embeddings, classify.
HOT_PATHS = ("/v1/embeddings", "/v1/classify")
